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
 * loop single-steps it executes IRETQ itself; under `step` it also executes RDTSC, RDTSCP,
 * RDRAND and RDSEED itself, so their results become log events.
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
    vm->frame_rflags_gpa = (vm->run->s.regs.regs.rsp & ~0xfull) - 40 + 16;
    vm->delivery_tf = vm->run->s.regs.regs.rflags & RFLAGS_TF;
    return 0;
}

/* The first exit after a single-stepped delivery. */
static void delivered(struct kvmrr_vm *vm)
{
    if (vm->frame_rflags_gpa + 8 <= vm->cfg.mem_size) {
        uint64_t *image = (uint64_t *)(vm->mem + vm->frame_rflags_gpa);
        *image = (*image & ~RFLAGS_TF) | vm->delivery_tf;
    }
    vm->frame_rflags_gpa = 0;
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
};

/* Decode the instruction at RIP for the few the loop must execute itself. */
enum special_insn { INSN_NONE, INSN_IRETQ, INSN_PUSHFQ, INSN_HLT, INSN_RDTSC, INSN_RDTSCP, INSN_RDRAND, INSN_RDSEED };

static enum special_insn decode_special(struct kvmrr_vm *vm, int *len, int *reg, int *opsize)
{
    uint64_t rip = cur_rip(vm);
    if (rip + 16 > vm->cfg.mem_size)
        return INSN_NONE;
    const uint8_t *p = vm->mem + rip;
    int i = 0, rex = 0;
    *opsize = 4;
    if (p[i] == 0x66) { *opsize = 2; i++; }
    if ((p[i] & 0xf0) == 0x40) { rex = p[i]; i++; }
    if (rex & 0x8)
        *opsize = 8;
    if (p[i] == 0xf4) {
        *len = i + 1;
        return INSN_HLT;
    }
    if (p[i] == 0x9c && *opsize != 2) {
        *len = i + 1;
        return INSN_PUSHFQ;
    }
    if (p[i] == 0xcf) {
        *len = i + 1;
        return (rex & 0x8) ? INSN_IRETQ : INSN_NONE;  /* 32-bit IRET: not used by guests */
    }
    if (p[i] != 0x0f)
        return INSN_NONE;
    if (p[i + 1] == 0x31) { *len = i + 2; return INSN_RDTSC; }
    if (p[i + 1] == 0x01 && p[i + 2] == 0xf9) { *len = i + 3; return INSN_RDTSCP; }
    if (p[i + 1] == 0xc7 && (p[i + 2] & 0xc0) == 0xc0) {
        int op = (p[i + 2] >> 3) & 7;
        *reg = (p[i + 2] & 7) | ((rex & 1) << 3);
        *len = i + 3;
        if (op == 6) return INSN_RDRAND;
        if (op == 7) return INSN_RDSEED;
    }
    return INSN_NONE;
}

static __u64 *gpr_slot(struct kvm_regs *r, int reg)
{
    __u64 *map[16] = { &r->rax, &r->rcx, &r->rdx, &r->rbx, &r->rsp, &r->rbp, &r->rsi,
                          &r->rdi, &r->r8, &r->r9, &r->r10, &r->r11, &r->r12, &r->r13,
                          &r->r14, &r->r15 };
    return map[reg & 15];
}

static uint64_t host_random64(void)
{
    uint64_t v = 0;
    if (getrandom(&v, sizeof(v), 0) != sizeof(v))
        v = (uint64_t)wall_ns() * 0x9e3779b97f4a7c15ull;
    return v;
}

/* Execute IRETQ (64-bit, same privilege) from the guest stack: identity-mapped RAM. */
static int exec_iretq(struct kvmrr_vm *vm, struct kvm_regs *r)
{
    if (r->rsp + 40 > vm->cfg.mem_size)
        return -1;
    const uint64_t *sp = (const uint64_t *)(vm->mem + r->rsp);
    r->rip = sp[0];
    r->rflags = (sp[2] & 0x3f7fd7ull) | 0x2;
    r->rsp = sp[3];
    return 0;
}

