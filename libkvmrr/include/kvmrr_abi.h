/*
 * kvmrr_abi.h - the contract between a kvmrr guest and the virtual machine.
 *
 * Shared by the replay core (libkvmrr, which models the devices) and the guest runtime
 * (guests/runtime, which drives them), so the two can never disagree on a number.
 * Everything here is plain #defines so a freestanding guest can include it.
 *
 * Machine: one x86-64 vCPU entered in long mode at ring 0, identity paging (2 MiB pages)
 * over all of RAM, interrupts disabled at entry, RSP at the top of RAM.
 */
#ifndef KVMRR_ABI_H
#define KVMRR_ABI_H

/* ---- memory layout (guest physical == guest virtual) ---- */
#define KVMRR_GDT_ADDR        0x1000   /* loader's GDT: 0 null, 0x8 code64, 0x10 data */
#define KVMRR_PML4_ADDR       0x2000   /* loader's page tables: PML4, PDPT, PD follow */
#define KVMRR_BOOTINFO_ADDR   0x8000   /* struct kvmrr_bootinfo, written by the loader */
#define KVMRR_LOAD_MIN        0x100000 /* ELF segments must lie at or above 1 MiB */
#define KVMRR_BOOTINFO_MAGIC  0x6b766d7272626f6fULL /* "kvmrrboo" */
#define KVMRR_BOOTARGS_MAX    256

#ifndef __ASSEMBLER__
/* Written by the loader at KVMRR_BOOTINFO_ADDR; part of the initial state, so a replay
 * sees the same arguments.  args is "key=value key=value", NUL-terminated. */
struct kvmrr_bootinfo {
    unsigned long long magic;
    unsigned long long mem_size;    /* bytes of RAM; the stack starts at the top */
    char args[KVMRR_BOOTARGS_MAX];
};
#endif

/* ---- interrupt vectors (no PIC/APIC: the core injects these directly) ---- */
#define KVMRR_VEC_TIMER       32
#define KVMRR_VEC_NIC_RX      33

/* ---- I/O ports ---- */
#define KVMRR_PORT_SERIAL     0x3f8  /* out8: one byte of console output */
#define KVMRR_PORT_EXIT       0xf4   /* out8/out32: the guest is done; value = exit code */
#define KVMRR_PORT_TIMER      0x40   /* out32: timer period in microseconds, 0 stops it.
                                        Fires KVMRR_VEC_TIMER; ticks that land while the
                                        guest has interrupts off coalesce into one. */
#define KVMRR_PORT_CLOCK_LO   0x70   /* in32: latch host wall clock (ns since epoch), low half.
                                        Non-deterministic: logged as PortIn. */
#define KVMRR_PORT_CLOCK_HI   0x74   /* in32: high half of the value latched by CLOCK_LO */
#define KVMRR_PORT_RANDOM     0x78   /* in32: 32 random bits. Non-deterministic: logged. */

/* NIC: receive by DMA + interrupt, transmit by doorbell. One rx packet in flight. */
#define KVMRR_PORT_NIC_RX_ADDR 0x100 /* out32: guest address of the rx buffer */
#define KVMRR_PORT_NIC_RX_CAP  0x104 /* out32: rx buffer capacity in bytes */
#define KVMRR_PORT_NIC_RX_LEN  0x108 /* in32: length of the delivered packet, 0 if none */
#define KVMRR_PORT_NIC_RX_ACK  0x10c /* out32: the guest is done with the rx buffer; the
                                        NIC may deliver the next packet */
#define KVMRR_PORT_NIC_TX_ADDR 0x110 /* out32: guest address of the packet to send */
#define KVMRR_PORT_NIC_TX_LEN  0x114 /* out32: length; writing it rings the doorbell */
#define KVMRR_NIC_MTU          2048

/* Exit codes the runtime uses besides the workload's own. */
#define KVMRR_EXIT_FAULT_BASE  0x80  /* CPU exception N ends the guest with 0x80 + N */

#endif /* KVMRR_ABI_H */
