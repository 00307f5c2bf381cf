/*
 * kvmrr.h - the public interface of the replay core.
 *
 * Declarations only (no macros beyond the include guard), so the cffi build can read it
 * as its cdef after stripping the preprocessor lines.  One VM has one vCPU; the VM is
 * driven by kvmrr_vm_run(), which returns a small result struct whenever the caller has
 * something to do (drain recorded events, feed more log, deadline, guest exit), never per
 * instruction.
 */
#ifndef KVMRR_H
#define KVMRR_H

#include <stddef.h>
#include <stdint.h>

/* Bumped on any change to this header; the binding refuses a library of another version. */
enum { KVMRR_ABI_VERSION = 6 };   /* 2: kvmrr_stats.breakpoints; 3: CPU model, MSRs skipped;
                                    4: the debugger's API; 5: the PC machine, host CPU;
                                    6: kvmrr_limits.stop_at_output */

/* Guest instructions retired since the VM's first instruction (docs/ARCHITECTURE.md §2.1). */
typedef int64_t kvmrr_icount_t;

enum kvmrr_mode {
    KVMRR_MODE_RUN = 0,     /* free run: devices live, nothing recorded */
    KVMRR_MODE_RECORD = 1,  /* devices live, every non-deterministic input becomes an event */
    KVMRR_MODE_REPLAY = 2   /* inputs come only from fed events, checked as they apply */
};

enum kvmrr_counter {
    KVMRR_COUNTER_STEP = 0, /* single-step every instruction: exact on every KVM host */
    KVMRR_COUNTER_FAST = 1  /* run free, read KVM's exact insn_emulation statistic */
};

enum kvmrr_event_kind {
    KVMRR_EV_INTERRUPT = 1, /* a = vector */
    KVMRR_EV_DMA = 2,       /* a = guest address, data/len = bytes written */
    KVMRR_EV_PORT_IN = 3,   /* a = port, b = size, c = value */
    KVMRR_EV_MMIO_READ = 4, /* a = address, b = size, c = value (no MMIO device yet) */
    KVMRR_EV_INSN = 5,      /* a = opcode, b = rax, c = rdx, d = rcx after the instruction */
    KVMRR_EV_OUTPUT = 6,    /* a = channel, b = output seq, data/len = bytes */
    KVMRR_EV_CHECKSUM = 7   /* a = state hash, regs = register set */
};

enum kvmrr_channel { KVMRR_CHANNEL_SERIAL = 0, KVMRR_CHANNEL_NIC = 1 };

/* Order of the register set in checksums and divergence reports. */
enum kvmrr_reg {
    KVMRR_REG_RAX, KVMRR_REG_RBX, KVMRR_REG_RCX, KVMRR_REG_RDX, KVMRR_REG_RSI,
    KVMRR_REG_RDI, KVMRR_REG_RSP, KVMRR_REG_RBP, KVMRR_REG_R8, KVMRR_REG_R9,
    KVMRR_REG_R10, KVMRR_REG_R11, KVMRR_REG_R12, KVMRR_REG_R13, KVMRR_REG_R14,
    KVMRR_REG_R15, KVMRR_REG_RIP, KVMRR_REG_RFLAGS, KVMRR_NREGS
};

struct kvmrr_event {
    int32_t kind;
    uint32_t len;              /* payload bytes (Dma, Output) */
    kvmrr_icount_t icount;     /* the event takes effect when this many instructions retired */
    uint64_t rip;              /* guest RIP there: a cheap check on replay */
    uint64_t a, b, c, d;       /* kind-specific, see enum kvmrr_event_kind */
    uint64_t regs[KVMRR_NREGS];/* Checksum only */
    const uint8_t *data;       /* payload; recorded events: valid until the next run call */
};

/* The machine a guest is given (docs/ARCHITECTURE.md §7). */
enum kvmrr_machine {
    KVMRR_MACHINE_KVMRR = 0,  /* kvmrr's own ports (kvmrr_abi.h); an ELF entered in long mode */
    KVMRR_MACHINE_PC = 1      /* PC devices (UART, PIT, PIC, RTC); a Linux vmlinux booted by
                                 the x86-64 boot protocol, bootargs its command line */
};

struct kvmrr_config {
    uint64_t mem_size;           /* bytes of guest RAM, a multiple of 2 MiB */
    int32_t mode;                /* enum kvmrr_mode */
    int32_t counter;             /* enum kvmrr_counter */
    int64_t checksum_every;      /* record a Checksum about every N instructions; 0 = never */
    int32_t machine;             /* enum kvmrr_machine */
    int32_t host_cpu;            /* the host CPU the vCPU thread is pinned to; -1: the one
                                    the creating thread runs on (kvmrr_vm_host_cpu says) */
};

