/*
 * test_pc_devices.c - the PC machine's device models (libkvmrr/src/dev_*.c) driven
 * through devices_pio() as the run loop drives them, without KVM: the sequences Linux
 * uses (the 8250 autoconfig, PIT periodic mode and latches, the PIC's ICWs and EOIs, RTC
 * reads, the i8042 reset), what is logged as an input and what the device computes.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static int g_failed, g_passed;
#define CHECK(cond) do { if (!(cond)) { printf("  FAIL line %d: %s\n", __LINE__, #cond); \
                                         g_failed++; return; } } while (0)

static struct kvmrr_devices dev;
static struct pio_access io;
static uint8_t mem[4096];

static void reset(void)
{
    memset(&dev, 0, sizeof(dev));
    dev.machine = KVMRR_MACHINE_PC;
}

static int out8(uint16_t port, uint8_t v)
{
    memset(&io, 0, sizeof(io));
    io.port = port; io.size = 1; io.write = true; io.value = v;
    return devices_pio(&dev, mem, sizeof(mem), &io);
}

/* A read the model answers itself: its value, or -1000 - effect if it does not. */
static int in8(uint16_t port)
{
    memset(&io, 0, sizeof(io));
    io.port = port; io.size = 1;
    int eff = devices_pio(&dev, mem, sizeof(mem), &io);
    return eff == PIO_DONE ? (int)io.value : -1000 - eff;
}

static void test_uart_autoconfig_and_output(void)
{
    reset();
    CHECK(out8(0x3f9, 0x0f) == PIO_DONE && in8(0x3f9) == 0x0f);    /* IER keeps 4 bits */
    CHECK(out8(0x3f9, 0xff) == PIO_DONE && in8(0x3f9) == 0x0f);
    CHECK(out8(0x3f9, 0) == PIO_DONE);
    CHECK(out8(0x3fc, 0x1a) == PIO_DONE && (in8(0x3fe) & 0xf0) == 0x90);  /* loopback */
    CHECK(out8(0x3fc, 0x1f) == PIO_DONE && (in8(0x3fe) & 0xf0) == 0xf0);
    CHECK(out8(0x3f8, 'x') == PIO_DONE && dev.serial_len == 0);   /* looped back: not output */
    CHECK(out8(0x3fc, 0x03) == PIO_DONE && in8(0x3fe) == 0xb0);
    CHECK((in8(0x3fa) & 0xc0) == 0);                                /* no FIFO yet */
    CHECK(out8(0x3fa, 0x01) == PIO_DONE && (in8(0x3fa) >> 6) == 3); /* a 16550A */
    CHECK(in8(0x3fd) == 0x60);                                      /* THR, shifter empty */
    CHECK(out8(0x3fb, 0x83) == PIO_DONE && out8(0x3f8, 0x01) == PIO_DONE
          && out8(0x3f9, 0x00) == PIO_DONE);                        /* divisor 1 under DLAB */
    CHECK(in8(0x3f8) == 0x01 && dev.serial_len == 0);
    CHECK(out8(0x3fb, 0x03) == PIO_DONE);
    CHECK(out8(0x3ff, 0x5a) == PIO_DONE && in8(0x3ff) == 0x5a);     /* scratch */
    CHECK(out8(0x3f8, 'o') == PIO_DONE && out8(0x3f8, 'k') == PIO_DONE);
    CHECK(out8(0x3f8, '\n') == PIO_OUTPUT && io.out_len == 3 && memcmp(io.out_data, "ok\n", 3) == 0);
    CHECK(in8(0x2f8) == 0xff && in8(0x3e8) == 0xff);                /* COM2, COM3 absent */
    g_passed++;
}

static void test_pit_periodic_and_latch(void)
{
    reset();
    CHECK(out8(0x43, 0x34) == PIO_DONE);                 /* ch0, LSB then MSB, mode 2 */
    CHECK(out8(0x40, 11932 & 0xff) == PIO_DONE);
    CHECK(out8(0x40, 11932 >> 8) == PIO_INPUT && io.input == INPUT_MONO_NS);
    devices_input_apply(&dev, &io, 1000000000ull);       /* loaded at t = 1 s */
    CHECK(dev.timer_period_ns == 11932ull * 1000000000ull / PIT_HZ);
    CHECK(dev.timer_period_ns > 9990000 && dev.timer_period_ns < 10010000);
    CHECK(out8(0x43, 0x00) == PIO_DONE);                 /* latch ch0 */
    CHECK(in8(0x40) == -1000 - PIO_INPUT);               /* the time of the latch: logged */
    devices_input_apply(&dev, &io, 1001000000ull);       /* 1 ms later: 1193 clocks gone */
    int lsb = (int)io.value;
    int msb = in8(0x40);                                 /* from the latch: no input */
    CHECK(msb >= 0 && ((msb << 8) | lsb) == 11932 - 1193);
    CHECK(out8(0x43, 0x30) == PIO_TIMER && dev.timer_period_ns == 0);   /* mode 0: no tick */
    g_passed++;
}

static void test_pit_channel2_and_port61(void)
{
    reset();
    CHECK(out8(0x61, 0x01) == PIO_DONE);                 /* gate 2 on, speaker off */
    CHECK(out8(0x43, 0xb0) == PIO_DONE);                 /* ch2, LSB/MSB, mode 0 */
    CHECK(out8(0x42, 100) == PIO_DONE && out8(0x42, 0) == PIO_INPUT);
    devices_input_apply(&dev, &io, 5000);
    CHECK(in8(0x61) == -1000 - PIO_INPUT);
    devices_input_apply(&dev, &io, 5000 + 1000);         /* 1 clock: not yet */
    CHECK((io.value & 0x20) == 0 && (io.value & 0x01));
    int refresh = (int)io.value & 0x10;
    CHECK(in8(0x61) == -1000 - PIO_INPUT);
    devices_input_apply(&dev, &io, 5000 + 200000);       /* 238 clocks: terminal count */
    CHECK((io.value & 0x20) && (int)(io.value & 0x10) != refresh);   /* refresh toggles */
    CHECK(dev.timer_period_ns == 0);                     /* channel 2 is not the tick */
    g_passed++;
}

