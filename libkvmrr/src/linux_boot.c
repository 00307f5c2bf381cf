/*
 * linux_boot.c - boot a Linux vmlinux (an uncompressed ELF kernel) by the x86-64 64-bit
 * boot protocol, as a VMM that skips firmware does: the kernel's PT_LOAD segments at
 * their physical addresses, a zero page (struct boot_params) with the setup header's
 * fields a loader fills, an e820 memory map and the command line, then the 64-bit entry
 * with RSI pointing at the zero page, in long mode with an identity map over all of RAM,
 * CS/DS at the protocol's 0x10/0x18, interrupts off.  Offsets and meanings from the
 * kernel's Documentation/x86/boot.rst ("64-bit Boot Protocol", "The Real-Mode Kernel
 * Header") and Documentation/x86/zero-page.rst.
 *
 * Everything written here is part of the initial state (RAM and registers), so a replay
 * that boots the same image with the same command line starts identically; the log
 * header carries both.
 */
#include <string.h>

#include "internal.h"

#define ZERO_PAGE    0x7000     /* struct boot_params, 4 KiB, below the e820 hole */
#define CMDLINE_ADDR 0x20000
#define STACK_TOP    0x7000     /* grows down below the zero page; the kernel soon has its own */

/* boot_params / setup_header offsets (zero-page.rst, boot.rst) */
#define BP_E820_ENTRIES   0x1e8
#define BP_BOOT_FLAG      0x1fe
#define BP_HEADER         0x202
#define BP_VERSION        0x206
#define BP_TYPE_OF_LOADER 0x210
#define BP_LOADFLAGS      0x211
#define BP_CMD_LINE_PTR   0x228
#define BP_KERNEL_ALIGN   0x230
#define BP_CMDLINE_SIZE   0x238
#define BP_E820_TABLE     0x2d0

#define E820_RAM      1
#define E820_RESERVED 2
#define EBDA_START    0x9fc00   /* the top 1 KiB of conventional memory, as BIOSes keep it */
#define HIGH_START    0x100000

static void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

static void e820_add(uint8_t *bp, int *n, uint64_t addr, uint64_t size, uint32_t type)
{
    uint8_t *e = bp + BP_E820_TABLE + *n * 20;   /* packed {u64 addr, u64 size, u32 type} */
    put64(e, addr);
    put64(e + 8, size);
    put32(e + 16, type);
    (*n)++;
}

int linux_boot_setup(struct kvmrr_vm *vm, const uint8_t *elf, size_t len, const char *cmdline,
                     uint64_t *entry, char *err, size_t err_len)
{
    if (strlen(cmdline) >= KVMRR_CMDLINE_MAX)
        return ERRF(err, err_len, "kernel command line longer than %d bytes",
                    KVMRR_CMDLINE_MAX - 1);
    if (elf_load(vm->mem, vm->cfg.mem_size, elf, len, entry, err, err_len) < 0)
        return -1;
    uint8_t *bp = vm->mem + ZERO_PAGE;
    memset(bp, 0, 4096);
    put16(bp + BP_BOOT_FLAG, 0xaa55);
    memcpy(bp + BP_HEADER, "HdrS", 4);
    put16(bp + BP_VERSION, 0x020f);               /* protocol 2.15 */
    bp[BP_TYPE_OF_LOADER] = 0xff;                 /* a loader with no assigned id */
    bp[BP_LOADFLAGS] = 0x01;                      /* LOADED_HIGH: the kernel is at 1 MiB+ */
    put32(bp + BP_CMD_LINE_PTR, CMDLINE_ADDR);
    put32(bp + BP_KERNEL_ALIGN, 0x200000);
    put32(bp + BP_CMDLINE_SIZE, KVMRR_CMDLINE_MAX - 1);
    int n = 0;
    e820_add(bp, &n, 0, EBDA_START, E820_RAM);
    e820_add(bp, &n, EBDA_START, HIGH_START - EBDA_START, E820_RESERVED);
    e820_add(bp, &n, HIGH_START, vm->cfg.mem_size - HIGH_START, E820_RAM);
    bp[BP_E820_ENTRIES] = (uint8_t)n;
    memset(vm->mem + CMDLINE_ADDR, 0, KVMRR_CMDLINE_MAX);
    memcpy(vm->mem + CMDLINE_ADDR, cmdline, strlen(cmdline));
    return 0;
}

/* After x86_setup_long_mode: RSI = the zero page, a stack in low memory. */
int linux_boot_regs(struct kvmrr_vm *vm, char *err, size_t err_len)
{
    struct kvm_regs r;
    if (vm_get_regs(vm, &r) < 0)
        return ERRF(err, err_len, "KVM_GET_REGS failed");
    r.rsi = ZERO_PAGE;
    r.rsp = STACK_TOP;
    if (vm_set_regs(vm, &r) < 0)
        return ERRF(err, err_len, "KVM_SET_REGS failed");
    return 0;
}
