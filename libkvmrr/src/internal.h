/*
 * internal.h - the VM object and the functions the core's files share.
 * One file per concern: vm.c (KVM objects), x86.c (long-mode setup), loader.c (ELF),
 * devices.c (port I/O models), counter.c (icount backends), events.c (queues),
 * run.c (the run loop), snapshot.c, hash.c, cpu_model.c (the CPUID the guest sees).
 */
#ifndef KVMRR_INTERNAL_H
#define KVMRR_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <linux/kvm.h>
#include <sched.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>

#include "kvmrr.h"
#include "kvmrr_abi.h"
#include "pc.h"

#define KVMRR_RECORD_CAP   4096      /* recorded events held before STOP_EVENTS_FULL */
#define KVMRR_NIC_QUEUE    256       /* rx packets queued by the host before push fails */
#define KVMRR_SERIAL_LINE  256       /* serial output is logged per line or per this many */
#define KVMRR_USER_BP_MAX  3         /* debugger breakpoints in DR0-3, one left for run.c */

/* ---- devices (devices.c): the state every replica must agree on ---- */
struct kvmrr_devices {
    uint64_t timer_period_ns;        /* programmed by the guest; 0 = off */
    uint64_t clock_latch;            /* value latched by the last CLOCK_LO read */
    uint64_t nic_rx_addr, nic_rx_cap, nic_rx_len;
    uint64_t nic_tx_addr;
    uint64_t output_seq;             /* next output seq number (all channels) */
    uint32_t serial_len;
    uint8_t serial_buf[KVMRR_SERIAL_LINE];
    /* (added after the fields above, which keep their offsets in a snapshot) */
    uint32_t machine;                /* enum kvmrr_machine: which port map (devices.c) */
    uint32_t pad;
    struct pc_devices pc;            /* KVMRR_MACHINE_PC: the PC devices (pc.h) */
};

/* What a port access asks the run loop to do. */
enum pio_effect {
    PIO_DONE = 0,        /* handled entirely by the device model */
    PIO_INPUT,           /* a non-deterministic read: value comes from host (record) or log */
    PIO_OUTPUT,          /* a complete output (serial line or NIC packet) to log */
    PIO_EXIT,            /* the guest asked to stop */
    PIO_TIMER,           /* timer period changed: re-arm */
    PIO_RX_ACK,          /* the guest freed the rx buffer */
    PIO_BAD              /* an access no device claims */
};

struct pio_access {
    uint16_t port;
    uint8_t size;
    bool write;
    uint64_t value;        /* written value, or the value to return for reads */
    int input;             /* PIO_INPUT: what the host gives (enum pio_input, pc.h) */
    /* PIO_OUTPUT: channel and bytes (pointing into device or guest memory) */
    int channel;
    const uint8_t *out_data;
    uint32_t out_len;
};

/* The exit handler for port I/O: pure, so tests call it without KVM. */
enum pio_effect devices_pio(struct kvmrr_devices *dev, uint8_t *mem, uint64_t mem_size,
                            struct pio_access *io);
/* Output waiting in the serial buffer (flushed at guest exit). */
bool devices_serial_flush(struct kvmrr_devices *dev, struct pio_access *io);
void devices_input_apply(struct kvmrr_devices *dev, struct pio_access *io, uint64_t value);
/* One byte of console output into the line buffer: PIO_OUTPUT when a line is complete. */
int devices_serial_put(struct kvmrr_devices *dev, uint8_t byte, struct pio_access *io);
/* The vector a timer tick would be delivered at now, or -1 if the interrupt controller
 * holds it back; and its delivery (the PC's PIC then has IRQ 0 in service). */
int devices_timer_vector(const struct kvmrr_devices *dev);
void devices_timer_delivered(struct kvmrr_devices *dev);
bool devices_nic_ready(const struct kvmrr_devices *dev, uint64_t mem_size);
uint32_t devices_nic_deliver(struct kvmrr_devices *dev, uint8_t *mem, const uint8_t *data,
                             uint32_t len);
/* Device state read back from a snapshot: 0, or -1 with err[] if it breaks an invariant
 * the models rely on. */
int devices_validate(const struct kvmrr_devices *dev, uint64_t mem_size, char *err,
                     size_t err_len);

/* ---- events (events.c) ---- */
struct event_slot {
    struct kvmrr_event ev;
    uint8_t *payload;      /* owned copy */
    uint32_t cap;
};