static void test_pic_init_mask_eoi(void)
{
    reset();
    CHECK(devices_timer_vector(&dev) == 0);              /* vector base 0 before any ICW */
    CHECK(out8(0x21, 0xff) == PIO_DONE && in8(0x21) == 0xff);
    CHECK(out8(0x20, 0x11) == PIO_DONE);                 /* ICW1: cascade, ICW4 */
    CHECK(devices_timer_vector(&dev) == -1);             /* initialising */
    CHECK(out8(0x21, 0x30) == PIO_DONE && out8(0x21, 0x04) == PIO_DONE
          && out8(0x21, 0x01) == PIO_DONE);
    CHECK(devices_timer_vector(&dev) == 0x30);
    CHECK(out8(0xa0, 0x11) == PIO_DONE && out8(0xa1, 0x38) == PIO_DONE
          && out8(0xa1, 0x02) == PIO_DONE && out8(0xa1, 0x01) == PIO_DONE);
    CHECK(out8(0x21, 0x01) == PIO_DONE && devices_timer_vector(&dev) == -1);   /* masked */
    CHECK(out8(0x21, 0xfa) == PIO_DONE && devices_timer_vector(&dev) == 0x30);
    devices_timer_delivered(&dev);
    CHECK(devices_timer_vector(&dev) == -1);             /* in service */
    CHECK(out8(0x20, 0x0b) == PIO_DONE && in8(0x20) == 0x01);   /* OCW3: read ISR */
    CHECK(out8(0x20, 0x60) == PIO_DONE && in8(0x20) == 0x00);   /* specific EOI, IR0 */
    CHECK(devices_timer_vector(&dev) == 0x30);
    devices_timer_delivered(&dev);
    CHECK(out8(0x20, 0x20) == PIO_DONE && devices_timer_vector(&dev) == 0x30);  /* EOI */
    g_passed++;
}

static void test_cmos_clock_and_ram(void)
{
    reset();
    CHECK(out8(0x70, 0x80 | 0x0b) == PIO_DONE && in8(0x71) == 0x02);   /* NMI bit dropped */
    CHECK(out8(0x70, 0x0a) == PIO_DONE && (in8(0x71) & 0x80) == 0);     /* no update */
    CHECK(out8(0x70, 0x00) == PIO_DONE && in8(0x71) == -1000 - PIO_INPUT
          && io.input == INPUT_WALL_NS);
    /* 2026-12-01 03:04:05 UTC */
    uint64_t t = 1796094245ull * 1000000000ull;
    devices_input_apply(&dev, &io, t);
    CHECK(io.value == 0x05);
    CHECK(out8(0x70, 0x04) == PIO_DONE && in8(0x71) == -1000 - PIO_INPUT);
    devices_input_apply(&dev, &io, t);
    CHECK(io.value == 0x03);
    CHECK(out8(0x70, 0x09) == PIO_DONE && in8(0x71) == -1000 - PIO_INPUT);
    devices_input_apply(&dev, &io, t);
    CHECK(io.value == 0x26);
    CHECK(out8(0x70, 0x10) == PIO_DONE && out8(0x71, 0xab) == PIO_DONE && in8(0x71) == 0xab);
    g_passed++;
}

static void test_reset_and_unclaimed_ports(void)
{
    reset();
    CHECK(in8(0x64) == 0x1c);
    CHECK(out8(0x64, 0xd1) == PIO_DONE);
    CHECK(out8(0x64, 0xfe) == PIO_EXIT && io.value == 0);
    CHECK(out8(0x80, 0x00) == PIO_DONE);
    CHECK(out8(0x1234, 0) == PIO_BAD && in8(0xcf8) == -1000 - PIO_BAD);
    CHECK(out8(0x43, 0xc2) == PIO_BAD);                  /* PIT read-back: not modelled */
    g_passed++;
}

static void test_validate(void)
{
    char err[160];
    reset();
    CHECK(devices_validate(&dev, 1 << 20, err, sizeof(err)) == 0);
    dev.pc.pit.ch[0].loaded = 1;
    CHECK(devices_validate(&dev, 1 << 20, err, sizeof(err)) < 0);   /* reload 0 */
    reset();
    dev.pc.cmos.index = 200;
    CHECK(devices_validate(&dev, 1 << 20, err, sizeof(err)) < 0);
    reset();
    dev.timer_period_ns = 5;                             /* not the PIT's */
    CHECK(devices_validate(&dev, 1 << 20, err, sizeof(err)) < 0);
    reset();
    dev.machine = 7;
    CHECK(devices_validate(&dev, 1 << 20, err, sizeof(err)) < 0);
    g_passed++;
}

int main(void)
{
    test_uart_autoconfig_and_output();
    test_pit_periodic_and_latch();
    test_pit_channel2_and_port61();
    test_pic_init_mask_eoi();
    test_cmos_clock_and_ram();
    test_reset_and_unclaimed_ports();
    test_validate();
    printf("pc devices: %d passed, %d failed\n", g_passed, g_failed);
    return g_failed ? 1 : 0;
}
