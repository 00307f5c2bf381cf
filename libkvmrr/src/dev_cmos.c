/*
 * dev_cmos.c - the MC146818 real-time clock and CMOS RAM behind ports 0x70 (index; bit 7
 * masks NMIs) and 0x71 (data).  The clock registers (seconds ... year, century) show the
 * host's wall clock, which is a logged input (PIO_INPUT, INPUT_WALL_NS): the value in the
 * log is the host's time in ns and the register follows from it, in BCD and 24-hour mode
 * as register B says.  No update is ever in progress (register A's UIP is 0), no alarm or
 * periodic interrupt is raised, and the battery is good (register D).  Other registers
 * are 128 bytes of RAM that keep what the guest writes.
 */
#include <time.h>

#include "internal.h"

#define REG_A 0x0a
#define REG_B 0x0b
#define REG_C 0x0c
#define REG_D 0x0d
#define REG_CENTURY 0x32

static bool is_clock(uint8_t r) { return r <= 9 || r == REG_CENTURY; }

static uint8_t bcd(int v) { return (uint8_t)(((v / 10) << 4) | (v % 10)); }

int cmos_pio(struct pc_cmos *c, struct pio_access *io)
{
    if (io->size != 1)
        return PIO_BAD;
    if (io->port == 0x70) {
        if (io->write)
            c->index = (uint8_t)io->value & 0x7f;
        else
            io->value = c->index;
        return PIO_DONE;
    }
    uint8_t r = c->index;
    if (io->write) {
        if (!is_clock(r) && r != REG_C && r != REG_D)
            c->ram[r] = (uint8_t)io->value;
        return PIO_DONE;
    }
    if (is_clock(r)) {
        io->input = INPUT_WALL_NS;
        return PIO_INPUT;
    }
    switch (r) {
    case REG_A: io->value = 0x26; break;            /* 32.768 kHz, 1024 Hz; UIP clear */
    case REG_B: io->value = 0x02; break;            /* 24-hour, BCD, no interrupts */
    case REG_C: io->value = 0x00; break;            /* no interrupt flags */
    case REG_D: io->value = 0x80; break;            /* valid RAM and time */
    default: io->value = c->ram[r];
    }
    return PIO_DONE;
}

/* Complete a clock register read with the host's wall clock (ns since the epoch). */
void cmos_input(struct pc_cmos *c, struct pio_access *io, uint64_t wall_ns)
{
    time_t secs = (time_t)(wall_ns / 1000000000ull);
    struct tm tm;
    gmtime_r(&secs, &tm);
    int year = tm.tm_year + 1900;
    switch (c->index) {
    case 0: io->value = bcd(tm.tm_sec); break;
    case 2: io->value = bcd(tm.tm_min); break;
    case 4: io->value = bcd(tm.tm_hour); break;
    case 6: io->value = bcd(tm.tm_wday + 1); break;
    case 7: io->value = bcd(tm.tm_mday); break;
    case 8: io->value = bcd(tm.tm_mon + 1); break;
    case 9: io->value = bcd(year % 100); break;
    case REG_CENTURY: io->value = bcd(year / 100); break;
    default: io->value = 0;                          /* the alarm registers: none set */
    }
}