enum kvmrr_stop {
    KVMRR_STOP_EXITED = 1,      /* the guest wrote the exit port; result.exit_code */
    KVMRR_STOP_ICOUNT = 2,      /* reached limits.stop_icount exactly */
    KVMRR_STOP_DEADLINE = 3,    /* limits.deadline_ns passed */
    KVMRR_STOP_EVENTS_FULL = 4, /* record buffer full: take the events and run again */
    KVMRR_STOP_NEED_EVENTS = 5, /* replay: every fed event applied; feed more */
    KVMRR_STOP_DIVERGED = 6,    /* replay disagrees with the log: see kvmrr_vm_divergence */
    KVMRR_STOP_ERROR = 7        /* KVM or the guest failed: result.message */
};

struct kvmrr_limits {
    kvmrr_icount_t stop_icount; /* stop exactly here; -1 for no limit */
    int64_t deadline_ns;        /* CLOCK_MONOTONIC; 0 for none */
    int32_t stop_at_output;     /* live runs: stop (as at the deadline) right after an
                                   output on the NIC, so that a response leaves at once */
};

struct kvmrr_result {
    int32_t stop;               /* enum kvmrr_stop */
    int32_t exit_code;
    kvmrr_icount_t icount;
    char message[256];
};

struct kvmrr_divergence {
    kvmrr_icount_t icount;            /* where the replay noticed */
    struct kvmrr_event expected;      /* the logged event it could not match */
    uint64_t actual[KVMRR_NREGS];     /* the replaying vCPU's registers there */
    int32_t actual_kind;              /* what the guest did instead (0: nothing yet) */
    uint64_t actual_hash;             /* state hash there (Checksum divergences) */
    char reason[160];
};

struct kvmrr_stats {
    int64_t exits;              /* KVM_RUN returns */
    int64_t kicks;              /* signal kicks */
    int64_t steps;              /* single-steps */
    int64_t events;             /* events recorded or applied */
    int64_t peak_rate;          /* highest instructions/s seen over a slice >= 1 ms */
    int64_t breakpoints;        /* replay: exits at a hardware breakpoint on an event's RIP */
};

struct kvmrr_vm;

int kvmrr_abi_version(void);

/* Run a probe of known length and tell which counter is exact here.  Returns
 * KVMRR_COUNTER_FAST or KVMRR_COUNTER_STEP (with why[] saying why not fast), or -1 with
 * why[] on a KVM error. */
int kvmrr_calibrate(char *why, size_t why_len);

/* A configured VM with the ELF image loaded and the vCPU at its entry point.
 * NULL with err[] filled on failure. */
struct kvmrr_vm *kvmrr_vm_create(const struct kvmrr_config *cfg, const uint8_t *elf,
                                 size_t elf_len, const char *bootargs,
                                 char *err, size_t err_len);
void kvmrr_vm_destroy(struct kvmrr_vm *vm);

int kvmrr_vm_run(struct kvmrr_vm *vm, const struct kvmrr_limits *limits,
                 struct kvmrr_result *result);
kvmrr_icount_t kvmrr_vm_icount(struct kvmrr_vm *vm);
/* The host CPU the vCPU runs on: CPUID leaf 1 shows its APIC ID to the guest (§2.7). */
int kvmrr_vm_host_cpu(struct kvmrr_vm *vm);

/* Record: copy up to max recorded events out; returns how many. */
int kvmrr_vm_take_events(struct kvmrr_vm *vm, struct kvmrr_event *out, int max);
/* Replay: queue events (payloads copied); 0, or -1 with the reason in err[]. */
int kvmrr_vm_feed_events(struct kvmrr_vm *vm, const struct kvmrr_event *events, int n,
                         char *err, size_t err_len);
int kvmrr_vm_pending_events(struct kvmrr_vm *vm);
/* Replay: the log is known to hold no events before icount other than those fed (an End
 * record, a heartbeat), so the replay may run up to it once the fed events are applied. */
void kvmrr_vm_set_horizon(struct kvmrr_vm *vm, kvmrr_icount_t icount);
/* Takeover: a replaying VM whose fed events are all applied switches to record mode and
 * continues the same run (same icount, same devices), recording from here on. */
int kvmrr_vm_go_live(struct kvmrr_vm *vm, int64_t checksum_every, char *err, size_t err_len);
/* Record: a packet arrives on the NIC (thread-safe: wakes the vCPU).  0 or -1 if full. */
int kvmrr_vm_nic_push(struct kvmrr_vm *vm, const uint8_t *packet, size_t len);
/* Record: stop the vCPU soon from another thread (run returns STOP_DEADLINE). */
void kvmrr_vm_interrupt(struct kvmrr_vm *vm);

