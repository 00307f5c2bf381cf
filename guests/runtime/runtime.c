/*
 * runtime.c - the hardware side of the guest runtime: IDT, interrupt handlers, the
 * devices of kvmrr_abi.h (serial, exit, timer, clock, random, NIC).
 */
#include "runtime.h"

/* ---- IDT ---- */

struct idt_gate {
    uint16_t off_lo;
    uint16_t selector;
    uint8_t ist;
    uint8_t type_attr;
    uint16_t off_mid;
    uint32_t off_hi;
    uint32_t reserved;
} __attribute__((packed));

struct idt_ptr {
    uint16_t limit;
    uint64_t base;
} __attribute__((packed));

#define GDT_CODE_SEL 0x08
#define GATE_INTR64 0x8e  /* present, DPL 0, 64-bit interrupt gate (clears IF) */

static struct idt_gate idt[256] __attribute__((aligned(16)));

extern const uint64_t rt_fault_stubs[32];  /* start.S */
extern char isr_timer[], isr_nic_rx[];      /* start.S */

static void idt_set(unsigned vec, uint64_t handler)
{
    struct idt_gate *g = &idt[vec];
    g->off_lo = (uint16_t)handler;
    g->selector = GDT_CODE_SEL;
    g->ist = 0;
    g->type_attr = GATE_INTR64;
    g->off_mid = (uint16_t)(handler >> 16);
    g->off_hi = (uint32_t)(handler >> 32);
    g->reserved = 0;
}

void rt_init(void)
{
    for (unsigned v = 0; v < 32; v++)
        idt_set(v, rt_fault_stubs[v]);
    idt_set(KVMRR_VEC_TIMER, (uint64_t)(uintptr_t)isr_timer);
    idt_set(KVMRR_VEC_NIC_RX, (uint64_t)(uintptr_t)isr_nic_rx);
    /* Gates 34-255 stay not-present: a stray vector ends in #NP (fault 11). */
    struct idt_ptr p = { sizeof(idt) - 1, (uint64_t)(uintptr_t)idt };
    __asm__ volatile("lidt %0" : : "m"(p) : "memory");

    /* The bootinfo lives at a fixed address; launder the pointer so the compiler does
     * not reason about it as a constant. */
    const struct kvmrr_bootinfo *bi;
    __asm__("" : "=r"(bi) : "0"((uintptr_t)KVMRR_BOOTINFO_ADDR));
    rt_bootargs_init(bi);
}

/* ---- exceptions ---- */

void rt_fault(struct irq_frame *f)
{
    static volatile int in_fault;
    if (!in_fault++)
        printf("fault %u rip=%lx\n", (unsigned)f->vector, (unsigned long)f->rip);
    kvmrr_exit(KVMRR_EXIT_FAULT_BASE + (int)f->vector);
}

/* ---- exit ---- */

void kvmrr_exit(int code)
{
    for (;;) {
        outl(KVMRR_PORT_EXIT, (uint32_t)code);
        __asm__ volatile("cli; hlt" ::: "memory");
    }
}

/* ---- console ---- */

void putc(char c)
{
    outb(KVMRR_PORT_SERIAL, (uint8_t)c);
}

/* ---- timer ---- */

volatile uint64_t timer_ticks;
void (*volatile timer_hook)(void);
const struct irq_frame *volatile timer_frame;

void timer_set_period_us(uint32_t us)
{
    outl(KVMRR_PORT_TIMER, us);
}

void rt_timer_isr(struct irq_frame *f)
{
    timer_ticks++;
    void (*hook)(void) = timer_hook;
    if (hook) {
        timer_frame = f;
        hook();
        timer_frame = NULL;
    }
}

/* ---- clock and random ---- */

uint64_t clock_ns(void)
{
    unsigned long flags = irq_save();  /* LO latches the value HI returns: keep them paired */
    uint32_t lo = inl(KVMRR_PORT_CLOCK_LO);
    uint32_t hi = inl(KVMRR_PORT_CLOCK_HI);
    irq_restore(flags);
    return ((uint64_t)hi << 32) | lo;
}

uint32_t random32(void)
{
    return inl(KVMRR_PORT_RANDOM);
}

/* ---- NIC ---- */

volatile uint32_t nic_rx_pending;
volatile uint32_t nic_rx_len;
volatile uint64_t nic_rx_count;
static uint32_t nic_rx_cap;

void nic_init(void *rxbuf, uint32_t cap)
{
    nic_rx_cap = cap;
    outl(KVMRR_PORT_NIC_RX_ADDR, (uint32_t)(uintptr_t)rxbuf);
    outl(KVMRR_PORT_NIC_RX_CAP, cap);
}

void rt_nic_isr(struct irq_frame *f)
{
    (void)f;
    uint32_t len = inl(KVMRR_PORT_NIC_RX_LEN);
    if (len) {
        if (len > nic_rx_cap)
            len = nic_rx_cap;
        nic_rx_len = len;
        nic_rx_pending = 1;
        nic_rx_count++;
    }
}

void nic_rx_ack(void)
{
    /* Clear first: once acked, the next packet's interrupt may arrive at once. */
    nic_rx_pending = 0;
    nic_rx_len = 0;
    outl(KVMRR_PORT_NIC_RX_ACK, 1);
}

void nic_send(const void *buf, uint32_t len)
{
    outl(KVMRR_PORT_NIC_TX_ADDR, (uint32_t)(uintptr_t)buf);
    outl(KVMRR_PORT_NIC_TX_LEN, len);
}
