/*
 * dev_pit.c - the i8254 programmable interval timer (ports 0x40-0x43) and port 0x61, where
 * channel 2's gate and output meet the PC speaker.  Channel 0 in mode 2 or 3 is the
 * periodic timer whose period the run loop keeps (kvmrr_devices.timer_period_ns); its
 * ticks reach the CPU through the PIC (dev_pic.c) as IRQ 0.
 *
 * A count depends on when it is read, which the host decides: loading a count and reading
 * one (or channel 2's output) are PIO_INPUTs whose logged value is the host's monotonic
 * clock in ns, and the count follows from it and the load's time by the PIT's 1.193182
 * MHz clock.  A latch command takes its time at the first read that follows it, so the
 * latched count costs one logged input, not two.  Gates are taken as always open.
 * Register layout: Intel 82C54 data sheet.
 */
#include "internal.h"

#define PIT_DATA0 0x40
#define PIT_CTRL  0x43
#define PORT61    0x61

uint64_t pit_period_ns(const struct pc_pit *p)
{
    const struct pit_channel *c = &p->ch[0];
    if (!c->loaded || (c->mode != 2 && c->mode != 3))
        return 0;
    return (uint64_t)c->reload * 1000000000ull / PIT_HZ;
}

static uint64_t elapsed_ticks(const struct pit_channel *c, uint64_t mono_ns)
{
    if (mono_ns <= c->load_ns)
        return 0;
    return (uint64_t)((unsigned __int128)(mono_ns - c->load_ns) * PIT_HZ / 1000000000ull);
}

static uint16_t count_at(const struct pit_channel *c, uint64_t mono_ns)
{
    uint64_t t = elapsed_ticks(c, mono_ns), r = c->reload;
    switch (c->mode) {
    case 2: return (uint16_t)(r - t % r);                       /* r..1, then again */
    case 3: return (uint16_t)((r - (2 * t) % r) & ~1u);         /* by twos, twice a period */
    default: return (uint16_t)((r - t) & 0xffff);               /* one-shot: wraps past 0 */
    }
}

static bool out_at(const struct pit_channel *c, uint64_t mono_ns)
{
    uint64_t t = elapsed_ticks(c, mono_ns), r = c->reload;
    switch (c->mode) {
    case 0: case 1: return t >= r;                   /* goes high at the terminal count */
    case 2: return t % r != r - 1;                   /* low for one clock a period */
    case 3: return t % r < (r + 1) / 2;              /* a square wave */
    default: return t != r;                          /* 4, 5: a one-clock strobe */
    }
}

/* The byte of a 16-bit count a read returns, by the channel's access mode. */
static uint8_t count_byte(uint16_t v, uint8_t access, uint8_t *msb_next)
{
    if (access == 1)
        return v & 0xff;
    if (access == 2)
        return v >> 8;
    uint8_t b = *msb_next ? v >> 8 : v & 0xff;
    *msb_next ^= 1;
    return b;
}

static int control(struct pc_pit *p, uint8_t v)
{
    int sc = v >> 6, rw = (v >> 4) & 3;
    if (sc == 3)
        return PIO_BAD;    /* read-back: not modelled, and said so rather than ignored */
    struct pit_channel *c = &p->ch[sc];
    if (rw == 0) {
        if (!c->latch_valid && c->loaded)
            c->latched = 1;
        return PIO_DONE;
    }
    int mode = (v >> 1) & 7;
    c->mode = (uint8_t)(mode > 5 ? mode - 4 : mode);
    c->access = (uint8_t)rw;
    c->write_msb = c->read_msb = c->latched = c->latch_valid = c->latch_msb = 0;
    c->loaded = 0;         /* counting stops until a count is written */
    return PIO_DONE;
}

int pit_pio(struct pc_pit *p, struct pio_access *io, uint64_t *period_ns)
{
    (void)period_ns;
    if (io->size != 1)
        return PIO_BAD;
    uint8_t v = (uint8_t)io->value;
    if (io->port == PORT61) {
        if (io->write) {
            p->port61 = v & 0x0f;
            return PIO_DONE;
        }
        p->refresh ^= 1;
        const struct pit_channel *c2 = &p->ch[2];
        if (c2->loaded && (p->port61 & 1)) {
            io->input = INPUT_MONO_NS;   /* channel 2's output depends on the time */
            return PIO_INPUT;
        }
        bool out = c2->mode != 0 && c2->mode != 1 && c2->loaded;
        io->value = (uint64_t)(p->port61 & 0x0f) | ((uint64_t)p->refresh << 4)
                    | ((uint64_t)out << 5);
        return PIO_DONE;
    }
    if (io->port == PIT_CTRL)
        return io->write ? control(p, v) : PIO_BAD;
    struct pit_channel *c = &p->ch[io->port - PIT_DATA0];
    if (io->write) {
        if (!c->access)
            return PIO_BAD;              /* a count before any control word */
        uint32_t r;
        if (c->access == 1) {
            r = v;
        } else if (c->access == 2) {
            r = (uint32_t)v << 8;
        } else if (!c->write_msb) {
            c->pending_lsb = v;
            c->write_msb = 1;
            return PIO_DONE;
        } else {
            r = c->pending_lsb | (uint32_t)v << 8;
            c->write_msb = 0;
        }
        c->reload = r ? r : 65536;
        io->input = INPUT_MONO_NS;       /* the count starts now: when, the host says */
        return PIO_INPUT;
    }
    if (c->latch_valid) {
        io->value = count_byte(c->latch, c->access, &c->latch_msb);
        if (c->access != 3 || !c->latch_msb)
            c->latch_valid = 0;          /* read out */
        return PIO_DONE;
    }
    if (!c->loaded) {
        io->value = 0;
        return PIO_DONE;
    }
    io->input = INPUT_MONO_NS;
    return PIO_INPUT;
}

/* Complete a PIO_INPUT of the PIT or port 0x61 with the host's monotonic time. */
void pit_input(struct pc_pit *p, struct pio_access *io, uint64_t mono_ns)
{
    if (io->port == PORT61) {
        bool out = out_at(&p->ch[2], mono_ns);
        io->value = (uint64_t)(p->port61 & 0x0f) | ((uint64_t)p->refresh << 4)
                    | ((uint64_t)out << 5);
        return;
    }
    struct pit_channel *c = &p->ch[io->port - PIT_DATA0];
    if (io->write) {
        c->load_ns = mono_ns;
        c->loaded = 1;
        c->latched = c->latch_valid = 0;
        return;
    }
    uint16_t now = count_at(c, mono_ns);
    if (c->latched) {
        c->latched = 0;
        c->latch = now;
        c->latch_valid = 1;
        c->latch_msb = 0;
        io->value = count_byte(now, c->access, &c->latch_msb);
        if (c->access != 3)
            c->latch_valid = 0;
        return;
    }
    io->value = count_byte(now, c->access, &c->read_msb);
}
