/*
 * ticks - a computation whose result depends on exactly where each timer interrupt lands.
 *
 * The main loop runs with interrupts on and never halts: each iteration bumps a volatile
 * counter and steps a xorshift state. The timer hook folds the counter, the state and the
 * whole interrupted register frame (RIP, RFLAGS, every GPR) into an accumulator, so a tick
 * replayed one instruction early or late changes every later value. Every 100 ticks it also
 * folds in the clock port and the random port (logged PortIn events on record).
 *
 * Boot arguments:
 *   timer_hz=N   timer frequency (default 1000)
 *   report=N     print "ticks=<n> acc=<hex16> i=<n>" every N ticks (default 100, 0 = never)
 *   ticks=N      after N ticks print "done acc=<hex16>" and exit 0 (default 0 = run forever)
 *   seed=N       initial xorshift state (default 0x9e3779b97f4a7c15; 0 is replaced by it)
 */
#include "runtime.h"

#define PENDING_REPORT 1u
#define PENDING_DONE 2u

static volatile uint64_t iter;   /* the loop counter "i" */
static volatile uint64_t state;  /* xorshift64 state, stepped every iteration */
static volatile uint64_t acc;    /* what the timer hook folds everything into */
static volatile uint32_t pending;

static uint64_t report_every, max_ticks;
static volatile uint64_t snap_ticks, snap_acc, snap_iter;  /* of the last report tick */
static volatile uint64_t done_acc;

static inline uint64_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
}

static inline uint64_t rotl(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
}

static void on_tick(void)
{
    if (pending & PENDING_DONE)
        return;
    const struct irq_frame *f = timer_frame;
    uint64_t t = timer_ticks;
    uint64_t a = acc;

    /* The interrupted context: RIP, RFLAGS and every GPR, folded cheaply (the hook runs
     * on every tick, and in the single-step backend every instruction is slow). */
    uint64_t g = f->rip ^ (f->rflags << 40);
    g = rotl(g, 7) ^ f->rax;
    g = rotl(g, 7) ^ f->rbx;
    g = rotl(g, 7) ^ f->rcx;
    g = rotl(g, 7) ^ f->rdx;
    g = rotl(g, 7) ^ f->rsi;
    g = rotl(g, 7) ^ f->rdi;
    g = rotl(g, 7) ^ f->rbp;
    g = rotl(g, 7) ^ f->rsp;
    g = rotl(g, 7) ^ f->r8;
    g = rotl(g, 7) ^ f->r9;
    g = rotl(g, 7) ^ f->r10;
    g = rotl(g, 7) ^ f->r11;
    g = rotl(g, 7) ^ f->r12;
    g = rotl(g, 7) ^ f->r13;
    g = rotl(g, 7) ^ f->r14;
    g = rotl(g, 7) ^ f->r15;
    a = mix(a ^ iter ^ (t << 40));
    a = mix(a ^ state);
    a = mix(a ^ g);
    if (t % 100 == 0) {
        a = mix(a ^ clock_ns());
        a = mix(a ^ random32());
    }
    acc = a;

    if (report_every && t % report_every == 0) {
        snap_ticks = t;
        snap_acc = a;
        snap_iter = iter;
        pending |= PENDING_REPORT;
    }
    if (max_ticks && t >= max_ticks) {
        timer_set_period_us(0);
        done_acc = a;
        pending |= PENDING_DONE;
    }
}

int main(void)
{
    uint64_t hz = bootarg_u64("timer_hz", 1000);
    report_every = bootarg_u64("report", 100);
    max_ticks = bootarg_u64("ticks", 0);
    uint64_t seed = bootarg_u64("seed", 0x9e3779b97f4a7c15ULL);
    if (hz == 0 || hz > 1000000) {
        printf("ticks: bad timer_hz=%llu (1..1000000)\n", (unsigned long long)hz);
        return 2;
    }
    state = seed ? seed : 0x9e3779b97f4a7c15ULL;
    acc = 0;
    printf("ticks: timer_hz=%llu report=%llu ticks=%llu\n", (unsigned long long)hz,
           (unsigned long long)report_every, (unsigned long long)max_ticks);

    timer_hook = on_tick;
    timer_set_period_us((uint32_t)(1000000 / hz));
    irq_enable();

    for (;;) {
        uint64_t s = state;
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        state = s;
        iter = iter + 1;
        if (!pending)
            continue;

        irq_disable();
        uint32_t p = pending;
        pending = p & PENDING_DONE;
        uint64_t t = snap_ticks, a = snap_acc, i = snap_iter;
        irq_enable();
        if (p & PENDING_REPORT)
            printf("ticks=%llu acc=%016llx i=%llu\n", (unsigned long long)t,
                   (unsigned long long)a, (unsigned long long)i);
        if (p & PENDING_DONE) {
            irq_disable();
            printf("done acc=%016llx\n", (unsigned long long)done_acc);
            return 0;
        }
    }
}