struct event_queue {
    struct event_slot *slots;
    int cap, head, count;  /* ring */
};

int  queue_init(struct event_queue *q, int cap);
void queue_free(struct event_queue *q);
struct kvmrr_event *queue_push(struct event_queue *q, const struct kvmrr_event *ev,
                               const uint8_t *data, uint32_t len);
struct kvmrr_event *queue_peek(struct event_queue *q);
void queue_pop(struct event_queue *q);
void queue_clear(struct event_queue *q);
/* A fed event: 0, or -1 with err[] saying which field is out of range. */
int event_validate(const struct kvmrr_event *ev, char *err, size_t err_len);

struct nic_packet { uint32_t len; uint8_t data[KVMRR_NIC_MTU]; };

/* ---- the VM ---- */
struct kvmrr_vm {
    struct kvmrr_config cfg;
    int kvm_fd, vm_fd, vcpu_fd;
    struct kvm_run *run;
    size_t run_size;
    uint8_t *mem;

    /* counting (counter.c) */
    int stats_fd;
    off_t insn_stat_offset;          /* -1 when KVM has no insn_emulation statistic */
    uint64_t watch[4];               /* single-step: exception handler entries watched */
    int watch_vec[4];                /* and their vectors */
    int watch_n;
    bool sregs_synced;               /* run->s.regs.sregs holds KVM's current sregs */
    bool time_scanned;               /* fast record: guest RAM searched for them once */
    int time_sites;                  /* fast record: RDTSC/RDRAND/RDSEED places watched */
    uint64_t time_site[4];
    uint64_t db_entry;               /* fast record: the guest's #DB handler watched; 0: none */
    int64_t debug_poll_ns;           /* record: when the guest's DR6/DR7 are next checked */
    bool msr_filter;                 /* time-like MSR reads exit to the core */
    uint64_t stat_base;              /* stat value at icount 0 (fast) */
    kvmrr_icount_t icount;           /* exact count at the current stop */
    int debug_mode;                  /* guest debug currently set: enum guest_debug */
    uint64_t debug_bp;               /* DEBUG_BP: the breakpoint's address */
    /* replay, approaching an async event: passes of the breakpoint on its RIP (run.c) */
    kvmrr_icount_t bp_target;        /* the event's icount these describe */
    uint64_t bp_rip;                 /* and its RIP */
    kvmrr_icount_t bp_last_hit;      /* icount at the last hit short of it; -1: none yet */
    int stalled_kicks;                /* approach kicks in a row that ran nothing */
    kvmrr_icount_t bp_period;        /* longest stretch seen between two hits; 0: unknown */
    /* a debugger's code breakpoints (debug.c), armed as hardware breakpoints in replay's
     * free runs and compared with RIP after its single-steps (run.c, user_break_*) */
    uint64_t user_bp[KVMRR_USER_BP_MAX];
    int user_bp_n;                   /* 0: none (every caller but debug.c) */
    bool user_bp_hit;                /* the last exit stopped at one, before executing it */
    uint64_t user_bp_skip;           /* left off for one run: a handler entry just delivered to */

    struct kvmrr_devices dev;

    /* record side: host inputs waiting and time */
    pthread_mutex_t lock;            /* guards the nic queue, wake flags */
    struct nic_packet *nic_queue;    /* ring of packets pushed by the host */
    int nic_head, nic_count;
    bool timer_pending;              /* a tick waits for injection */
    kvmrr_icount_t last_tick_icount; /* record: where the last tick was injected */
    int64_t next_tick_ns;            /* CLOCK_MONOTONIC of the next tick, 0 = none */
    int wake_fd;                     /* eventfd: wakes a halted record vCPU */
    volatile int stop_requested;
    bool stop_at_output;             /* this run stops after a NIC output (kvmrr_limits) */
    pid_t vcpu_tid;
    timer_t kick_timer;
    bool kick_timer_ok;
    bool halted;                     /* the guest executed HLT and waits for an interrupt */
    uint64_t frame_rflags_gpa;       /* RFLAGS image of an interrupt just injected */
    uint64_t delivery_tf;            /* the guest's own TF when it was injected */
    bool in_pending;                 /* an IN exited and KVM has not completed it yet */
    bool in_completing;              /* step: an IN exited; its completion traps again */

