/*
 * run.c - the vCPU run loop: live (run/record) and replay, mirror images of each other.
 *
 * Counting (docs/ARCHITECTURE.md §2.2).  `step` single-steps every instruction and counts
 * the exits itself: a debug exit, an I/O exit and a HLT exit each retire one instruction.
 * `fast` runs free and reads KVM's exact statistic at every exit (counter.c).  Both see
 * the same exits, so both give the same icount at every event, which the tests check by
 * recording with one and replaying with the other.
 *
 * Stopping at an exact icount with `fast` (replay of an asynchronous event, a budget):
 * there is no overflow interrupt to count down with, so the loop runs free under a timer
 * kick set to fire well before the target can be reached at the fastest rate seen so far,
 * reads the counter, and repeats; within KVMRR_NEAR instructions it single-steps the rest.
 * A kick that came too late would leave the vCPU past the target: that is reported as an
 * error (never silently replayed past), and the safety margin makes it not happen.
 * Replaying an asynchronous event, whose RIP the log holds, it runs instead to a hardware
 * breakpoint on that RIP where the host supports it (approach_debug): kicks and
 * single-steps then remain only for hot loops and for the few instructions before it.
 *
 * Single-step traps are lost after IRETQ (the popped RFLAGS has no TF), so whenever the
 * loop single-steps it executes IRETQ itself (emulate.c); under `step` it also executes
 * RDTSC, RDTSCP, RDRAND, RDSEED and RDMSR of a time MSR itself, so their results become
 * log events.
 *
 * Exceptions.  The statistic counts a faulting instruction as one and its delivery as
 * none; a single-step over it stops at a hardware breakpoint on the handler's entry
 * (step_debug), the same state at the same count, so both counters agree at every
 * instruction and an exact stop can fall between a fault and its handler.
 *
 * What this host's KVM lets the core see of time and randomness (measured 2026-12-01 on
 * 6.18 with kvm_pvm, a guest at CPL 0; every value below from a probe run free):
 *  - RDTSC, RDRAND, RDSEED: executed without an exit and counted as one each by
 *    insn_emulation; CR4.TSD does not fault at CPL 0; an MSR filter does not see RDTSC;
 *    clearing the RDRAND/RDSEED/TSC bits with KVM_SET_CPUID2 changes nothing.  The only
 *    per-vCPU trace is insn_emulation_fail (+1 per RDRAND/RDSEED), which also moves for
 *    every IRETQ and every exception, so it cannot tell them apart.  `fast` records
 *    therefore watch the places in guest RAM holding their encodings with hardware
 *    breakpoints (at most four; more are refused at once with exit 2).  Code written
 *    later (self-modifying, or mapped at another virtual address than its physical
 *    one) is not watched: a gap, stated here rather than hidden.
 *  - RDTSCP, INT3, INT n, CLAC/STAC, FWAIT, XGETBV, XRSTOR/XSAVE: the emulator fails
 *    (KVM_EXIT_INTERNAL_ERROR, suberror 1, counted as one); the core executes the ones
 *    it knows (all but the XSAVE family) and says which it cannot.
 *  - RDPID: #UD from the emulator, alike in every mode.
 *  - RDMSR of IA32_TSC: silent, but an MSR filter (KVM_CAP_X86_USER_SPACE_MSR) makes it
 *    exit with KVM_EXIT_X86_RDMSR, already counted: every mode logs it.
 *  - CPUID leaf 1 EBX[31:24] is the APIC ID of the host CPU the vCPU thread runs on
 *    (0x20800 on CPU 0, 0x1020800 on CPU 1), whatever KVM_SET_CPUID2 says.
 *
 * Ring 3 runs natively here, uncounted, and single-step does not stop it: an IRET to CPL
 * 3 the core executes, or any exit found at CPL 3 (a backstop kick makes one at least
 * every BACKSTOP_NS), ends the run with an error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

#include "internal.h"

#define KVMRR_NEAR        400        /* single-step the last this-many instructions */
#define MIN_RATE_GUESS    4000000    /* instr/s assumed possible before any is measured */
#define BACKSTOP_NS       250000000  /* free runs exit at least this often */
/* The PC machine's timer ticks come at least this many instructions apart (unless the
 * guest waits in HLT): Linux's tick costs a few thousand instructions, and at this host's
 * emulated speed (about 1 M instructions/s, 0.2 M single-stepped) a 100 Hz tick taken on
 * time would leave little else to run.  The log says where each tick landed, so the
 * replay follows whatever the record chose. */
#define PC_TICK_MIN_GAP   20000
#define RFLAGS_IF         (1ull << 9)
#define RFLAGS_CF         (1ull << 0)
#define RFLAGS_TF         (1ull << 8)
#define RFLAGS_RF_VM      (3ull << 16)

enum exit_kind { EXIT_AGAIN, EXIT_STOP };

static __thread struct kvm_run *tls_run;

static void kick_handler(int sig)
{
    (void)sig;
    if (tls_run)
        tls_run->immediate_exit = 1;
}

static int kick_signal(void) { return SIGRTMIN + 2; }

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t wall_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int kick_init(struct kvmrr_vm *vm)
{
    struct sigaction sa = { .sa_handler = kick_handler };
    sigemptyset(&sa.sa_mask);
    return sigaction(kick_signal(), &sa, NULL);
}

void kick_free(struct kvmrr_vm *vm)
{
    if (vm->kick_timer_ok)
        timer_delete(vm->kick_timer);
    vm->kick_timer_ok = false;
}

/* The kick timer signals the thread that runs the vCPU, whichever thread that is. */
static int kick_bind_thread(struct kvmrr_vm *vm)
{
    pid_t tid = (pid_t)syscall(SYS_gettid);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, kick_signal());
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    if (vm->kick_timer_ok && vm->vcpu_tid == tid)
        return 0;
    kick_free(vm);
    struct sigevent sev = { .sigev_notify = SIGEV_THREAD_ID, .sigev_signo = kick_signal() };
    sev._sigev_un._tid = tid;
    if (timer_create(CLOCK_MONOTONIC, &sev, &vm->kick_timer) < 0)
        return -1;
    vm->kick_timer_ok = true;
    __atomic_store_n(&vm->vcpu_tid, tid, __ATOMIC_RELEASE);
    return 0;
}

static void kick_arm(struct kvmrr_vm *vm, int64_t at_ns)
{
    struct itimerspec its = { 0 };
    if (at_ns > 0) {
        its.it_value.tv_sec = at_ns / 1000000000;
        its.it_value.tv_nsec = at_ns % 1000000000;
    }
    timer_settime(vm->kick_timer, TIMER_ABSTIME, &its, NULL);
}

