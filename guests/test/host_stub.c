/*
 * host_stub.c - the guest runtime's hardware side, faked on Linux for unit tests.
 *
 * Built with -DRT_HOSTED (runtime.h then declares the irq functions instead of inlining
 * sti/cli/hlt) and WITHOUT the rt_* renames the workload and lib.c get, so the console
 * entry point the workload calls is rt_putc here.
 *
 * NIC: packets come from stdin and replies go to stdout, each framed as a 4-byte
 * little-endian length followed by the bytes. The console goes to stderr. The clock
 * starts at 1e18 ns and advances 1000 ns per read; random32 is xorshift32 from 1.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvmrr_abi.h"

struct irq_frame;

volatile uint64_t timer_ticks;
void (*volatile timer_hook)(void);
const struct irq_frame *volatile timer_frame;
volatile uint32_t nic_rx_pending;
volatile uint32_t nic_rx_len;
volatile uint64_t nic_rx_count;

static int irq_on;
static uint8_t *rx_buf;
static uint32_t rx_cap;
static uint64_t fake_clock = 1000000000000000000ULL;
static uint32_t fake_random = 1;
uint32_t host_timer_period_us;

void rt_putc(char c) { fputc(c, stderr); }

void kvmrr_exit(int code)
{
    fflush(stdout);
    fflush(stderr);
    exit(code);
}

void irq_enable(void) { irq_on = 1; }
void irq_disable(void) { irq_on = 0; }
unsigned long irq_save(void)
{
    unsigned long f = irq_on ? 1ul << 9 : 0;
    irq_on = 0;
    return f;
}
void irq_restore(unsigned long flags) { irq_on = (flags >> 9) & 1; }

void timer_set_period_us(uint32_t us) { host_timer_period_us = us; }

uint64_t clock_ns(void)
{
    fake_clock += 1000;
    return fake_clock;
}

uint32_t random32(void)
{
    fake_random ^= fake_random << 13;
    fake_random ^= fake_random >> 17;
    fake_random ^= fake_random << 5;
    return fake_random;
}

void nic_init(void *rxbuf, uint32_t cap)
{
    rx_buf = rxbuf;
    rx_cap = cap;
}

void nic_rx_ack(void)
{
    nic_rx_pending = 0;
    nic_rx_len = 0;
}

void nic_send(const void *buf, uint32_t len)
{
    uint8_t hdr[4] = { len & 0xff, (len >> 8) & 0xff, (len >> 16) & 0xff, len >> 24 };
    fwrite(hdr, 1, 4, stdout);
    fwrite(buf, 1, len, stdout);
    fflush(stdout);
}

/* "Halt until an interrupt": a timer tick, then the next packet from stdin. */
void idle_wait(void)
{
    if (irq_on) {
        fprintf(stderr, "host_stub: idle_wait with interrupts enabled\n");
        exit(70);
    }
    timer_ticks++;
    if (timer_hook)
        timer_hook();
    if (nic_rx_pending)
        return;
    uint8_t hdr[4];
    if (fread(hdr, 1, 4, stdin) != 4) {
        fprintf(stderr, "host_stub: end of input\n");
        kvmrr_exit(3);
    }
    uint32_t len = hdr[0] | hdr[1] << 8 | hdr[2] << 16 | (uint32_t)hdr[3] << 24;
    static uint8_t pkt[1 << 16];
    if (len > sizeof(pkt) || fread(pkt, 1, len, stdin) != len) {
        fprintf(stderr, "host_stub: truncated input\n");
        kvmrr_exit(4);
    }
    /* Like the NIC: DMA at most the capacity, report the delivered length. */
    uint32_t n = len < rx_cap ? len : rx_cap;
    memcpy(rx_buf, pkt, n);
    nic_rx_len = n;
    nic_rx_pending = 1;
    nic_rx_count++;
}