    struct event_queue recorded;     /* record: events not yet taken */
    struct event_queue replay;       /* replay: events fed, not yet applied */
    kvmrr_icount_t last_checksum;
    kvmrr_icount_t last_event_icount;
    kvmrr_icount_t horizon;          /* replay: the log holds no events before this beyond those fed */

    struct kvmrr_divergence div;
    struct kvmrr_stats stats;

    /* the CPU model (cpu_model.c) and the MSRs a snapshot carries (snapshot.c) */
    uint64_t cpu_model_hash;
    uint32_t *snap_msrs;             /* KVM's MSR list, those that read and write back */
    int snap_nmsrs;
    uint32_t *skipped_msrs;          /* listed by KVM, but not readable or not writable */
    int skipped_nmsrs;
};

/* vm.c */
int  vm_get_regs(struct kvmrr_vm *vm, struct kvm_regs *regs);
int  vm_set_regs(struct kvmrr_vm *vm, const struct kvm_regs *regs);
void vm_regs_to_array(const struct kvm_regs *r, uint64_t out[KVMRR_NREGS]);
/* KVM_SET_GUEST_DEBUG, only when it changes: off, single-step, or one hardware
 * instruction breakpoint (DR0) at bp. */
enum guest_debug { DEBUG_OFF, DEBUG_STEP, DEBUG_BP,
                   DEBUG_STEP_WATCH, /* run.c: single-step, exception handlers watched */
                   DEBUG_RECORD_WATCH, /* run.c: free record, breakpoints on RDTSC/RDRAND/
                                        RDSEED and the guest's #DB handler */
                   DEBUG_USER_BP     /* run.c: free, a debugger's breakpoints (and DEBUG_BP's) */ };
/* A replay run that stopped at one of vm->user_bp: kvmrr_vm_run's stop for debug.c only,
 * which reports it as KVMRR_DEBUG_BREAK (never seen outside the library). */
#define STOP_USER_BREAK 100
int  vm_set_guest_debug(struct kvmrr_vm *vm, int mode, uint64_t bp);

/* vm.c: choose cfg.host_cpu (if -1) and check the host has it; 0 or -1 with err[].
 * host_cpu_enter pins the calling thread to it (0 or -1), host_cpu_leave undoes that. */
int  host_cpu_pin(struct kvmrr_vm *vm, char *err, size_t err_len);
int  host_cpu_enter(struct kvmrr_vm *vm, cpu_set_t *saved);
void host_cpu_leave(const cpu_set_t *saved);

/* x86.c */
int x86_setup_long_mode(struct kvmrr_vm *vm, uint64_t entry, uint16_t code_sel,
                        char *err, size_t err_len);

/* linux_boot.c: a vmlinux by the x86-64 64-bit boot protocol (zero page, e820, command
 * line); after x86_setup_long_mode, with the entry it returns */
#define KVMRR_CMDLINE_MAX 2048
int linux_boot_setup(struct kvmrr_vm *vm, const uint8_t *elf, size_t len, const char *cmdline,
                     uint64_t *entry, char *err, size_t err_len);
int linux_boot_regs(struct kvmrr_vm *vm, char *err, size_t err_len);

/* loader.c */
int elf_load(uint8_t *mem, uint64_t mem_size, const uint8_t *elf, size_t len,
             uint64_t *entry, char *err, size_t err_len);

/* calibrate.c: also used by the C tests to make guests from bytes */
size_t probe_elf_build(const uint8_t *code, size_t code_len, uint8_t *out, size_t cap);
/* calibrate.c: hardware instruction breakpoints stop emulated guest code exactly here */
bool hwbp_usable(void);

/* counter.c */
int  counter_open(struct kvmrr_vm *vm);
int  counter_read_stat(struct kvmrr_vm *vm, uint64_t *value);
int  counter_sync(struct kvmrr_vm *vm);   /* fast: icount from the statistic */
void counter_rebase(struct kvmrr_vm *vm, kvmrr_icount_t icount);

/* cpu_model.c: KVM_SET_CPUID2 with kvmrr's fixed model; refuses a host that lacks it */
int cpu_model_set(struct kvmrr_vm *vm, char *err, size_t err_len);
/* The model's answer to CPUID leaf function, subleaf 0 (false: no such leaf, so the
 * guest reads the highest basic leaf instead, Intel's rule). */
bool cpu_model_leaf(uint32_t function, uint32_t out[4]);