/*
 * Execute one special instruction in userspace if RIP is at one.  Returns 1 if it did
 * (counted), 0 if not, -1 (divergence reported) on a replay mismatch.
 */
static int exec_special(struct kvmrr_vm *vm, bool intercept_time, struct kvmrr_result *res,
                        int *stop)
{
    int len = 0, reg = 0, opsize = 4;
    enum special_insn k = decode_special(vm, &len, &reg, &opsize);
    /* Under single-step these misbehave (lost trap, leaked TF, a HLT that KVM keeps
     * pending past the next delivery), so the loop always executes them itself. */
    bool flow = k == INSN_IRETQ || k == INSN_PUSHFQ || k == INSN_HLT;
    if (k == INSN_NONE || (!flow && !intercept_time))
        return 0;
    /* An interrupt injected at this boundary is delivered before the instruction here
     * executes, and only KVM_RUN delivers it: leave both to KVM (else a HLT executed here
     * sleeps with the interrupt stuck pending, and nothing ever delivers it). */
    struct kvm_vcpu_events pend;
    if (ioctl(vm->vcpu_fd, KVM_GET_VCPU_EVENTS, &pend) == 0
        && (pend.interrupt.injected || pend.exception.injected))
        return 0;
    struct kvm_regs r = vm->run->s.regs.regs;
    if (flow) {
        if (k == INSN_IRETQ && exec_iretq(vm, &r) < 0)
            return 0;   /* let the CPU raise the fault */
        if (k == INSN_HLT) {
            r.rip += len;            /* as a HLT exit leaves it: after the HLT, halted */
            vm->halted = true;
        }
        if (k == INSN_PUSHFQ) {
            /* Single-stepped, PUSHFQ would push the debugger's TF. */
            if (r.rsp < 8 || r.rsp > vm->cfg.mem_size)
                return 0;
            r.rsp -= 8;
            uint64_t image = r.rflags & ~RFLAGS_RF_VM;
            memcpy(vm->mem + r.rsp, &image, 8);
            r.rip += len;
        }
        vm_set_regs(vm, &r);
        emulated_retired(vm, 1);
        return 1;
    }
    uint64_t opcode = k == INSN_RDTSC ? 0x0f31 : k == INSN_RDTSCP ? 0x0f01f9
                      : k == INSN_RDRAND ? 0x0fc7f0 : 0x0fc7f8;
    uint64_t rax, rdx, rcx;
    if (vm->cfg.mode == KVMRR_MODE_REPLAY) {
        struct kvmrr_event *ev = queue_peek(&vm->replay);
        if (!ev || ev->kind != KVMRR_EV_INSN || ev->icount != vm->icount || ev->a != opcode) {
            *stop = diverge(vm, res, ev, KVMRR_EV_INSN, "the guest executed an instruction "
                            "the log does not hold here");
            return -1;
        }
        rax = ev->b; rdx = ev->c; rcx = ev->d;
        queue_pop(&vm->replay);
        vm->stats.events++;
    } else {
        if (k == INSN_RDTSC || k == INSN_RDTSCP) {
            uint64_t t = __rdtsc();
            rax = (uint32_t)t; rdx = t >> 32; rcx = 0;   /* TSC_AUX: processor 0 */
        } else {
            rax = host_random64(); rdx = 0; rcx = 0;
        }
    }
    if (k == INSN_RDTSC || k == INSN_RDTSCP) {
        r.rax = rax; r.rdx = rdx;
        if (k == INSN_RDTSCP) r.rcx = rcx;
    } else {
        __u64 *dst = gpr_slot(&r, reg);
        uint64_t v = opsize == 8 ? rax : opsize == 4 ? (uint32_t)rax : ((*dst & ~0xffffull) | (uint16_t)rax);
        *dst = v;
        r.rflags = (r.rflags & ~0x8d5ull) | RFLAGS_CF;   /* CF=1, OF SF ZF AF PF = 0 */
    }
    if (vm->cfg.mode != KVMRR_MODE_REPLAY)
        record(vm, KVMRR_EV_INSN, opcode, rax, rdx, rcx, NULL, 0);
    r.rip += len;
    vm_set_regs(vm, &r);
    emulated_retired(vm, 1);
    return 1;
}

