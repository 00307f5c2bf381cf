/* tlib.c - see tlib.h. */
#include "tlib.h"

volatile uint64_t t_acc = 0x243f6a8885a308d3ull;
volatile uint64_t t_faults, t_traps;

struct gate {
    uint16_t off_lo, selector;
    uint8_t ist, type_attr;
    uint16_t off_mid;
    uint32_t off_hi, reserved;
} __attribute__((packed));

struct dtr {
    uint16_t limit;
    uint64_t base;
} __attribute__((packed));

void t_gate(unsigned vec, const void *handler, uint8_t type)
{
    struct dtr d;
    __asm__ volatile("sidt %0" : "=m"(d));
    struct gate *g = (struct gate *)d.base + vec;
    uint64_t h = (uint64_t)(uintptr_t)handler;
    uint16_t cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    g->off_lo = (uint16_t)h;
    g->selector = cs;
    g->ist = 0;
    g->type_attr = type;
    g->off_mid = (uint16_t)(h >> 16);
    g->off_hi = (uint32_t)(h >> 32);
    g->reserved = 0;
}

void t_fold(uint64_t v)
{
    uint64_t a = t_acc ^ v;
    a ^= a >> 31;
    a *= 0x9e3779b97f4a7c15ull;
    t_acc = a ^ (a >> 29);
}

static void on_tick(void)
{
    const struct irq_frame *f = timer_frame;
    t_fold(f->rip);
    t_fold(f->rflags ^ (f->rax << 1) ^ (f->rcx << 2) ^ (f->rsi << 3) ^ (f->rdi << 4)
           ^ (f->rdx << 5) ^ (f->rbx << 6));
}

void t_timer_start(void)
{
    uint64_t hz = bootarg_u64("timer_hz", 1000);
    timer_hook = on_tick;
    if (hz)
        timer_set_period_us((uint32_t)(hz > 1000000 ? 1 : 1000000 / hz));
}

void t_timer_stop(void)
{
    timer_set_period_us(0);
}

uint64_t t_iters(uint64_t dflt)
{
    return bootarg_u64("iters", dflt);
}

int t_finish(const char *name)
{
    irq_disable();
    t_timer_stop();
    printf("%s acc=%lx faults=%lu traps=%lu ticks=%lu\n", name, (unsigned long)t_acc,
           (unsigned long)t_faults, (unsigned long)t_traps, (unsigned long)timer_ticks);
    return 0;
}