/* snapshot.c: which of KVM's MSRs a snapshot saves (after the CPU model is set) */
int snapshot_msrs_init(struct kvmrr_vm *vm, char *err, size_t err_len);
/* paging.c: guest virtual -> physical through the guest's own page tables; 0 or -1 */
int  gva_to_gpa(struct kvmrr_vm *vm, const struct kvm_sregs *s, uint64_t gva, bool write,
                uint64_t *gpa);
int  guest_read(struct kvmrr_vm *vm, const struct kvm_sregs *s, uint64_t gva, void *buf,
                size_t len);
int  guest_write(struct kvmrr_vm *vm, const struct kvm_sregs *s, uint64_t gva,
                 const void *buf, size_t len);

/* emulate.c: instructions the core executes itself */
enum insn_kind { INSN_NONE, INSN_IRET, INSN_PUSHF, INSN_HLT, INSN_RDTSC, INSN_RDTSCP,
                 INSN_RDRAND, INSN_RDSEED, INSN_INT3, INSN_INTN, INSN_CLAC, INSN_STAC,
                 INSN_FWAIT, INSN_XGETBV, INSN_RDPID, INSN_RDMSR, INSN_SERIALIZE,
                 /* not executed by the core: KVM's emulator runs it, but a single-step
                  * trap after it is lost (run.c's step_debug puts a breakpoint after) */
                 INSN_AFTER_BP, INSN_POPCNT,
                 /* the XSAVE family (xsave.c) */
                 INSN_XSAVE, INSN_XSAVEOPT, INSN_XRSTOR, INSN_XSAVEC, INSN_XSAVES,
                 INSN_XRSTORS, INSN_FNSTSW_AX, INSN_POPF };
struct insn {
    int kind;          /* enum insn_kind */
    int len;           /* bytes */
    int opsize;        /* 2, 4 or 8 */
    int reg;           /* RDRAND/RDSEED/RDPID destination */
    int vector;        /* INT3/INT n */
    bool lock;         /* a LOCK prefix */
    bool rex_w;        /* REX.W: XSAVE64 and kin (64-bit x87 FIP/FDP) */
    uint64_t ea;       /* a memory operand's linear address (XSAVE family) */
};
#define EMU_RING3 1    /* insn_execute: the instruction would enter ring 3; nothing done */
/* 0 (in->kind INSN_NONE if none of the core's), or -1 if RIP is not mapped. */
int  insn_decode(struct kvmrr_vm *vm, const struct kvm_regs *r, const struct kvm_sregs *s,
                 struct insn *in);
/* Execute on r/s and guest memory: 0, EMU_RING3, or -1 with why[]. */
int  insn_execute(struct kvmrr_vm *vm, struct kvm_regs *r, struct kvm_sregs *s,
                  const struct insn *in, bool *sregs_changed, char *why, size_t why_len);
int  deliver_vector(struct kvmrr_vm *vm, struct kvm_regs *r, struct kvm_sregs *s, int vector,
                    bool has_error, uint32_t error, bool *cs_changed, char *why, size_t why_len);
uint64_t *insn_gpr(struct kvm_regs *r, int reg);

/* xsave.c: XSAVE, XSAVEOPT, XRSTOR (standard form) executed on KVM_GET/SET_XSAVE and
 * guest memory; XSAVEC, XSAVES, XRSTORS and the compacted XRSTOR fault as the CPUID the
 * guest sees says, or are refused.  Same contract as insn_execute. */
bool insn_is_xsave(int kind);
int  xsave_execute(struct kvmrr_vm *vm, struct kvm_regs *r, struct kvm_sregs *s,
                   const struct insn *in, bool *sregs_changed, char *why, size_t why_len);
/* XINUSE as the core defines it (xsave.c): the XCR0 components not in their initial
 * configuration.  0, or -1 if KVM would not tell. */
int  xsave_xinuse(struct kvmrr_vm *vm, uint64_t *xinuse);
int  time_sites_scan(struct kvmrr_vm *vm, uint64_t *sites, int max);
const char *insn_name(int kind);

/* hash.c */
uint64_t state_hash(struct kvmrr_vm *vm);

/* snapshot.c uses run.c's kick timer teardown */
int kick_init(struct kvmrr_vm *vm);
void kick_free(struct kvmrr_vm *vm);

/* Fill an error buffer and evaluate to -1. */
static inline int errf_done(int ignored) { (void)ignored; return -1; }
#define ERRF(buf, len, ...) errf_done(snprintf((buf), (len), __VA_ARGS__))

#endif
