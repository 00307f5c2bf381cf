/*
 * dev_pic.c - the two cascaded 8259A interrupt controllers of a PC: the master at
 * 0x20/0x21 (IRQ 0-7, the slave on IR2), the slave at 0xa0/0xa1 (IRQ 8-15).  What is
 * modelled is what an operating system programs: the ICW1-ICW4 initialisation sequence
 * (ICW2 gives the vectors), the mask (OCW1), EOIs (OCW2), and which of IRR and ISR the
 * command port reads (OCW3).  Only IRQ 0, the PIT's, is ever raised here (the run loop
 * asks pic_vector/pic_deliver when a tick is due), so priority is fixed and no rotation
 * or special mask mode is kept: OCW2 rotations act as their plain EOI.
 * Register layout: Intel 8259A data sheet.
 */
#include "internal.h"

static struct pic_chip *chip_of(struct pc_pic *p, uint16_t port)
{
    return &p->chip[(port & 0x80) ? 1 : 0];
}

/* The highest-priority (lowest-numbered) bit set, or -1. */
static int lowest_bit(uint8_t v)
{
    return v ? __builtin_ctz(v) : -1;
}

static void command(struct pic_chip *c, uint8_t v)
{
    if (v & 0x10) {                                   /* ICW1: start initialisation */
        c->imr = c->irr = c->isr = 0;
        c->icw4 = v & 0x01;
        c->single = (v >> 1) & 1;
        c->read_isr = c->auto_eoi = 0;
        c->icw_step = 2;
        return;
    }
    if (v & 0x08) {                                   /* OCW3 */
        if (v & 0x02)
            c->read_isr = v & 0x01;
        return;
    }
    int op = v >> 5;                                  /* OCW2 */
    if (op == 1 || op == 5) {                         /* non-specific EOI (rotating too) */
        int b = lowest_bit(c->isr);
        if (b >= 0)
            c->isr &= (uint8_t)~(1u << b);
    } else if (op == 3 || op == 7) {                  /* specific EOI (rotating too) */
        c->isr &= (uint8_t)~(1u << (v & 7));
    }
}

static void data(struct pic_chip *c, uint8_t v)
{
    switch (c->icw_step) {
    case 2:
        c->base = v & 0xf8;
        c->icw_step = c->single ? (c->icw4 ? 4 : 0) : 3;
        return;
    case 3:                                           /* ICW3: the cascade wiring */
        c->icw_step = c->icw4 ? 4 : 0;
        return;
    case 4:
        c->auto_eoi = (v >> 1) & 1;
        c->icw_step = 0;
        return;
    default:
        c->imr = v;                                   /* OCW1 */
    }
}

int pic_pio(struct pc_pic *p, struct pio_access *io)
{
    if (io->size != 1)
        return PIO_BAD;
    struct pic_chip *c = chip_of(p, io->port);
    bool cmd = !(io->port & 1);
    if (io->write) {
        if (cmd)
            command(c, (uint8_t)io->value);
        else
            data(c, (uint8_t)io->value);
        return PIO_DONE;
    }
    io->value = cmd ? (c->read_isr ? c->isr : c->irr) : c->imr;
    return PIO_DONE;
}

int pic_vector(const struct pc_pic *p, int irq)
{
    const struct pic_chip *m = &p->chip[0];
    if (irq != 0 || m->icw_step)
        return -1;             /* only IRQ 0 is raised here; not while initialising */
    if ((m->imr & 1) || (m->isr & 1))
        return -1;             /* masked, or IRQ 0 (the highest priority) in service */
    return m->base;
}

void pic_deliver(struct pc_pic *p, int irq)
{
    struct pic_chip *m = &p->chip[0];
    m->irr &= (uint8_t)~(1u << irq);
    if (!m->auto_eoi)
        m->isr |= (uint8_t)(1u << irq);
}