int kvmrr_vm_get_regs(struct kvmrr_vm *vm, uint64_t regs[]);
uint64_t kvmrr_vm_state_hash(struct kvmrr_vm *vm);
void kvmrr_vm_divergence(struct kvmrr_vm *vm, struct kvmrr_divergence *out);
void kvmrr_vm_stats(struct kvmrr_vm *vm, struct kvmrr_stats *out);

/* The fixed CPU model every guest sees (its CPUID table): writes its name, sets *hash to
 * the xxh64 of its leaves (either may be NULL); returns the number of leaves. */
int kvmrr_cpu_model(char *name, size_t name_len, uint64_t *hash);

/* The CPUID answers a guest actually gets on this host, which need not be the model's
 * (some hosts answer some leaves from the host CPU): runs the leaves a guest asks in a
 * probe VM.  Copies up to max_words answers (eax, ebx, ecx, edx per leaf), sets *hash to
 * their xxh64, returns the number of words; -1 with err[] if the probe cannot run.  A
 * log states the hash; a host whose hash differs cannot replay it. */
int kvmrr_cpu_seen(uint32_t *out, int max_words, uint64_t *hash, char *err, size_t err_len);

/* MSRs that KVM lists but a snapshot cannot carry (they do not read, or do not write
 * back): copies up to max indices, returns how many there are. */
int kvmrr_vm_msrs_skipped(struct kvmrr_vm *vm, uint32_t *out, int max);

/* Snapshot of the whole VM: magic, version, sizes, vCPU and core state, MSRs, memory,
 * checksum.  Restore validates every field first and changes nothing if it refuses. */
size_t kvmrr_vm_snapshot_size(struct kvmrr_vm *vm);
int kvmrr_vm_snapshot_save(struct kvmrr_vm *vm, uint8_t *buf, size_t cap, size_t *len);
int kvmrr_vm_snapshot_restore(struct kvmrr_vm *vm, const uint8_t *buf, size_t len,
                              char *err, size_t err_len);

/* ---- for a debugger (debug.c); nothing here writes to the guest ---- */
struct kvmrr_sregs {
    uint64_t cs, ss, ds, es, fs, gs;   /* selectors */
    uint64_t fs_base, gs_base;
    uint64_t cr0, cr2, cr3, cr4, cr8, efer;
};
int kvmrr_vm_get_sregs(struct kvmrr_vm *vm, struct kvmrr_sregs *out);

enum { KVMRR_DEBUG_READ_MAX = 1048576 };
/* Read guest memory by virtual address through the guest's page tables (physical
 * without paging): the bytes read, short at the first unmapped page; -1 if len exceeds
 * KVMRR_DEBUG_READ_MAX or KVM fails. */
int64_t kvmrr_vm_read_virt(struct kvmrr_vm *vm, uint64_t gva, uint8_t *buf, size_t len);

enum { KVMRR_DEBUG_MAX_BREAK = 64, KVMRR_DEBUG_MAX_WATCH = 16 };
struct kvmrr_debug_stops {
    int32_t nbreak, nwatch;
    uint64_t breaks[64];           /* stop when RIP reaches one of these */
    uint64_t watch_addr[16];       /* stop when these bytes (virtual) change */
    uint32_t watch_len[16];        /* 1..8 */
};
enum kvmrr_debug_why {
    KVMRR_DEBUG_ICOUNT = 1,        /* reached stop_icount */
    KVMRR_DEBUG_BREAK = 2,         /* RIP reached breaks[index] */
    KVMRR_DEBUG_WATCH = 3,         /* the last instruction changed watch[index] */
    KVMRR_DEBUG_DEADLINE = 4,
    KVMRR_DEBUG_RUN_STOP = 5,      /* the run loop stopped otherwise: run_stop, message */
    KVMRR_DEBUG_ERROR = 6
};
struct kvmrr_debug_result {
    int32_t why;                   /* enum kvmrr_debug_why */
    int32_t index;
    int32_t run_stop;              /* enum kvmrr_stop, for KVMRR_DEBUG_RUN_STOP */
    int32_t exit_code;
    kvmrr_icount_t icount;
    uint64_t address;
    int64_t steps;                 /* instructions stepped by this call */
    char message[256];
};
/* Replay one instruction at a time (the exact stop at icount + 1) until a breakpoint or
 * watchpoint hits after an instruction, stop_icount (-1: none) or deadline_ns
 * (CLOCK_MONOTONIC, 0: none) is reached, or the run loop stops for another reason.
 * 0, or -1 with res->message. */
int kvmrr_vm_debug_run(struct kvmrr_vm *vm, const struct kvmrr_debug_stops *stops,
                       kvmrr_icount_t stop_icount, int64_t deadline_ns,
                       struct kvmrr_debug_result *res);

/* Hash throughput probe for benchmarks: xxh64 of a buffer. */
uint64_t kvmrr_hash64(const uint8_t *buf, size_t len, uint64_t seed);

#endif /* KVMRR_H */