static void track_rate(struct kvmrr_vm *vm, kvmrr_icount_t before, int64_t t0)
{
    int64_t dt = mono_ns() - t0;
    if (dt >= 1000000) {
        int64_t rate = (vm->icount - before) * 1000000000 / dt;
        if (rate > vm->stats.peak_rate)
            vm->stats.peak_rate = rate;
    }
}

/* One KVM_RUN: single-stepped (DEBUG_STEP), or free (DEBUG_OFF, or DEBUG_BP with a
 * hardware breakpoint at bp) with a kick at kick_at_ns (0: none). */
static int enter(struct kvmrr_vm *vm, int debug, uint64_t bp, int64_t kick_at_ns,
                 struct enter_result *er)
{
    bool single_step = debug == DEBUG_STEP;
    if (vm_set_guest_debug(vm, debug, bp) < 0)
        return -1;
    bool kicked = kick_at_ns > 0 && !single_step;
    if (kicked)
        kick_arm(vm, kick_at_ns);
    kvmrr_icount_t before = vm->icount;
    int64_t t0 = kicked ? mono_ns() : 0;
    int rc = ioctl(vm->vcpu_fd, KVM_RUN, 0);
    int saved = errno;
    vm->run->immediate_exit = 0;
    vm->stats.exits++;
    if (kicked)
        kick_arm(vm, 0);
    if (rc < 0 && saved != EINTR && saved != EAGAIN) {
        errno = saved;
        return -1;
    }
    er->exit_reason = rc < 0 ? KVM_EXIT_INTR : vm->run->exit_reason;
    if (er->exit_reason == KVM_EXIT_INTR)
        vm->stats.kicks++;
    if (single_step)
        vm->stats.steps++;
    if (debug == DEBUG_BP && er->exit_reason == KVM_EXIT_DEBUG)
        vm->stats.breakpoints++;
    if (vm->frame_rflags_gpa) {
        /* A kick can end KVM_RUN before or after the delivery: ask KVM which.  A frame
         * left armed after a delivery would be "mended" later, at whatever the guest has
         * since put at that stack address. */
        struct kvm_vcpu_events pend;
        bool pending = er->exit_reason == KVM_EXIT_INTR
                       && ioctl(vm->vcpu_fd, KVM_GET_VCPU_EVENTS, &pend) == 0
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
    return 0;
}

/* When to kick a free-running vCPU so it stops short of target (0: no need). */
static int64_t approach_kick(struct kvmrr_vm *vm, kvmrr_icount_t target)
{
    kvmrr_icount_t remaining = target - vm->icount - KVMRR_NEAR / 2;
    int64_t rate = vm->stats.peak_rate * 2;
    if (rate < MIN_RATE_GUESS)
        rate = MIN_RATE_GUESS;
    int64_t ns = remaining * 1000000000 / rate;
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
    bool nic = nic_deliverable(vm);
    if (!vm->timer_pending && !nic)
        return 0;
    if (!injectable(vm))
        return 0;
    if (vm->timer_pending) {
        if (inject(vm, KVMRR_VEC_TIMER) < 0)
            return -1;
        vm->timer_pending = false;
        record(vm, KVMRR_EV_INTERRUPT, KVMRR_VEC_TIMER, 0, 0, 0, NULL, 0);
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
    return vm->timer_pending || nic_deliverable(vm);
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
        uint64_t v = io.port == KVMRR_PORT_CLOCK_LO ? (uint64_t)wall_ns()
                                                    : (uint32_t)host_random64();
        devices_input_apply(&vm->dev, &io, v);
        complete_read(vm, &io);
        record(vm, KVMRR_EV_PORT_IN, io.port, io.size, v, 0, NULL, 0);
        return EXIT_AGAIN;
    }
    case PIO_OUTPUT:
        record(vm, KVMRR_EV_OUTPUT, io.channel, vm->dev.output_seq++, 0, 0, io.out_data, io.out_len);
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
    if (vm->dev.timer_period_ns && !vm->next_tick_ns)
        arm_timer(vm);    /* after a restore, or the first run */
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
        if (vm->halted) {
            live_wait(vm, lim->deadline_ns);
            continue;
        }
        bool near = lim->stop_icount >= 0 && lim->stop_icount - vm->icount <= KVMRR_NEAR;
        bool single = step || near;
        if (single) {
            int r = exec_special(vm, step, res, &(int){0});
            if (r > 0)
                continue;
        }
        int64_t kick = earliest(vm->next_tick_ns, lim->deadline_ns);
        if (lim->stop_icount >= 0 && !single)
            kick = earliest(kick, approach_kick(vm, lim->stop_icount));
        /* A pending tick the guest cannot take yet: exit as soon as it can. */
        vm->run->request_interrupt_window = !single && something_to_inject(vm);
        struct enter_result er;
        if (enter(vm, single ? DEBUG_STEP : DEBUG_OFF, 0, kick, &er) < 0) {
            fail(res, vm, "%s at icount %lld rip 0x%llx", "KVM_RUN failed");
            return;
        }
        int k = er.exit_reason == KVM_EXIT_IO ? live_io(vm, res)
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
        if (inject(vm, (uint32_t)ev->a) < 0)
            return fail(res, vm, "%s at icount %lld rip 0x%llx", "KVM_INTERRUPT failed");
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

static int approach_debug(struct kvmrr_vm *vm, const struct kvmrr_event *ev,
                          kvmrr_icount_t target)
{
    kvmrr_icount_t remaining = target - vm->icount;
    bool near = remaining <= KVMRR_NEAR;
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

/* Under a breakpoint a faithful replay cannot pass the target; this kick only bounds how
 * far a diverged one runs on before the loop notices (at a tenth of the peak rate). */
static int64_t backstop_kick(struct kvmrr_vm *vm, kvmrr_icount_t target)
{
    int64_t rate = vm->stats.peak_rate > 1000000 ? vm->stats.peak_rate / 10 : 100000;
    return mono_ns() + 1000000 + (target - vm->icount) * (1000000000 / rate);
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
        bool exact = !ev || is_async(ev) || target != ev->icount;
        int debug = step ? DEBUG_STEP : exact ? approach_debug(vm, ev, target) : DEBUG_OFF;
        bool single = debug == DEBUG_STEP;
        if (single) {
            int stop = EXIT_AGAIN;
            int r = exec_special(vm, step, res, &stop);
            if (r < 0)
                return;
            if (r > 0)
                continue;
        }
        int64_t kick = lim->deadline_ns;
        if (debug == DEBUG_OFF && exact)
            kick = earliest(kick, approach_kick(vm, target));
        if (debug == DEBUG_BP)
            kick = earliest(kick, backstop_kick(vm, target));
        vm->run->request_interrupt_window = 0;
        struct enter_result er;
        if (enter(vm, debug, debug == DEBUG_BP ? ev->rip : 0, kick, &er) < 0) {
            fail(res, vm, "%s at icount %lld rip 0x%llx", "KVM_RUN failed");
            return;
        }
        if (debug != DEBUG_OFF && ev && cur_rip(vm) == ev->rip)
            bp_hit(vm);
        else if (debug == DEBUG_OFF)
            vm->bp_last_hit = -1;     /* passes while running free were not seen */
        int k = er.exit_reason == KVM_EXIT_IO ? replay_io(vm, res)
                                              : common_exit(vm, er.exit_reason, res);
        if (k == EXIT_STOP)
            return;
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
    if (vm->cfg.counter == KVMRR_COUNTER_FAST && kick_bind_thread(vm) < 0) {
        result_set(res, vm, KVMRR_STOP_ERROR);
        snprintf(res->message, sizeof(res->message), "cannot create the kick timer: %s",
                 strerror(errno));
        return -1;
    }
    if (vm->cfg.mode == KVMRR_MODE_REPLAY && vm->cfg.counter == KVMRR_COUNTER_FAST)
        (void)hwbp_usable();   /* probe it (once per process) before, not amid, the run */
    if (vm->cfg.mode == KVMRR_MODE_REPLAY)
        replay_run(vm, limits, res);
    else
        live_run(vm, limits, res);
    complete_pending_in(vm);
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