void kvmrr_vm_interrupt(struct kvmrr_vm *vm)
{
    __atomic_store_n(&vm->stop_requested, 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    if (write(vm->wake_fd, &one, sizeof(one)) < 0) { /* already signalled */ }
    pid_t tid = __atomic_load_n(&vm->vcpu_tid, __ATOMIC_ACQUIRE);
    if (tid && vm->cfg.counter == KVMRR_COUNTER_FAST)
        syscall(SYS_tgkill, getpid(), tid, kick_signal());
}

int kvmrr_vm_nic_push(struct kvmrr_vm *vm, const uint8_t *packet, size_t len)
{
    if (len > KVMRR_NIC_MTU)
        return -1;
    pthread_mutex_lock(&vm->lock);
    if (vm->nic_count == KVMRR_NIC_QUEUE) {
        pthread_mutex_unlock(&vm->lock);
        return -1;
    }
    struct nic_packet *p = &vm->nic_queue[(vm->nic_head + vm->nic_count) % KVMRR_NIC_QUEUE];
    p->len = (uint32_t)len;
    memcpy(p->data, packet, len);
    vm->nic_count++;
    pthread_mutex_unlock(&vm->lock);
    uint64_t one = 1;
    if (write(vm->wake_fd, &one, sizeof(one)) < 0) { /* already signalled */ }
    /* A running `fast` vCPU only looks at the queue at an exit: make one. */
    pid_t tid = __atomic_load_n(&vm->vcpu_tid, __ATOMIC_ACQUIRE);
    if (tid && vm->cfg.counter == KVMRR_COUNTER_FAST)
        syscall(SYS_tgkill, getpid(), tid, kick_signal());
    return 0;
}

/* ---------------------------------------------------------------- helpers */

static uint64_t cur_rip(struct kvmrr_vm *vm) { return vm->run->s.regs.regs.rip; }

/* The segment and control registers: KVM syncs them into kvm_run at every exit
 * (KVM_SYNC_X86_SREGS, enabled for the run); before the first exit of a run, or after
 * the core changed them, they are read from KVM. */
static int cur_sregs(struct kvmrr_vm *vm, struct kvm_sregs *s)
{
    if (vm->sregs_synced) {
        *s = vm->run->s.regs.sregs;
        return 0;
    }
    if (ioctl(vm->vcpu_fd, KVM_GET_SREGS, s) < 0)
        return -1;
    vm->run->s.regs.sregs = *s;
    vm->sregs_synced = true;
    return 0;
}

/* interrupt_bitmap is an input too: a vector set there is injected.  The copy synced at
 * an exit can still hold one delivered since (found with the xsave torture guest: a #PF
 * the core delivered, which sets CR2, re-injected a timer tick from 300 instructions
 * before).  The core calls this only with nothing injected (exec_special), so none. */
static int set_sregs(struct kvmrr_vm *vm, const struct kvm_sregs *s)
{
    struct kvm_sregs copy = *s;
    memset(copy.interrupt_bitmap, 0, sizeof(copy.interrupt_bitmap));
    vm->run->s.regs.sregs = copy;
    return ioctl(vm->vcpu_fd, KVM_SET_SREGS, &copy);
}

/*
 * Whether KVM_RUN's return (rc) left a fresh copy of the state `what` (KVM_SYNC_X86_*) in
 * kvm_run.  KVM stores the synced state on every way out of KVM_RUN, a kick's EINTR too,
 * so the exit a kick makes needs no GET_SREGS or GET_VCPU_EVENTS of its own.  Each vCPU
 * ioctl costs a vcpu_load here, whose MSR reads trap to the host below: the ioctls around
 * exits took about an eighth of a 1 kHz replay's time (docs/ARCHITECTURE.md §8).
 */
static bool ran_synced(const struct kvmrr_vm *vm, int rc, uint64_t what)
{
    return (rc == 0 || errno == EINTR || errno == EAGAIN) && (vm->run->kvm_valid_regs & what);
}

/* The vCPU's pending and injected events right after a KVM_RUN, before the core changed
 * any: the synced copy when there is one. */
static int exit_events(struct kvmrr_vm *vm, bool synced, struct kvm_vcpu_events *ev)
{
    if (synced) {
        *ev = vm->run->s.regs.events;
        return 0;
    }
    return ioctl(vm->vcpu_fd, KVM_GET_VCPU_EVENTS, ev);
}

static void emulated_retired(struct kvmrr_vm *vm, int n)
{
    /* An instruction the loop executed itself: the statistic did not see it. */
    vm->stat_base -= (uint64_t)n;   /* (step ignores the statistic; kept for cross-checks) */
    vm->icount += n;
    /* It also ends an STI / MOV SS interrupt shadow, which KVM cannot know: without this,
     * "sti; hlt" with the HLT executed here stays uninterruptible forever (injectable()
     * sees the shadow, and a halted guest never re-enters KVM to clear it). */
    struct kvm_vcpu_events ev;
    if (ioctl(vm->vcpu_fd, KVM_GET_VCPU_EVENTS, &ev) == 0 && ev.interrupt.shadow) {
        ev.interrupt.shadow = 0;
        ev.flags = KVM_VCPUEVENT_VALID_SHADOW;
        (void)ioctl(vm->vcpu_fd, KVM_SET_VCPU_EVENTS, &ev);
    }
}

static bool injectable(struct kvmrr_vm *vm)
{
    if (!(vm->run->s.regs.regs.rflags & RFLAGS_IF))
        return false;
    struct kvm_vcpu_events ev;
    if (ioctl(vm->vcpu_fd, KVM_GET_VCPU_EVENTS, &ev) < 0)
        return false;
    return !ev.interrupt.shadow && !ev.interrupt.injected && !ev.exception.injected;
}

static int inject(struct kvmrr_vm *vm, uint32_t vector)
{
    struct kvm_interrupt irq = { .irq = vector };
    if (ioctl(vm->vcpu_fd, KVM_INTERRUPT, &irq) < 0)
        return -1;
    vm->halted = false;
    /* Single-stepped, the delivery pushes the debugger's TF in the RFLAGS image on the
     * guest's stack, where the guest can read it: note where that image will be (64-bit
     * delivery at the same privilege aligns RSP down to 16, then pushes 5 qwords) so the
     * first exit after delivery can put back the guest's own TF. */
    vm->frame_rflags_gpa = (vm->run->s.regs.regs.rsp & ~0xfull) - 40 + 16;   /* virtual */
    vm->delivery_tf = vm->run->s.regs.regs.rflags & RFLAGS_TF;
    return 0;
}

/* The first exit after a single-stepped delivery. */
static void delivered(struct kvmrr_vm *vm)
{
    /* (the field holds the image's virtual address: the stack is the guest's) */
    struct kvm_sregs s;
    uint64_t image;
    if (cur_sregs(vm, &s) == 0 && guest_read(vm, &s, vm->frame_rflags_gpa, &image, 8) == 0) {
        image = (image & ~RFLAGS_TF) | vm->delivery_tf;
        (void)guest_write(vm, &s, vm->frame_rflags_gpa, &image, 8);
    }
    vm->frame_rflags_gpa = 0;
}

/*
 * The guest's own single-step trap.  With RFLAGS.TF set at the start of an instruction
 * that completes, the CPU raises #DB after it.  Running free, KVM's emulator does that,
 * but the instructions the core executes itself never reach KVM: there the core delivers
 * it, DR6.BS set, as the CPU would.  A delivery retires nothing.
 *
 * Single-stepped (KVM_GUESTDBG_SINGLESTEP) the guest's own TF cannot be kept on this
 * host: KVM_GET_REGS hides TF while the debugger steps, the trap comes to the core, and
 * KVM_SET_GUEST_DEBUG drops TF when it switches modes (measured with the trapflag
 * torture guest: under `step` its POPF-set TF never trapped).  So a guest that sets TF
 * while the core single-steps is refused (exec_special), never replayed wrong.
 */
#define DR6_BS (1ull << 14)
static int guest_tf_trap(struct kvmrr_vm *vm)
{
    struct kvm_regs r = vm->run->s.regs.regs;
    struct kvm_sregs s;
    struct kvm_debugregs d;
    bool cs_changed = false;
    char why[160];
    if (cur_sregs(vm, &s) < 0
        || deliver_vector(vm, &r, &s, 1, false, 0, &cs_changed, why, sizeof(why)) < 0)
        return -1;
    vm_set_regs(vm, &r);
    if (cs_changed && set_sregs(vm, &s) < 0)
        return -1;
    if (ioctl(vm->vcpu_fd, KVM_GET_DEBUGREGS, &d) == 0) {
        d.dr6 |= DR6_BS;
        (void)ioctl(vm->vcpu_fd, KVM_SET_DEBUGREGS, &d);
    }
    return 0;
}

static void result_set(struct kvmrr_result *res, struct kvmrr_vm *vm, int stop)
{
    res->stop = stop;
    res->icount = vm->icount;
}

static int fail(struct kvmrr_result *res, struct kvmrr_vm *vm, const char *fmt, const char *what)
{
    result_set(res, vm, KVMRR_STOP_ERROR);
    snprintf(res->message, sizeof(res->message), fmt, what, vm->icount,
             (unsigned long long)cur_rip(vm));
    return EXIT_STOP;
}

static struct kvmrr_event *log_event(struct kvmrr_vm *vm, int kind, uint64_t a, uint64_t b,
                                     uint64_t c, uint64_t d, const uint8_t *data, uint32_t len)
{
    struct kvmrr_event ev = { .kind = kind, .icount = vm->icount, .rip = cur_rip(vm),
                              .a = a, .b = b, .c = c, .d = d };
    vm->stats.events++;
    return queue_push(&vm->recorded, &ev, data, len);
}

/* Outputs reach the caller in every mode (to print, send, or check); the rest of the
 * log only when recording. */
static bool keeps_event(struct kvmrr_vm *vm, int kind)
{
    return vm->cfg.mode == KVMRR_MODE_RECORD || kind == KVMRR_EV_OUTPUT;
}

static void record(struct kvmrr_vm *vm, int kind, uint64_t a, uint64_t b, uint64_t c,
                   uint64_t d, const uint8_t *data, uint32_t len)
{
    if (keeps_event(vm, kind))
        log_event(vm, kind, a, b, c, d, data, len);
}

/* ---------------------------------------------------------------- divergence */

static int diverge(struct kvmrr_vm *vm, struct kvmrr_result *res, const struct kvmrr_event *exp,
                   int actual_kind, const char *reason)
{
    struct kvmrr_divergence *d = &vm->div;
    memset(d, 0, sizeof(*d));
    d->icount = vm->icount;
    if (exp) {
        d->expected = *exp;
        d->expected.data = NULL;   /* payloads are not kept for the report */
        d->expected.len = 0;
    }
    d->actual_kind = actual_kind;
    struct kvm_regs r;
    if (vm_get_regs(vm, &r) == 0)
        vm_regs_to_array(&r, d->actual);
    snprintf(d->reason, sizeof(d->reason), "%s", reason);
    result_set(res, vm, KVMRR_STOP_DIVERGED);
    snprintf(res->message, sizeof(res->message), "divergence at icount %lld: %s",
             (long long)vm->icount, reason);
    return EXIT_STOP;
}

/* ---------------------------------------------------------------- entering the guest */

struct enter_result {
    uint32_t exit_reason;   /* KVM_EXIT_*, or KVM_EXIT_INTR for a kick */
    bool ring3;             /* the exit found the guest at CPL 3 */
    bool step_lost;         /* step: the statistic saw more than the single-steps did */
};

static uint64_t host_random64(void)
{
    uint64_t v = 0;
    if (getrandom(&v, sizeof(v), 0) != sizeof(v))
        v = (uint64_t)wall_ns() * 0x9e3779b97f4a7c15ull;
    return v;
}

/*
 * MSRs whose value is time: IA32_TSC (0x10), IA32_MPERF (0xe7), IA32_APERF (0xe8).  This
 * host's emulator returns the host's TSC for them silently; an MSR filter
 * (KVM_CAP_X86_USER_SPACE_MSR) makes their reads exit to the core, in every mode
 * (measured: RDMSR 0x10 then exits with KVM_EXIT_X86_RDMSR, counted by the statistic).
 */
static const uint32_t time_msrs[] = { 0x10, 0xe7, 0xe8 };

static bool is_time_msr(uint64_t index)
{
    for (size_t i = 0; i < sizeof(time_msrs) / sizeof(time_msrs[0]); i++)
        if (index == time_msrs[i])
            return true;
    return false;
}

static int msr_filter_install(struct kvmrr_vm *vm)
{
    struct kvm_enable_cap cap = { .cap = KVM_CAP_X86_USER_SPACE_MSR,
                                  .args = { KVM_MSR_EXIT_REASON_FILTER } };
    if (ioctl(vm->vm_fd, KVM_ENABLE_CAP, &cap) < 0)
        return -1;
    static uint8_t deny[1];   /* a clear bit: that MSR's reads exit */
    struct kvm_msr_filter f = { .flags = KVM_MSR_FILTER_DEFAULT_ALLOW };
    for (size_t i = 0; i < sizeof(time_msrs) / sizeof(time_msrs[0]); i++)
        f.ranges[i] = (struct kvm_msr_filter_range){ .flags = KVM_MSR_FILTER_READ,
                                                      .nmsrs = 1, .base = time_msrs[i],
                                                      .bitmap = deny };
    return ioctl(vm->vm_fd, KVM_X86_SET_MSR_FILTER, &f);
}

static bool is_time_insn(int kind, const struct kvm_regs *r)
{
    return kind == INSN_RDTSC || kind == INSN_RDTSCP || kind == INSN_RDRAND
           || kind == INSN_RDSEED || (kind == INSN_RDMSR && is_time_msr((uint32_t)r->rcx));
}

static uint64_t insn_opcode(int kind)
{
    return kind == INSN_RDTSC ? 0x0f31 : kind == INSN_RDTSCP ? 0x0f01f9
           : kind == INSN_RDMSR ? 0x0f32 : kind == INSN_RDRAND ? 0x0fc7f0 : 0x0fc7f8;
}

static int refuse_ring3(struct kvmrr_vm *vm, struct kvmrr_result *res, const char *how)
{
    char what[160];
    snprintf(what, sizeof(what), "the guest enters ring 3 (%s), which this host's counters "
             "cannot see (ring-3 code runs natively, uncounted)", how);
    return fail(res, vm, "%s, at icount %lld rip 0x%llx", what);
}

/* The value a time or random instruction returns: from the host (record) or the log
 * (replay, checked against what the guest executes). */
static int time_value(struct kvmrr_vm *vm, int kind, uint64_t *rax, uint64_t *rdx,
                      uint64_t *rcx, struct kvmrr_result *res, int *stop)
{
    uint64_t msr = *rcx;   /* RDMSR: the index, checked on replay */
    uint64_t opcode = insn_opcode(kind);
    if (vm->cfg.mode == KVMRR_MODE_REPLAY) {
        struct kvmrr_event *ev = queue_peek(&vm->replay);
        if (!ev || ev->kind != KVMRR_EV_INSN || ev->icount != vm->icount || ev->a != opcode
            || (kind == INSN_RDMSR && ev->d != msr)) {
            *stop = diverge(vm, res, ev, KVMRR_EV_INSN, "the guest executed an instruction "
                            "the log does not hold here");
            return -1;
        }
        *rax = ev->b; *rdx = ev->c; *rcx = ev->d;
        queue_pop(&vm->replay);
        vm->stats.events++;
        return 0;
    }
    if (kind == INSN_RDTSC || kind == INSN_RDTSCP || kind == INSN_RDMSR) {
        uint64_t t = __rdtsc();
        *rax = (uint32_t)t; *rdx = t >> 32;
        *rcx = kind == INSN_RDMSR ? msr : 0;   /* RDTSCP: TSC_AUX, processor 0 */
    } else {
        *rax = host_random64(); *rdx = 0; *rcx = 0;
    }
    record(vm, KVMRR_EV_INSN, opcode, *rax, *rdx, *rcx, NULL, 0);
    return 0;
}

/*
 * Execute the instruction at RIP in the core if it is one the core executes (emulate.c).
 * Flow instructions (IRET, PUSHF, HLT) only when the caller single-steps (`flow`), time
 * and random ones only when they are to be logged or replayed here (`intercept_time`);
 * those KVM's emulator cannot execute always.  Returns 1 if it did (counted as one
 * instruction), 0 if not, -1 with *stop set (divergence or error reported).
 */
static int exec_special(struct kvmrr_vm *vm, bool flow, bool intercept_time,
                        struct kvmrr_result *res, int *stop)
{
    struct kvm_regs r = vm->run->s.regs.regs;
    uint64_t vm_rip_before = r.rip, vm_rflags_before = r.rflags;
    struct kvm_sregs s;
    struct insn in;
    if (cur_sregs(vm, &s) < 0 || insn_decode(vm, &r, &s, &in) < 0 || in.kind == INSN_NONE
        || in.kind == INSN_RDPID || in.kind == INSN_AFTER_BP)
        return 0;   /* RDPID: this host's emulator raises #UD for it, alike in every mode */
    if (in.kind == INSN_POPF) {
        uint64_t popped = 0;
        if (flow && guest_read(vm, &s, r.rsp, &popped, in.opsize == 2 ? 2 : 8) == 0
            && (popped & RFLAGS_TF)) {
            *stop = fail(res, vm, "%s, at icount %lld rip 0x%llx", "the guest sets RFLAGS.TF "
                         "(its own single-step trap) with POPF, which the core cannot keep "
                         "while it single-steps on this host");
            return -1;
        }
        return 0;   /* KVM executes POPF */
    }
    bool is_flow = in.kind == INSN_IRET || in.kind == INSN_PUSHF || in.kind == INSN_HLT;
    if (in.kind == INSN_IRET && in.opsize != 8)
        is_flow = false;   /* 16/32-bit IRET: this host's emulator gets them wrong */
    bool time = is_time_insn(in.kind, &r);
    if ((is_flow && !flow) || (time && !intercept_time) || (in.kind == INSN_RDMSR && !time))
        return 0;
    /* An interrupt injected at this boundary is delivered before the instruction here
     * executes, and only KVM_RUN delivers it: leave both to KVM (else a HLT executed here
     * sleeps with the interrupt stuck pending, and nothing ever delivers it). */
    struct kvm_vcpu_events pend;
    if (ioctl(vm->vcpu_fd, KVM_GET_VCPU_EVENTS, &pend) == 0
        && (pend.interrupt.injected || pend.exception.injected))
        return 0;
    if (time) {
        uint64_t rax, rdx, rcx = r.rcx;
        if (time_value(vm, in.kind, &rax, &rdx, &rcx, res, stop) < 0)
            return -1;
        if (in.kind == INSN_RDTSC || in.kind == INSN_RDTSCP || in.kind == INSN_RDMSR) {
            r.rax = (uint32_t)rax; r.rdx = (uint32_t)rdx;
            if (in.kind == INSN_RDTSCP) r.rcx = rcx;
        } else {
            uint64_t *dst = insn_gpr(&r, in.reg);
            *dst = in.opsize == 8 ? rax : in.opsize == 4 ? (uint32_t)rax
                   : ((*dst & ~0xffffull) | (uint16_t)rax);
            r.rflags = (r.rflags & ~0x8d5ull) | RFLAGS_CF;   /* CF=1, OF SF ZF AF PF = 0 */
        }
        r.rip += in.len;
    } else {
        char why[160];
        bool sregs_changed = false;
        int rc = insn_execute(vm, &r, &s, &in, &sregs_changed, why, sizeof(why));
        if (rc == EMU_RING3) {
            *stop = refuse_ring3(vm, res, "an IRET to CPL 3");
            return -1;
        }
        if (rc == 0 && in.kind == INSN_IRET && flow && (r.rflags & RFLAGS_TF)) {
            *stop = fail(res, vm, "%s, at icount %lld rip 0x%llx", "the guest sets RFLAGS.TF "
                         "(its own single-step trap) with IRET, which the core cannot keep "
                         "while it single-steps on this host");
            return -1;
        }
        if (rc < 0) {
            char what[224];
            snprintf(what, sizeof(what), "cannot execute %s: %s", insn_name(in.kind), why);
            *stop = fail(res, vm, "%s, at icount %lld rip 0x%llx", what);
            return -1;
        }
        if (sregs_changed && set_sregs(vm, &s) < 0) {
            *stop = fail(res, vm, "%s at icount %lld rip 0x%llx", "KVM_SET_SREGS failed");
            return -1;
        }
        if (in.kind == INSN_HLT)
            vm->halted = true;       /* as a HLT exit leaves it: after the HLT, halted */
    }
    /* An instruction that completes clears RF (IRET loads it: a fault handler's return
     * sets it so the restarted instruction skips its breakpoint); found by the fuzzer,
     * seed 1003: a PUSHF executed here after such an IRET kept RF set under step. */
    if (in.kind != INSN_IRET)
        r.rflags &= ~(1ull << 16);
    vm_set_regs(vm, &r);
    emulated_retired(vm, 1);
    /* Completed with TF set at its start (not an INT, not a fault delivered here, not
     * HLT, which waits): the guest's own single-step trap. */
    bool completed = in.kind == INSN_IRET
                     || (in.kind != INSN_INT3 && in.kind != INSN_INTN && in.kind != INSN_HLT
                         && r.rip == vm_rip_before + (uint64_t)in.len);
    if ((vm_rflags_before & RFLAGS_TF) && completed && guest_tf_trap(vm) < 0) {
        *stop = fail(res, vm, "%s at icount %lld rip 0x%llx", "cannot deliver the guest's "
                     "single-step trap (#DB)");
        return -1;
    }
    return 1;
}

/*
 * A read of a time MSR exited (the filter): the statistic counted the RDMSR; KVM finishes
 * it at the next KVM_RUN with the value given here.  The core treats it as its own
 * instruction: uncount, log or replay the value, finish it now (a KVM_RUN that returns
 * before entering the guest), count it.
 */
static int msr_exit(struct kvmrr_vm *vm, struct kvmrr_result *res)
{
    vm->stat_base++;
    if (vm->cfg.counter == KVMRR_COUNTER_FAST)
        vm->icount--;
    uint64_t rax, rdx, rcx = vm->run->msr.index;
    int stop = EXIT_AGAIN;
    if (!is_time_msr(rcx))
        return fail(res, vm, "%s at icount %lld rip 0x%llx", "an MSR read exited that the "
                    "filter does not hold");
    if (time_value(vm, INSN_RDMSR, &rax, &rdx, &rcx, res, &stop) < 0)
        return stop;
    vm->run->msr.data = (rdx << 32) | (uint32_t)rax;
    vm->run->msr.error = 0;
    vm->run->immediate_exit = 1;
    (void)ioctl(vm->vcpu_fd, KVM_RUN, 0);
    vm->run->immediate_exit = 0;
    struct kvm_regs r;
    if (vm_get_regs(vm, &r) < 0)
        return fail(res, vm, "%s at icount %lld rip 0x%llx", "KVM_GET_REGS failed");
    vm->run->s.regs.regs = r;
    emulated_retired(vm, 1);
    return EXIT_AGAIN;
}

/*
 * KVM_RUN ended in an emulation failure: the instruction at RIP is one this host's
 * emulator cannot execute (the statistic counted the attempt).  Undo that count and
 * execute it here, where the core can; otherwise a clear error naming it.
 */
static int emulation_failed(struct kvmrr_vm *vm, struct kvmrr_result *res)
{
    if (vm->run->internal.suberror != KVM_INTERNAL_ERROR_EMULATION)
        return fail(res, vm, "%s at icount %lld rip 0x%llx", "KVM internal error");
    vm->stat_base++;
    if (vm->cfg.counter == KVMRR_COUNTER_FAST)
        vm->icount--;
    int stop = EXIT_AGAIN;
    int r = exec_special(vm, true, true, res, &stop);
    if (r > 0)
        return EXIT_AGAIN;
    if (r < 0)
        return stop;
    struct kvm_sregs s;
    uint8_t bytes[4] = { 0 };
    if (cur_sregs(vm, &s) == 0)
        (void)guest_read(vm, &s, cur_rip(vm), bytes, sizeof(bytes));
    char what[160];
    snprintf(what, sizeof(what), "KVM's emulator cannot execute the instruction %02x %02x %02x "
             "%02x, nor can the core", bytes[0], bytes[1], bytes[2], bytes[3]);
    return fail(res, vm, "%s, at icount %lld rip 0x%llx", what);
}

/*
 * How long n instructions take at rate instructions/s, in ns, capped at an hour: the
 * product n * 1e9 overflows int64 beyond 9.2e9 instructions, and a kick further away than
 * that only needs to be "later", since the loop re-arms it at every exit.
 */
#define NS_CAP 3600000000000ll
static int64_t instructions_ns(kvmrr_icount_t n, int64_t rate)
{
    if (n <= 0 || rate <= 0)
        return 0;
    __int128 ns = (__int128)n * 1000000000 / rate;
    return ns > NS_CAP ? NS_CAP : (int64_t)ns;
}

static void track_rate(struct kvmrr_vm *vm, kvmrr_icount_t before, int64_t t0)
{
    int64_t dt = mono_ns() - t0;
    if (dt >= 1000000) {
        int64_t rate = (int64_t)((__int128)(vm->icount - before) * 1000000000 / dt);
        if (rate > vm->stats.peak_rate)
            vm->stats.peak_rate = rate;
    }
}

/*
 * Single-stepping with the exception handlers watched.  A single-step over an instruction
 * that faults gives no trap there: KVM delivers the exception and the trap comes after the
 * handler's first instruction, two instructions on.  The statistic counts the faulting
 * instruction as one (and the delivery as none), so the state "at the handler's first
 * instruction, frame pushed" is the one icount after the fault, and an exact stop, a
 * step count and a replay must be able to be there.  Hardware instruction breakpoints on
 * the handler entries of the four usual fault vectors (#UD, #GP, #PF, #DE; DR0-3 are all
 * there are) stop the step there.  A fault on another vector is seen by the statistic
 * where it exists (step_lost) and reported, never counted wrong silently.  A breakpoint
 * at the current RIP would re-hit at once, so that one is left off for the step.
 */
static const int watched_vectors[4] = { 6, 13, 14, 0 };

static int gate_target(struct kvmrr_vm *vm, const struct kvm_sregs *s, int vector,
                       uint64_t *target)
{
    uint8_t g[16];
    if ((uint64_t)vector * 16 + 15 > s->idt.limit
        || guest_read(vm, s, s->idt.base + (uint64_t)vector * 16, g, 16) < 0 || !(g[5] & 0x80))
        return -1;
    *target = (uint64_t)(g[0] | g[1] << 8) | (uint64_t)(g[6] | g[7] << 8) << 16
              | (uint64_t)(g[8] | g[9] << 8 | g[10] << 16) << 32 | (uint64_t)g[11] << 56;
    return 0;
}

/*
 * After a single-step stopped at a watched handler entry: KVM delivered the exception
 * with the debugger's TF set, and the RFLAGS image in the frame would give the guest a
 * real TF at its IRET (a #DB of its own, later, at a place that depends on the host).
 * Put the guest's own TF back there, as delivered() does for injected interrupts.
 */
static void mend_exception_frame(struct kvmrr_vm *vm, uint64_t guest_tf)
{
    uint64_t dr6 = vm->run->debug.arch.dr6;
    if (vm->debug_mode != DEBUG_STEP_WATCH || !(dr6 & 0xf) || (dr6 & (1ull << 14)))
        return;   /* not a handler-entry breakpoint (BS: an ordinary step) */
    int slot = __builtin_ctzll(dr6 & 0xf);
    int v = vm->watch_vec[slot];
    bool has_error = v == 8 || (v >= 10 && v <= 14) || v == 17 || v == 21 || v == 29 || v == 30;
    struct kvm_sregs s;
    uint64_t at = vm->run->s.regs.regs.rsp + (has_error ? 8 : 0) + 16, image;
    if (v < 0 || cur_sregs(vm, &s) < 0 || guest_read(vm, &s, at, &image, 8) < 0)
        return;
    image = (image & ~RFLAGS_TF) | guest_tf;
    (void)guest_write(vm, &s, at, &image, 8);
    /* A delivery clears RF: at the handler's first instruction it is clear, whatever
     * the stop at the breakpoint left there. */
    struct kvm_regs r = vm->run->s.regs.regs;
    if (r.rflags & RFLAGS_RF_VM & (1ull << 16)) {
        r.rflags &= ~(1ull << 16);
        vm_set_regs(vm, &r);
    }
}

static int step_debug(struct kvmrr_vm *vm, int extra_vector)
{
    struct kvm_sregs s;
    if (cur_sregs(vm, &s) < 0)
        return vm_set_guest_debug(vm, DEBUG_STEP, 0);
    struct kvm_guest_debug dbg = { .control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP };
    uint64_t dr7 = 0x400;   /* bit 10 reads as 1 */
    int n = 0, vec[4] = { -1, -1, -1, -1 };
    /* SWAPGS and the 0f ae group (FXSAVE, RDFSBASE, ...) lose the single-step trap here
     * (measured 2026-12-01, booting Linux 6.1: the step ends one instruction later), so
     * a breakpoint on the next instruction ends the step instead, in the #DE watch's
     * place.  (Where the trap is not lost, both stop at the same place: one exit.) */
    struct insn in;
    struct kvm_regs r = vm->run->s.regs.regs;
    bool after = extra_vector < 0 && insn_decode(vm, &r, &s, &in) == 0 && in.kind == INSN_AFTER_BP;
    for (int i = 0; i < 4; i++) {
        int v = i == 3 && extra_vector >= 0 ? extra_vector : watched_vectors[i];
        uint64_t t;
        if (i == 3 && after) {
            dbg.arch.debugreg[n] = r.rip + (uint64_t)in.len;
            vec[n] = -1;                         /* not a handler: nothing to mend */
            dr7 |= 1ull << (2 * n);
            n++;
            continue;
        }
        if (gate_target(vm, &s, v, &t) < 0)
            continue;
        dbg.arch.debugreg[n] = t;
        vec[n] = v;
        if (t != cur_rip(vm))
            dr7 |= 1ull << (2 * n);          /* Ln: enabled, execute, 1 byte */
        n++;
    }
    if (n == 0)
        return vm_set_guest_debug(vm, DEBUG_STEP, 0);
    dbg.arch.debugreg[7] = dr7;
    memcpy(vm->watch_vec, vec, sizeof(vec));
    if (vm->debug_mode == DEBUG_STEP_WATCH && vm->watch_n == n && vm->debug_bp == dr7
        && memcmp(vm->watch, dbg.arch.debugreg, sizeof(vm->watch)) == 0)
        return 0;
    dbg.control |= KVM_GUESTDBG_USE_HW_BP;
    if (ioctl(vm->vcpu_fd, KVM_SET_GUEST_DEBUG, &dbg) < 0)
        return -1;
    vm->debug_mode = DEBUG_STEP_WATCH;
    vm->debug_bp = dr7;
    vm->watch_n = n;
    memcpy(vm->watch, dbg.arch.debugreg, sizeof(vm->watch));
    return 0;
}

/*
 * A kick can end KVM_RUN between a fault and its delivery: the statistic has counted the
 * faulting instruction, the exception is queued.  That state has no register image of its
 * own (RIP is still the fault's), so the loop never stops in it: it lets KVM deliver the
 * exception and stops at the handler's first instruction (a breakpoint there), the state
 * a single-step reaches at the same count.
 */
static int settle_exception(struct kvmrr_vm *vm, bool events_synced)
{
    struct kvm_vcpu_events ev;
    if (exit_events(vm, events_synced, &ev) < 0)
        return -1;
    if (!ev.exception.injected && !ev.exception.pending)
        return 0;
    /* At CPL 3 a single-step is not stopped here (ring 3 runs natively): nothing is
     * settled, and the caller refuses ring 3 (exit_refused).  Seen as a record's kick
     * landed in ring 3 with an exception queued, under the #DB watch (1 run in 6). */
    struct kvm_sregs s;
    if (cur_sregs(vm, &s) == 0 && (s.cs.selector & 3) == 3)
        return 0;
    uint64_t guest_tf = vm->run->s.regs.regs.rflags & RFLAGS_TF;
    if (step_debug(vm, ev.exception.nr) < 0)
        return -1;
    int rc;
    /* A kick meant for the run before (a NIC packet, a stop request) may land here: the
     * step is taken again. */
    for (int tries = 0;; tries++) {
        vm->run->immediate_exit = 0;
        rc = ioctl(vm->vcpu_fd, KVM_RUN, 0);
        vm->stats.exits++;
        vm->sregs_synced = ran_synced(vm, rc, KVM_SYNC_X86_SREGS);
        if (rc == 0 || errno != EINTR || tries == 3)
            break;
    }
    if (rc < 0 || vm->run->exit_reason != KVM_EXIT_DEBUG)
        return -1;   /* the delivery itself failed (a double fault): reported as an error */
    mend_exception_frame(vm, guest_tf);
    return counter_sync(vm);
}

/*
 * How many such places a `fast` record watches with hardware breakpoints: none.  The
 * breakpoints do not fire reliably here: on the instruction right after an IRETQ that
 * KVM executes (a handler's return) they are skipped (measured: a loop of
 * "int $0x40; rdtsc" logs 66 RDTSC under fast against 735 under step in 8000
 * instructions; fuzzer seeds 2010 and 2017).  Until that is understood, `fast` refuses
 * a guest whose memory holds any, at once, and step records it.  The watch below is kept
 * for the host where it holds (set this to 3 there, the fourth register being the #DB
 * watch's, and test it with the fuzzer).
 */
#define TIME_SITES_WATCHED 0

/* The guest's #DB handler (IDT vector 1), if its gate is present. */
static bool db_handler(struct kvmrr_vm *vm, uint64_t *entry)
{
    struct kvm_sregs s;
    return cur_sregs(vm, &s) == 0 && gate_target(vm, &s, 1, entry) == 0;
}

/*
 * A `fast` record's free runs, watched with hardware breakpoints:
 *  - the places that may hold RDTSC, RDRAND or RDSEED (time_sites_scan), all of them,
 *    the one at the current RIP too: the loop enters at a site only with an interrupt or
 *    exception to deliver first (else exec_special executes the instruction there), and
 *    the handler's return must hit it;
 *  - the entry of the guest's #DB handler.  A guest that single-steps itself
 *    (RFLAGS.TF) takes its traps there.  Running free, KVM delivers them, but this host
 *    hides the guest's TF from a core that single-steps, and a replay single-steps before
 *    its asynchronous events: such a log could not be replayed, so the record stops at
 *    the guest's first #DB (guest_debug_used).  (A step record refuses the POPF that sets
 *    TF, exec_special.)  Not at the current RIP, where it would hit at once: the loop
 *    single-steps from there instead.
 */
static int record_watch_debug(struct kvmrr_vm *vm)
{
    struct kvm_guest_debug dbg = { .control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP };
    uint64_t dr7 = 0x400, entry;
    int n = 0;
    for (int i = 0; i < vm->time_sites && n < 3; i++) {
        dbg.arch.debugreg[n] = vm->time_site[i];
        dr7 |= 1ull << (2 * n++);
    }
    vm->db_entry = 0;
    if (db_handler(vm, &entry) && entry != cur_rip(vm)) {
        dbg.arch.debugreg[n] = entry;
        dr7 |= 1ull << (2 * n++);
        vm->db_entry = entry;
    }
    dbg.arch.debugreg[7] = dr7;
    if (vm->debug_mode == DEBUG_RECORD_WATCH && vm->debug_bp == dr7
        && memcmp(vm->watch, dbg.arch.debugreg, sizeof(vm->watch)) == 0)
        return 0;
    if (ioctl(vm->vcpu_fd, KVM_SET_GUEST_DEBUG, &dbg) < 0)
        return -1;
    vm->debug_mode = DEBUG_RECORD_WATCH;
    vm->debug_bp = dr7;
    memcpy(vm->watch, dbg.arch.debugreg, sizeof(vm->watch));
    return 0;
}

/*
 * The guest's own debug state, which a record must refuse:
 *  - a #DB it took: DR6 holds its cause (B0-B3, BD, BS, BT), set by KVM at the delivery;
 *    the core's own breakpoints never touch the guest's DR6;
 *  - breakpoints it armed in DR7.  The core's breakpoints take KVM's guest-debug
 *    registers, which leaves the guest's DR7 without effect in those runs and in effect
 *    in the others: it would take its breakpoints in some runs of a record or replay and
 *    not in others.
 * Checked at the #DB handler's watched entry (record_watch_debug), at least every
 * DEBUG_POLL_NS in a record's loop, and when a record's run ends (kvmrr_vm_run): a guest
 * that set its #DB gate and trapped between two exits, and cleared DR6 in its handler,
 * is the one case found only by a replay (which refuses it, in one line).
 */
#define DR6_TRAPS     0xe00full   /* B0-B3, BD, BS, BT */
#define DR7_ENABLES   0xffull     /* L0-L3, G0-G3 */
#define DEBUG_POLL_NS 10000000

static bool guest_debug_used(struct kvmrr_vm *vm, struct kvmrr_result *res, bool now)
{
    int64_t t = mono_ns();
    if (!now && t < vm->debug_poll_ns)
        return false;
    vm->debug_poll_ns = t + DEBUG_POLL_NS;
    struct kvm_debugregs d;
    if (ioctl(vm->vcpu_fd, KVM_GET_DEBUGREGS, &d) < 0)
        return false;
    char what[190];
    if (d.dr7 & DR7_ENABLES)
        snprintf(what, sizeof(what), "the guest enabled breakpoints of its own (DR7 0x%llx), "
                 "which the core cannot keep on this host: its own breakpoints use the debug "
                 "registers", (unsigned long long)d.dr7);
    else if (d.dr6 & DR6_TRAPS)
        snprintf(what, sizeof(what), "the guest took a #DB (DR6 0x%llx): its own "
                 "single-step trap (RFLAGS.TF) or breakpoint, which this host hides from a "
                 "core that single-steps, as a replay does", (unsigned long long)d.dr6);
    else
        return false;
    fail(res, vm, "%s, at icount %lld rip 0x%llx", what);
    return true;
}

/*
 * A debugger's code breakpoints (vm->user_bp, set by debug.c for one replay run): in the
 * free runs they are hardware instruction breakpoints beside DEBUG_BP's own, so that a
 * `continue` runs at full speed and stops before the instruction at one, at its exact
 * count; after a single-step, an instruction the core executed itself, or a kick, the
 * loop compares RIP instead (user_break_seen).  docs/debugging.md, "Speed".
 */
static int user_break_debug(struct kvmrr_vm *vm, int debug, uint64_t bp)
{
    struct kvm_guest_debug dbg = { .control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP };
    uint64_t dr7 = 0x400;
    int n = 0;
    if (debug == DEBUG_BP) {
        dbg.arch.debugreg[n] = bp;
        dr7 |= 1ull << (2 * n++);
    }
    for (int i = 0; i < vm->user_bp_n && n < 4; i++) {
        if ((debug == DEBUG_BP && vm->user_bp[i] == bp) || vm->user_bp[i] == vm->user_bp_skip)
            continue;
        dbg.arch.debugreg[n] = vm->user_bp[i];
        dr7 |= 1ull << (2 * n++);
    }
    dbg.arch.debugreg[7] = dr7;
    if (vm->debug_mode == DEBUG_USER_BP && vm->debug_bp == dr7
        && memcmp(vm->watch, dbg.arch.debugreg, sizeof(vm->watch)) == 0)
        return 0;
    if (ioctl(vm->vcpu_fd, KVM_SET_GUEST_DEBUG, &dbg) < 0)
        return -1;
    vm->debug_mode = DEBUG_USER_BP;
    vm->debug_bp = dr7;
    memcpy(vm->watch, dbg.arch.debugreg, sizeof(vm->watch));
    return 0;
}

/* The vCPU stands before the instruction at a user breakpoint (not after an I/O exit,
 * whose instruction is counted but RIP not yet moved past it).  Except at the entry of an
 * interrupt handler it stands at because the interrupt was just delivered (delivering:
 * injected before the run, no instruction retired since): single-stepped, the delivery
 * and the handler's first instruction are one step, so the stepping loop never stops
 * there, and neither does this; the next run leaves that breakpoint off (user_bp_skip),
 * else it would stop at once where it stands. */
static void user_break_seen(struct kvmrr_vm *vm, bool delivering)
{
    for (int i = 0; i < vm->user_bp_n; i++)
        if (vm->user_bp[i] == cur_rip(vm)) {
            if (delivering)
                vm->user_bp_skip = cur_rip(vm);
            else
                vm->user_bp_hit = true;
        }
}

/* One KVM_RUN: single-stepped (DEBUG_STEP), or free (DEBUG_OFF, or DEBUG_BP with a
 * hardware breakpoint at bp) with a kick at kick_at_ns (0: none). */
static int enter(struct kvmrr_vm *vm, int debug, uint64_t bp, int64_t kick_at_ns,
                 struct enter_result *er)
{
    bool single_step = debug == DEBUG_STEP;
    memset(er, 0, sizeof(*er));
    int rc_debug = single_step ? step_debug(vm, -1)
                   : debug == DEBUG_RECORD_WATCH ? record_watch_debug(vm)
                   : vm->user_bp_n ? user_break_debug(vm, debug, bp)
                   : vm_set_guest_debug(vm, debug, bp);
    if (rc_debug < 0)
        return -1;
    bool kicked = kick_at_ns > 0 && !single_step;
    if (kicked)
        kick_arm(vm, kick_at_ns);
    kvmrr_icount_t before = vm->icount;
    int64_t t0 = kicked ? mono_ns() : 0;
    uint64_t guest_tf = vm->run->s.regs.regs.rflags & RFLAGS_TF;
    int rc = ioctl(vm->vcpu_fd, KVM_RUN, 0);
    int saved = errno;
    vm->run->immediate_exit = 0;
    vm->stats.exits++;
    vm->sregs_synced = ran_synced(vm, rc, KVM_SYNC_X86_SREGS);
    bool events_synced = ran_synced(vm, rc, KVM_SYNC_X86_EVENTS);
    if (kicked && mono_ns() < kick_at_ns)
        kick_arm(vm, 0);    /* a one-shot timer past its time is disarmed already */
    if (rc < 0 && saved != EINTR && saved != EAGAIN) {
        errno = saved;
        return -1;
    }
    er->exit_reason = rc < 0 ? KVM_EXIT_INTR : vm->run->exit_reason;
    if (er->exit_reason == KVM_EXIT_INTR)
        vm->stats.kicks++;
    if (single_step)
        vm->stats.steps++;
    if (single_step && er->exit_reason == KVM_EXIT_DEBUG)
        mend_exception_frame(vm, guest_tf);
    if (debug == DEBUG_BP && er->exit_reason == KVM_EXIT_DEBUG)
        vm->stats.breakpoints++;
    if (vm->frame_rflags_gpa) {
        /* A kick can end KVM_RUN before or after the delivery: ask KVM which.  A frame
         * left armed after a delivery would be "mended" later, at whatever the guest has
         * since put at that stack address. */
        struct kvm_vcpu_events pend;
        bool pending = er->exit_reason == KVM_EXIT_INTR
                       && exit_events(vm, events_synced, &pend) == 0
                       && pend.interrupt.injected;
        if (!pending) {
            if (single_step)
                delivered(vm);
            vm->frame_rflags_gpa = 0;   /* delivered free-running: nothing to mend */
        }
    }
    if (vm->cfg.counter == KVMRR_COUNTER_FAST) {
        if (counter_sync(vm) < 0)
            return -1;
        if (kicked)
            track_rate(vm, before, t0);
        if (er->exit_reason == KVM_EXIT_INTR && settle_exception(vm, events_synced) < 0)
            return -1;
    } else if (er->exit_reason == KVM_EXIT_DEBUG && vm->in_completing) {
        /* The trap that ends an IN's completion: that IN was counted at its I/O exit. */
    } else if (er->exit_reason == KVM_EXIT_DEBUG || er->exit_reason == KVM_EXIT_IO
               || er->exit_reason == KVM_EXIT_HLT) {
        vm->icount++;
    }
    if (er->exit_reason != KVM_EXIT_INTR) {
        vm->in_pending = er->exit_reason == KVM_EXIT_IO && vm->run->io.direction == KVM_EXIT_IO_IN;
        vm->in_completing = single_step && vm->in_pending;
    }
    struct kvm_sregs s;
    er->ring3 = cur_sregs(vm, &s) == 0 && (s.cs.selector & 3) == 3;
    /* step is its own counter; where the statistic exists it cross-checks every step. */
    uint64_t stat;
    if (vm->cfg.counter == KVMRR_COUNTER_STEP && (er->exit_reason == KVM_EXIT_DEBUG
        || er->exit_reason == KVM_EXIT_IO || er->exit_reason == KVM_EXIT_HLT)
        && counter_read_stat(vm, &stat) == 0)
        er->step_lost = (kvmrr_icount_t)(stat - vm->stat_base) != vm->icount;
    return 0;
}

/* When to kick a free-running vCPU so it stops short of target, within near of it. */
static int64_t approach_kick(struct kvmrr_vm *vm, kvmrr_icount_t target, kvmrr_icount_t near)
{
    kvmrr_icount_t remaining = target - vm->icount - near / 2;
    /* At twice the fastest rate seen, each kick halves the distance left; a breakpoint
     * approach (near < KVMRR_NEAR) converges faster at 1.5 times, for fewer kicks. */
    int64_t rate = near == KVMRR_NEAR ? vm->stats.peak_rate * 2 : vm->stats.peak_rate * 3 / 2;
    if (rate < MIN_RATE_GUESS)
        rate = MIN_RATE_GUESS;
    int64_t ns = instructions_ns(remaining, rate);
    return mono_ns() + (ns > 20000 ? ns : 20000);
}

static int64_t earliest(int64_t a, int64_t b)
{
    if (!a) return b;
    if (!b) return a;
    return a < b ? a : b;
}

/* ---------------------------------------------------------------- port I/O */

static void *io_data(struct kvmrr_vm *vm)
{
    return (uint8_t *)vm->run + vm->run->io.data_offset;
}

static int read_io(struct kvmrr_vm *vm, struct pio_access *io)
{
    struct kvm_run *run = vm->run;
    if (run->io.count != 1 || run->io.size > 4)
        return -1;   /* string I/O is not part of the guest ABI */
    memset(io, 0, sizeof(*io));
    io->port = run->io.port;
    io->size = run->io.size;
    io->write = run->io.direction == KVM_EXIT_IO_OUT;
    if (io->write) {
        uint32_t v = 0;
        memcpy(&v, io_data(vm), io->size);
        io->value = v;
    }
    return 0;
}

static void complete_read(struct kvmrr_vm *vm, const struct pio_access *io)
{
    uint32_t v = (uint32_t)io->value;
    memcpy(io_data(vm), &v, io->size);
}

/* ---------------------------------------------------------------- live: run & record */

static void arm_timer(struct kvmrr_vm *vm)
{
    vm->next_tick_ns = vm->dev.timer_period_ns ? mono_ns() + (int64_t)vm->dev.timer_period_ns : 0;
}

static void tick_if_due(struct kvmrr_vm *vm, int64_t now)
{
    if (!vm->next_tick_ns || now < vm->next_tick_ns)
        return;
    vm->timer_pending = true;   /* ticks missed meanwhile coalesce into this one */
    vm->next_tick_ns += (int64_t)vm->dev.timer_period_ns;
    if (vm->next_tick_ns <= now)
        vm->next_tick_ns = now + (int64_t)vm->dev.timer_period_ns;
}

/* A due tick can be delivered now: the interrupt controller lets it through, and on the
 * PC machine the last one is far enough behind (PC_TICK_MIN_GAP). */
static bool tick_deliverable(struct kvmrr_vm *vm)
{
    if (!vm->timer_pending || devices_timer_vector(&vm->dev) < 0)
        return false;
    return vm->dev.machine != KVMRR_MACHINE_PC || vm->halted
           || vm->icount - vm->last_tick_icount >= PC_TICK_MIN_GAP;
}

static bool nic_deliverable(struct kvmrr_vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    bool any = vm->nic_count > 0;
    pthread_mutex_unlock(&vm->lock);
    return any && devices_nic_ready(&vm->dev, vm->cfg.mem_size);
}

/* Inject what is pending, if the guest can take an interrupt now.  The timer first. */
static int live_inject(struct kvmrr_vm *vm)
{
    bool tick = tick_deliverable(vm);
    bool nic = nic_deliverable(vm);
    if (!tick && !nic)
        return 0;
    if (!injectable(vm))
        return 0;
    if (tick) {
        int vector = devices_timer_vector(&vm->dev);
        if (inject(vm, (uint32_t)vector) < 0)
            return -1;
        devices_timer_delivered(&vm->dev);
        vm->timer_pending = false;
        vm->last_tick_icount = vm->icount;
        record(vm, KVMRR_EV_INTERRUPT, (uint64_t)vector, 0, 0, 0, NULL, 0);
        return 0;
    }
    struct nic_packet pkt;
    pthread_mutex_lock(&vm->lock);
    pkt = vm->nic_queue[vm->nic_head];
    vm->nic_head = (vm->nic_head + 1) % KVMRR_NIC_QUEUE;
    vm->nic_count--;
    pthread_mutex_unlock(&vm->lock);
    uint64_t gpa = vm->dev.nic_rx_addr;
    uint32_t n = devices_nic_deliver(&vm->dev, vm->mem, pkt.data, pkt.len);
    if (inject(vm, KVMRR_VEC_NIC_RX) < 0)
        return -1;
    record(vm, KVMRR_EV_DMA, gpa, 0, 0, 0, pkt.data, n);
    record(vm, KVMRR_EV_INTERRUPT, KVMRR_VEC_NIC_RX, 0, 0, 0, NULL, 0);
    return 0;
}

static bool something_to_inject(struct kvmrr_vm *vm)
{
    return tick_deliverable(vm) || nic_deliverable(vm);
}

/* A halted guest waits for the timer, a packet, the deadline or a stop request. */
static void live_wait(struct kvmrr_vm *vm, int64_t deadline_ns)
{
    int64_t until = earliest(vm->next_tick_ns, deadline_ns);
    int64_t now = mono_ns();
    int timeout_ms = -1;
    if (until) {
        int64_t d = until - now;
        timeout_ms = d <= 0 ? 0 : (int)((d + 999999) / 1000000);
    }
    if (timeout_ms > 50 || timeout_ms < 0)
        timeout_ms = 50;    /* re-check the stop flag now and then */
    struct pollfd pfd = { .fd = vm->wake_fd, .events = POLLIN };
    if (poll(&pfd, 1, timeout_ms) > 0) {
        uint64_t v;
        if (read(vm->wake_fd, &v, sizeof(v)) < 0) { /* drained by another wait */ }
    }
}

static void record_checksum(struct kvmrr_vm *vm)
{
    struct kvmrr_event ev = { .kind = KVMRR_EV_CHECKSUM, .icount = vm->icount,
                              .rip = cur_rip(vm), .a = state_hash(vm) };
    struct kvm_regs r;
    if (vm_get_regs(vm, &r) == 0)
        vm_regs_to_array(&r, ev.regs);
    vm->stats.events++;
    queue_push(&vm->recorded, &ev, NULL, 0);
    vm->last_checksum = vm->icount;
}

static int live_io(struct kvmrr_vm *vm, struct kvmrr_result *res)
{
    struct pio_access io;
    if (read_io(vm, &io) < 0)
        return fail(res, vm, "%s at icount %lld rip 0x%llx", "unsupported string or wide port I/O");
    switch (devices_pio(&vm->dev, vm->mem, vm->cfg.mem_size, &io)) {
    case PIO_DONE:
        if (!io.write)
            complete_read(vm, &io);
        return EXIT_AGAIN;
    case PIO_INPUT: {
        /* (on the PC machine a write may take an input too: a PIT count starts at a
         * time the host decides; completing a write's data changes nothing) */
        uint64_t v = io.input == INPUT_WALL_NS ? (uint64_t)wall_ns()
                     : io.input == INPUT_MONO_NS ? (uint64_t)mono_ns()
                     : (uint32_t)host_random64();
        uint64_t period = vm->dev.timer_period_ns;
        devices_input_apply(&vm->dev, &io, v);
        if (!io.write)
            complete_read(vm, &io);
        record(vm, KVMRR_EV_PORT_IN, io.port, io.size, v, 0, NULL, 0);
        if (vm->dev.timer_period_ns != period)
            arm_timer(vm);
        return EXIT_AGAIN;
    }
    case PIO_OUTPUT:
        record(vm, KVMRR_EV_OUTPUT, io.channel, vm->dev.output_seq++, 0, 0, io.out_data, io.out_len);
        /* limits.stop_at_output: a response ends the run here (a stop like the deadline's),
         * so that its commit starts now, not at the slice's end (docs/ARCHITECTURE.md §4.5). */
        if (io.channel == KVMRR_CHANNEL_NIC && vm->stop_at_output)
            __atomic_store_n(&vm->stop_requested, 1, __ATOMIC_RELEASE);
        return EXIT_AGAIN;
    case PIO_TIMER:
        arm_timer(vm);
        return EXIT_AGAIN;
    case PIO_RX_ACK:
        return EXIT_AGAIN;
    case PIO_EXIT:
        if (devices_serial_flush(&vm->dev, &io))
            record(vm, KVMRR_EV_OUTPUT, io.channel, vm->dev.output_seq++, 0, 0, io.out_data, io.out_len);
        result_set(res, vm, KVMRR_STOP_EXITED);
        res->exit_code = (int32_t)io.value;
        return EXIT_STOP;
    case PIO_BAD:
    default: {
        char what[64];
        snprintf(what, sizeof(what), "%s of port 0x%x (size %d)", io.write ? "write" : "read",
                 io.port, io.size);
        return fail(res, vm, "guest %s, which no device claims, at icount %lld rip 0x%llx", what);
    }
    }
}

/* Exits every mode handles alike. */
static int common_exit(struct kvmrr_vm *vm, uint32_t reason, struct kvmrr_result *res)
{
    switch (reason) {
    case KVM_EXIT_INTR:
    case KVM_EXIT_DEBUG:
    case KVM_EXIT_IRQ_WINDOW_OPEN:
        return EXIT_AGAIN;
    case KVM_EXIT_HLT:
        vm->halted = true;
        return EXIT_AGAIN;
    case KVM_EXIT_SHUTDOWN:
        return fail(res, vm, "%s at icount %lld rip 0x%llx", "guest triple fault (shutdown)");
    case KVM_EXIT_FAIL_ENTRY:
        return fail(res, vm, "%s at icount %lld rip 0x%llx", "KVM could not enter the guest");
    case KVM_EXIT_INTERNAL_ERROR:
        return fail(res, vm, "%s at icount %lld rip 0x%llx", "KVM internal error (emulation failed)");
    default: {
        char what[64];
        snprintf(what, sizeof(what), "unexpected KVM exit %u", reason);
        return fail(res, vm, "%s at icount %lld rip 0x%llx", what);
    }
    }
}

/* What an exit tells about the guest that the core cannot count or log: an error. */
static bool exit_refused(struct kvmrr_vm *vm, const struct enter_result *er,
                         struct kvmrr_result *res)
{
    if (er->ring3) {
        refuse_ring3(vm, res, "found at CPL 3 at an exit");
        return true;
    }
    if (er->step_lost) {
        fail(res, vm, "%s (at icount %lld rip 0x%llx)", "single-stepping lost count of an "
             "instruction: an exception on a vector the step does not watch");
        return true;
    }
    return false;
}

static bool stop_now(struct kvmrr_vm *vm, const struct kvmrr_limits *lim,
                     struct kvmrr_result *res)
{
    if (lim->stop_icount >= 0 && vm->icount >= lim->stop_icount) {
        if (vm->icount > lim->stop_icount)
            fail(res, vm, "%s (at icount %lld rip 0x%llx)", "ran past the stop icount: kick too late");
        else
            result_set(res, vm, KVMRR_STOP_ICOUNT);
        return true;
    }
    if (__atomic_exchange_n(&vm->stop_requested, 0, __ATOMIC_ACQ_REL)
        || (lim->deadline_ns && mono_ns() >= lim->deadline_ns)) {
        result_set(res, vm, KVMRR_STOP_DEADLINE);
        return true;
    }
    return false;
}

static void live_run(struct kvmrr_vm *vm, const struct kvmrr_limits *lim, struct kvmrr_result *res)
{
    bool step = vm->cfg.counter == KVMRR_COUNTER_STEP;
    bool recording = vm->cfg.mode == KVMRR_MODE_RECORD;
    vm->stop_at_output = lim->stop_at_output != 0;
    if (vm->dev.timer_period_ns && !vm->next_tick_ns)
        arm_timer(vm);    /* after a restore, or the first run */
    /* Scanned once, as the image was loaded: a takeover or a restored snapshot continues
     * a log whose record made the check at its start (its RAM by then holds guest data,
     * where the bytes match by chance). */
    if (recording && !step && !vm->time_scanned && vm->icount == 0) {
        vm->time_scanned = true;
        int n = time_sites_scan(vm, vm->time_site, 4);
        if (n > TIME_SITES_WATCHED) {
            char what[200];
            snprintf(what, sizeof(what), "guest memory holds %d place(s) that may be RDTSC, "
                     "RDRAND or RDSEED (the first at 0x%llx), which this host's emulator runs "
                     "unseen by `fast`; record with --mode step", n,
                     (unsigned long long)vm->time_site[0]);
            fail(res, vm, "%s (at icount %lld rip 0x%llx)", what);
            return;
        }
        vm->time_sites = n;
    }
    for (;;) {
        if (stop_now(vm, lim, res))
            return;
        if (vm->recorded.count >= KVMRR_RECORD_CAP - 4) {
            result_set(res, vm, KVMRR_STOP_EVENTS_FULL);
            return;
        }
        tick_if_due(vm, mono_ns());
        if (recording && vm->cfg.checksum_every
            && vm->icount - vm->last_checksum >= vm->cfg.checksum_every)
            record_checksum(vm);
        if (live_inject(vm) < 0) {
            fail(res, vm, "%s at icount %lld rip 0x%llx", "KVM_INTERRUPT failed");
            return;
        }
        if (vm->halted && vm->dev.machine == KVMRR_MACHINE_PC
            && !(vm->run->s.regs.regs.rflags & RFLAGS_IF)) {
            fail(res, vm, "%s at icount %lld rip 0x%llx", "the guest halted with interrupts "
                 "off: it can never go on");
            return;
        }
        if (vm->halted) {
            live_wait(vm, lim->deadline_ns);
            continue;
        }
        if (recording && guest_debug_used(vm, res, false))
            return;
        bool near = lim->stop_icount >= 0 && lim->stop_icount - vm->icount <= KVMRR_NEAR;
        uint64_t db;
        bool watch = recording && !step;
        bool single = step || near || (watch && db_handler(vm, &db) && db == cur_rip(vm));
        if (!single && vm->time_sites && recording) {
            int stop = EXIT_AGAIN;
            int r = exec_special(vm, false, true, res, &stop);
            if (r < 0)
                return;
            if (r > 0)
                continue;
        }
        if (single) {
            int stop = EXIT_AGAIN;
            int r = exec_special(vm, true, true, res, &stop);
            if (r < 0)
                return;
            if (r > 0)
                continue;
        }
        int64_t kick = earliest(vm->next_tick_ns, lim->deadline_ns);
        /* An exit at least this often: code that never exits (a loop in ring 3, which
         * runs natively here) is found within a second. */
        if (!single)
            kick = earliest(kick, mono_ns() + BACKSTOP_NS);
        if (lim->stop_icount >= 0 && !single)
            kick = earliest(kick, approach_kick(vm, lim->stop_icount, KVMRR_NEAR));
        /* A pending tick the guest cannot take yet: exit as soon as it can. */
        vm->run->request_interrupt_window = !single && something_to_inject(vm);
        struct enter_result er;
        int free_debug = watch ? DEBUG_RECORD_WATCH : DEBUG_OFF;
        if (enter(vm, single ? DEBUG_STEP : free_debug, 0, kick, &er) < 0) {
            char what[80];
            snprintf(what, sizeof(what), "KVM_RUN failed (%s)", strerror(errno));
            fail(res, vm, "%s at icount %lld rip 0x%llx", what);
            return;
        }
        if (exit_refused(vm, &er, res))
            return;
        if (er.exit_reason == KVM_EXIT_DEBUG && vm->debug_mode == DEBUG_RECORD_WATCH
            && vm->db_entry && cur_rip(vm) == vm->db_entry && guest_debug_used(vm, res, true))
            return;
        int k = er.exit_reason == KVM_EXIT_IO ? live_io(vm, res)
                : er.exit_reason == KVM_EXIT_INTERNAL_ERROR ? emulation_failed(vm, res)
                : er.exit_reason == KVM_EXIT_X86_RDMSR ? msr_exit(vm, res)
                : common_exit(vm, er.exit_reason, res);
        if (k == EXIT_STOP)
            return;
    }
}

/* ---------------------------------------------------------------- replay */

static bool is_async(const struct kvmrr_event *ev)
{
    return ev->kind == KVMRR_EV_INTERRUPT || ev->kind == KVMRR_EV_DMA
           || ev->kind == KVMRR_EV_CHECKSUM;
}

static const char *kind_name(int kind)
{
    static const char *names[] = { "?", "Interrupt", "Dma", "PortIn", "MmioRead", "Insn",
                                   "Output", "Checksum" };
    return kind >= 0 && kind <= KVMRR_EV_CHECKSUM ? names[kind] : "?";
}

static void complete_pending_in(struct kvmrr_vm *vm);

/* Apply an asynchronous event at exactly its icount.  EXIT_AGAIN, or stop. */
static int replay_async(struct kvmrr_vm *vm, struct kvmrr_event *ev, struct kvmrr_result *res)
{
    /* An IN that exited at this icount is finished (RAX written, RIP past it) by the next
     * KVM_RUN, which on record may have been cut short by a kick right after finishing
     * it: then the event was taken at the same icount with RIP after the IN.  Finish the
     * IN the same way (it retires nothing more) before comparing. */
    if (vm->in_pending && ev->rip != cur_rip(vm))
        complete_pending_in(vm);
    if (ev->rip != cur_rip(vm))
        return diverge(vm, res, ev, 0, "RIP differs at the logged icount");
    switch (ev->kind) {
    case KVMRR_EV_INTERRUPT:
        if (!injectable(vm))
            return diverge(vm, res, ev, 0, "the log injects an interrupt where the guest "
                                           "cannot take one");
        /* The PC machine's ticks pass its PIC, whose state the replay keeps too: it must
         * let the same vector through, and then has it in service. */
        bool tick = vm->dev.machine == KVMRR_MACHINE_PC || ev->a == KVMRR_VEC_TIMER;
        if (tick && devices_timer_vector(&vm->dev) != (int)ev->a)
            return diverge(vm, res, ev, 0, "the log injects a timer vector the interrupt "
                                           "controller would not deliver here");
        if (inject(vm, (uint32_t)ev->a) < 0)
            return fail(res, vm, "%s at icount %lld rip 0x%llx", "KVM_INTERRUPT failed");
        if (tick)
            devices_timer_delivered(&vm->dev);
        break;
    case KVMRR_EV_DMA:
        if (!devices_nic_ready(&vm->dev, vm->cfg.mem_size) || ev->a != vm->dev.nic_rx_addr
            || ev->len > vm->dev.nic_rx_cap)
            return diverge(vm, res, ev, 0, "the log delivers a packet the NIC cannot take");
        devices_nic_deliver(&vm->dev, vm->mem, ev->data, ev->len);
        break;
    case KVMRR_EV_CHECKSUM: {
        uint64_t h = state_hash(vm);
        if (h != ev->a) {
            diverge(vm, res, ev, KVMRR_EV_CHECKSUM, "state hash differs from the record");
            vm->div.actual_hash = h;
            return EXIT_STOP;
        }
        vm->last_checksum = vm->icount;
        break;
    }
    }
    vm->stats.events++;
    queue_pop(&vm->replay);
    return EXIT_AGAIN;
}

static int replay_io(struct kvmrr_vm *vm, struct kvmrr_result *res)
{
    struct pio_access io;
    if (read_io(vm, &io) < 0)
        return fail(res, vm, "%s at icount %lld rip 0x%llx", "unsupported string or wide port I/O");
    struct kvmrr_event *ev = queue_peek(&vm->replay);
    enum pio_effect eff = devices_pio(&vm->dev, vm->mem, vm->cfg.mem_size, &io);
    switch (eff) {
    case PIO_DONE:
        if (!io.write)
            complete_read(vm, &io);
        return EXIT_AGAIN;
    case PIO_INPUT:
        if (!ev || ev->kind != KVMRR_EV_PORT_IN || ev->icount != vm->icount || ev->a != io.port)
            return diverge(vm, res, ev, KVMRR_EV_PORT_IN, "the guest read an input port "
                                                          "the log does not hold here");
        if (ev->rip != cur_rip(vm))
            return diverge(vm, res, ev, KVMRR_EV_PORT_IN, "RIP differs at the logged icount");
        devices_input_apply(&vm->dev, &io, ev->c);
        if (!io.write)
            complete_read(vm, &io);
        vm->stats.events++;
        queue_pop(&vm->replay);
        return EXIT_AGAIN;
    case PIO_OUTPUT: {
        uint64_t seq = vm->dev.output_seq++;
        if (!ev || ev->kind != KVMRR_EV_OUTPUT || ev->icount != vm->icount
            || ev->a != (uint64_t)io.channel || ev->b != seq || ev->len != io.out_len
            || memcmp(ev->data, io.out_data, io.out_len) != 0 || ev->rip != cur_rip(vm))
            return diverge(vm, res, ev, KVMRR_EV_OUTPUT, "the guest's output differs from "
                                                         "the record");
        log_event(vm, KVMRR_EV_OUTPUT, io.channel, seq, 0, 0, io.out_data, io.out_len);
        queue_pop(&vm->replay);
        return EXIT_AGAIN;
    }
    case PIO_TIMER:
    case PIO_RX_ACK:
        return EXIT_AGAIN;   /* time does not drive a replay: the log does */
    case PIO_EXIT:
        if (devices_serial_flush(&vm->dev, &io)) {
            uint64_t seq = vm->dev.output_seq++;
            if (!ev || ev->kind != KVMRR_EV_OUTPUT || ev->b != seq || ev->len != io.out_len
                || memcmp(ev->data, io.out_data, io.out_len) != 0)
                return diverge(vm, res, ev, KVMRR_EV_OUTPUT, "the guest's output differs "
                                                             "from the record");
            log_event(vm, KVMRR_EV_OUTPUT, io.channel, seq, 0, 0, io.out_data, io.out_len);
            queue_pop(&vm->replay);
        }
        result_set(res, vm, KVMRR_STOP_EXITED);
        res->exit_code = (int32_t)io.value;
        return EXIT_STOP;
    default:
        return fail(res, vm, "%s at icount %lld rip 0x%llx", "guest accessed a port no device claims");
    }
}

/*
 * How to approach an asynchronous event (`fast`, an exact stop at its icount): run free
 * under approach kicks (DEBUG_OFF), single-step (DEBUG_STEP), or run to a hardware
 * breakpoint on the event's RIP (DEBUG_BP).  At the event's icount the guest is at its
 * RIP, so the breakpoint stops it there exactly, however far the run would have gone:
 * no kick and no single-step needed.  Each earlier pass over that RIP stops short of the
 * count; the loop steps over it (one single-step, breakpoint off: re-entering at a
 * breakpoint re-hits it) and runs on.
 *
 * What a pass costs decides the rest, so the loop learns how far apart the passes come
 * (bp_period, from two of them):
 *  - far from the event (beyond KVMRR_NEAR) the breakpoint is used while passes are rarer
 *    than every BP_FAR_PERIOD instructions; a RIP passed more often (a hot loop) is
 *    approached by kicks as before, to within KVMRR_NEAR;
 *  - within KVMRR_NEAR, unless passes come more often than every BP_MIN_PERIOD
 *    instructions (a pass costs about four single-steps here), then that is single-stepped;
 *  - a divergence should still be found at the logged icount, not a loop later: the part
 *    of the stretch shorter than the period is single-stepped (in a faithful replay the
 *    next pass then is the target, and nothing is lost).  Before two passes have been
 *    seen nothing bounds the next one, so a divergence there is found later (at the next
 *    pass, exit or backstop kick: the loop's "passed a logged event" report), never
 *    missed: a faithful replay is exact either way.
 * Without working breakpoints (hwbp_usable) the last KVMRR_NEAR are single-stepped.
 */
#define BP_MIN_PERIOD 4
#define BP_FAR_PERIOD 512
#define BP_NEAR       80

/* Where kicks end and the exact approach begins.  With a breakpoint the approach costs two
 * exits per pass of the event's RIP (stop, step over), so it starts closer: at 1 kHz the
 * ticks guest's hot loop passed it about 22 times per event from KVMRR_NEAR, 5 from 80
 * (docs/ARCHITECTURE.md §8).  A kick reaches a running vCPU within microseconds of its
 * time (measured: 90% within 10 us; the long tails are the thread off the CPU, when the
 * guest does not run either); the margin (near / 2 instructions, and the rate taken at
 * 1.5 times the fastest seen) covers that. */
static kvmrr_icount_t approach_near(struct kvmrr_vm *vm, const struct kvmrr_event *ev,
                                    kvmrr_icount_t target)
{
    (void)vm;
    return ev && target == ev->icount && hwbp_usable() ? BP_NEAR : KVMRR_NEAR;
}

static int approach_debug(struct kvmrr_vm *vm, const struct kvmrr_event *ev,
                          kvmrr_icount_t target)
{
    kvmrr_icount_t remaining = target - vm->icount;
    bool near = remaining <= approach_near(vm, ev, target);
    int fallback = near ? DEBUG_STEP : DEBUG_OFF;
    if (!ev || target != ev->icount || !hwbp_usable())
        return fallback;
    if (vm->bp_target != target || vm->bp_rip != ev->rip) {
        vm->bp_target = target;
        vm->bp_rip = ev->rip;
        vm->bp_last_hit = -1;
        vm->bp_period = 0;
    }
    kvmrr_icount_t period = vm->bp_period;
    if (period && (period < BP_MIN_PERIOD || remaining + 1 < period
                   || (!near && period < BP_FAR_PERIOD)))
        return fallback;
    if (cur_rip(vm) == ev->rip)
        return DEBUG_STEP;    /* on the breakpoint short of the count: step over it */
    return DEBUG_BP;
}

/* A stop at the event's RIP, at the breakpoint or by a step (the loop stops there if the
 * count is the target's). */
static void bp_hit(struct kvmrr_vm *vm)
{
    if (vm->bp_last_hit >= 0 && vm->icount - vm->bp_last_hit > vm->bp_period)
        vm->bp_period = vm->icount - vm->bp_last_hit;
    vm->bp_last_hit = vm->icount;
}

/* An approach kick can fire before the vCPU runs an instruction: here entering KVM_RUN
 * can take longer than the shortest kick (20 us; about a fifth of a 1 kHz replay's kicks
 * ran nothing, docs/ARCHITECTURE.md §8).  Each such kick is re-armed as short, so a host
 * slow enough to stall every one (heavily loaded, or traced: a replay under `perf trace`
 * made no progress in 40 s) would never get there.  After this many in a row the loop
 * single-steps once, which always makes progress and cannot pass the target. */
#define STALLED_KICKS_MAX 3

/* Under a breakpoint a faithful replay cannot pass the target; this kick only bounds how
 * far a diverged one runs on before the loop notices (at a tenth of the peak rate). */
static int64_t backstop_kick(struct kvmrr_vm *vm, kvmrr_icount_t target)
{
    int64_t rate = vm->stats.peak_rate > 1000000 ? vm->stats.peak_rate / 10 : 100000;
    return mono_ns() + 1000000 + instructions_ns(target - vm->icount, rate);
}

static void replay_run(struct kvmrr_vm *vm, const struct kvmrr_limits *lim,
                       struct kvmrr_result *res)
{
    bool step = vm->cfg.counter == KVMRR_COUNTER_STEP;
    for (;;) {
        struct kvmrr_event *ev = queue_peek(&vm->replay);
        if (ev && ev->icount < vm->icount) {
            char why[96];
            snprintf(why, sizeof(why), "the replay passed a logged %s without meeting it",
                     kind_name(ev->kind));
            diverge(vm, res, ev, 0, why);
            return;
        }
        /* Events at this very icount come before any stop. */
        if (ev && ev->icount == vm->icount && is_async(ev)) {
            if (replay_async(vm, ev, res) == EXIT_STOP)
                return;
            continue;
        }
        if (vm->user_bp_hit) {          /* before any other stop, as debug.c's steps */
            vm->user_bp_hit = false;
            result_set(res, vm, STOP_USER_BREAK);
            return;
        }
        if (stop_now(vm, lim, res))
            return;
        if (vm->recorded.count >= KVMRR_RECORD_CAP - 4) {
            result_set(res, vm, KVMRR_STOP_EVENTS_FULL);
            return;
        }
        /* Past the last fed event the replay may run only as far as the log is known to
         * hold nothing more (the horizon): never into events it has not seen. */
        kvmrr_icount_t limit = lim->stop_icount >= 0 && lim->stop_icount < vm->horizon
                               ? lim->stop_icount : vm->horizon;
        if (!ev && vm->icount >= limit) {
            result_set(res, vm, KVMRR_STOP_NEED_EVENTS);
            return;
        }
        if (vm->halted) {
            if (!ev) {
                result_set(res, vm, KVMRR_STOP_NEED_EVENTS);
                return;
            }
            diverge(vm, res, ev, 0, "the guest halted, but the log has it run on");
            return;
        }
        kvmrr_icount_t target = ev ? ev->icount : limit;
        if (lim->stop_icount >= 0 && lim->stop_icount < target)
            target = lim->stop_icount;
        /* Exact stop needed unless the next thing is a synchronous event the guest's own
         * exit will bring us to. */
        bool exact = !ev || is_async(ev) || ev->kind == KVMRR_EV_INSN || target != ev->icount;
        int debug = step ? DEBUG_STEP : exact ? approach_debug(vm, ev, target) : DEBUG_OFF;
        if (debug == DEBUG_OFF && exact && vm->stalled_kicks >= STALLED_KICKS_MAX)
            debug = DEBUG_STEP;
        bool single = debug == DEBUG_STEP;
        /* The guest's own TF, set while it ran free (a POPF or IRET KVM executed), would
         * be lost by the first single-step of an approach (guest_tf_trap's comment): its
         * trap never comes, and the replay would diverge later, not here.  Refused in
         * one line instead, as a POPF that sets it under a single-step is. */
        if (single && !step && (vm->run->s.regs.regs.rflags & RFLAGS_TF)) {
            fail(res, vm, "%s, at icount %lld rip 0x%llx", "the guest runs with RFLAGS.TF "
                 "(its own single-step trap) set where the replay must single-step, which "
                 "the core cannot keep on this host");
            return;
        }
        if (single) {
            int stop = EXIT_AGAIN;
            bool insn_here = ev && ev->kind == KVMRR_EV_INSN && ev->icount == vm->icount;
            int r = exec_special(vm, true, step || insn_here, res, &stop);
            if (r < 0)
                return;
            if (r > 0) {
                if (vm->user_bp_n)
                    user_break_seen(vm, false);
                continue;
            }
        }
        int64_t kick = lim->deadline_ns;
        if (debug == DEBUG_OFF && exact)
            kick = earliest(kick, approach_kick(vm, target, approach_near(vm, ev, target)));
        if (debug == DEBUG_BP)
            kick = earliest(kick, backstop_kick(vm, target));
        vm->run->request_interrupt_window = 0;
        struct enter_result er;
        struct kvm_vcpu_events pend;                    /* an interrupt injected, pending */
        bool delivering = vm->user_bp_n && ioctl(vm->vcpu_fd, KVM_GET_VCPU_EVENTS, &pend) == 0
                          && pend.interrupt.injected;
        kvmrr_icount_t entered_at = vm->icount;
        if (enter(vm, debug, debug == DEBUG_BP ? ev->rip : 0, kick, &er) < 0) {
            char what[80];
            snprintf(what, sizeof(what), "KVM_RUN failed (%s)", strerror(errno));
            fail(res, vm, "%s at icount %lld rip 0x%llx", what);
            return;
        }
        vm->user_bp_skip = 0;
        vm->stalled_kicks = er.exit_reason == KVM_EXIT_INTR && vm->icount == entered_at
                            ? vm->stalled_kicks + 1 : 0;
        if (debug != DEBUG_OFF && ev && cur_rip(vm) == ev->rip)
            bp_hit(vm);
        else if (debug == DEBUG_OFF)
            vm->bp_last_hit = -1;     /* passes while running free were not seen */
        if (exit_refused(vm, &er, res))
            return;
        int k = er.exit_reason == KVM_EXIT_IO ? replay_io(vm, res)
                : er.exit_reason == KVM_EXIT_INTERNAL_ERROR ? emulation_failed(vm, res)
                : er.exit_reason == KVM_EXIT_X86_RDMSR ? msr_exit(vm, res)
                : common_exit(vm, er.exit_reason, res);
        if (k == EXIT_STOP)
            return;
        if (vm->user_bp_n && (er.exit_reason == KVM_EXIT_DEBUG || er.exit_reason == KVM_EXIT_INTR))
            user_break_seen(vm, delivering && vm->icount == entered_at);
        /* Past the target under a breakpoint: the guest was not at the event's RIP at its
         * icount, a divergence, reported (at the loop's top) where it was found. */
        if (exact && vm->icount > target && debug != DEBUG_BP) {
            fail(res, vm, "%s (now icount %lld rip 0x%llx): the approach kick came too late",
                 "replay overshot its target");
            return;
        }
    }
}

/*
 * KVM finishes an IN (writes RAX, advances RIP) only on the next KVM_RUN.  Before control
 * returns to the caller, who may snapshot or hash the VM, finish it without running the
 * guest on (KVM_RUN with immediate_exit completes pending I/O and returns EINTR).
 */
static void complete_pending_in(struct kvmrr_vm *vm)
{
    if (!vm->in_pending)
        return;
    vm->run->immediate_exit = 1;
    (void)ioctl(vm->vcpu_fd, KVM_RUN, 0);
    vm->run->immediate_exit = 0;
    struct kvm_regs r;
    if (vm_get_regs(vm, &r) == 0)
        vm->run->s.regs.regs = r;
    vm->in_pending = false;
    vm->in_completing = false;
}

int kvmrr_vm_run(struct kvmrr_vm *vm, const struct kvmrr_limits *limits,
                 struct kvmrr_result *res)
{
    memset(res, 0, sizeof(*res));
    tls_run = vm->run;
    /* The segment and control registers come with every exit: the loop checks the CPL
     * at each one and walks the guest's page tables from them. */
    vm->run->kvm_valid_regs |= KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS;
    vm->sregs_synced = false;
    if (!vm->msr_filter && msr_filter_install(vm) < 0) {
        result_set(res, vm, KVMRR_STOP_ERROR);
        snprintf(res->message, sizeof(res->message), "cannot make time MSR reads exit "
                 "(KVM_CAP_X86_USER_SPACE_MSR / KVM_X86_SET_MSR_FILTER): %s", strerror(errno));
        return -1;
    }
    vm->msr_filter = true;

    if (vm->cfg.counter == KVMRR_COUNTER_FAST && kick_bind_thread(vm) < 0) {
        result_set(res, vm, KVMRR_STOP_ERROR);
        snprintf(res->message, sizeof(res->message), "cannot create the kick timer: %s",
                 strerror(errno));
        return -1;
    }
    if (vm->cfg.mode == KVMRR_MODE_REPLAY && vm->cfg.counter == KVMRR_COUNTER_FAST)
        (void)hwbp_usable();   /* probe it (once per process) before, not amid, the run */
    cpu_set_t cpus;
    if (host_cpu_enter(vm, &cpus) < 0) {
        result_set(res, vm, KVMRR_STOP_ERROR);
        snprintf(res->message, sizeof(res->message), "cannot run the vCPU on host CPU %d: %s",
                 vm->cfg.host_cpu, strerror(errno));
        return -1;
    }
    if (vm->cfg.mode == KVMRR_MODE_REPLAY)
        replay_run(vm, limits, res);
    else
        live_run(vm, limits, res);
    if (vm->cfg.mode == KVMRR_MODE_RECORD && res->stop != KVMRR_STOP_ERROR)
        (void)guest_debug_used(vm, res, true);
    complete_pending_in(vm);
    host_cpu_leave(&cpus);
    tls_run = NULL;
    return res->stop == KVMRR_STOP_ERROR ? -1 : 0;
}

int kvmrr_vm_take_events(struct kvmrr_vm *vm, struct kvmrr_event *out, int max)
{
    int n = 0;
    struct kvmrr_event *ev;
    while (n < max && (ev = queue_peek(&vm->recorded)) != NULL) {
        out[n++] = *ev;    /* payload stays in the slot until it is reused by a later run */
        queue_pop(&vm->recorded);
    }
    return n;
}

int kvmrr_vm_feed_events(struct kvmrr_vm *vm, const struct kvmrr_event *events, int n,
                         char *err, size_t err_len)
{
    if (vm->cfg.mode != KVMRR_MODE_REPLAY)
        return ERRF(err, err_len, "events can only be fed to a replaying VM");
    for (int i = 0; i < n; i++) {
        const struct kvmrr_event *ev = &events[i];
        char why[160];
        if (event_validate(ev, why, sizeof(why)) < 0)
            return ERRF(err, err_len, "event %d at icount %lld: %s", i, (long long)ev->icount, why);
        if (ev->icount < vm->last_event_icount)
            return ERRF(err, err_len, "event at icount %lld comes after one at %lld: "
                        "the log goes backwards", (long long)ev->icount,
                        (long long)vm->last_event_icount);
        if (!queue_push(&vm->replay, ev, ev->data, ev->len))
            return ERRF(err, err_len, "out of memory");
        vm->last_event_icount = ev->icount;
    }
    return 0;
}

int kvmrr_vm_pending_events(struct kvmrr_vm *vm) { return vm->replay.count; }

int kvmrr_vm_go_live(struct kvmrr_vm *vm, int64_t checksum_every, char *err, size_t err_len)
{
    if (vm->cfg.mode != KVMRR_MODE_REPLAY)
        return ERRF(err, err_len, "only a replaying VM can go live");
    if (vm->replay.count)
        return ERRF(err, err_len, "%d logged events are not applied yet", vm->replay.count);
    /* A `fast` record checks guest RAM for RDTSC only at icount 0 (live_run); a Linux
     * kernel holds it, so its new primary must execute and log it: step. */
    if (vm->dev.machine == KVMRR_MACHINE_PC && vm->cfg.counter == KVMRR_COUNTER_FAST)
        return ERRF(err, err_len, "a Linux guest reads the TSC, which `fast` cannot record "
                    "here: a backup that may take over follows with --mode step");
    /* From here the devices take their inputs from the host; the guest cannot tell. */
    vm->cfg.mode = KVMRR_MODE_RECORD;
    vm->cfg.checksum_every = checksum_every;
    vm->timer_pending = false;
    vm->next_tick_ns = 0;           /* live_run arms the guest's timer afresh */
    vm->last_checksum = vm->icount;
    return 0;
}

void kvmrr_vm_set_horizon(struct kvmrr_vm *vm, kvmrr_icount_t icount)
{
    if (icount > vm->horizon)
        vm->horizon = icount;
}
