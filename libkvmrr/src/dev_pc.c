/*
 * dev_pc.c - the PC machine's port map (KVMRR_MACHINE_PC, the Linux guest): which device
 * model answers which port.  Ports no model claims stay an error (PIO_BAD: the run stops
 * with one line naming the port), so a kernel that needs more is seen, not guessed at.
 */
#include "internal.h"

static bool in(uint16_t port, uint16_t lo, uint16_t n) { return port >= lo && port < lo + n; }

int pc_pio(struct kvmrr_devices *dev, struct pio_access *io)
{
    struct pc_devices *pc = &dev->pc;
    uint16_t port = io->port;
    if (in(port, PC_COM1, 8)) {
        uint8_t byte;
        int eff = uart_pio(&pc->uart, io, &byte);
        return eff == PIO_OUTPUT ? devices_serial_put(dev, byte, io) : eff;
    }
    /* COM2-COM4: absent, as an empty ISA bus reads (all ones) */
    if (in(port, 0x2f8, 8) || in(port, 0x3e8, 8) || in(port, 0x2e8, 8)) {
        if (!io->write)
            io->value = 0xff;
        return io->size == 1 ? PIO_DONE : PIO_BAD;
    }
    if (in(port, 0x40, 4) || port == 0x61) {
        uint64_t before = dev->timer_period_ns;
        int eff = pit_pio(&pc->pit, io, NULL);
        dev->timer_period_ns = pit_period_ns(&pc->pit);
        return eff == PIO_DONE && dev->timer_period_ns != before ? PIO_TIMER : eff;
    }
    if (port == 0x20 || port == 0x21 || port == 0xa0 || port == 0xa1)
        return pic_pio(&pc->pic, io);
    if (port == 0x70 || port == 0x71)
        return cmos_pio(&pc->cmos, io);
    if (port == 0x60 || port == 0x64)
        return kbdctl_pio(io);
    if (port == 0x80 && io->write)
        return PIO_DONE;   /* the POST port: Linux writes it only to wait a moment */
    return PIO_BAD;
}

void pc_input_apply(struct kvmrr_devices *dev, struct pio_access *io, uint64_t value)
{
    if (io->port == 0x71)
        cmos_input(&dev->pc.cmos, io, value);
    else
        pit_input(&dev->pc.pit, io, value);
    dev->timer_period_ns = pit_period_ns(&dev->pc.pit);
}

/* PC device state read back from a snapshot: the ranges the models rely on. */
int pc_validate(const struct pc_devices *pc, char *err, size_t err_len)
{
    for (int i = 0; i < 3; i++) {
        const struct pit_channel *c = &pc->pit.ch[i];
        if (c->mode > 5 || c->access > 3 || (c->loaded && (c->reload < 1 || c->reload > 65536)))
            return ERRF(err, err_len, "device state: PIT channel %d mode %u access %u "
                        "reload %u out of range", i, c->mode, c->access, c->reload);
    }
    for (int i = 0; i < 2; i++) {
        uint8_t s = pc->pic.chip[i].icw_step;
        if (s != 0 && s != 2 && s != 3 && s != 4)
            return ERRF(err, err_len, "device state: PIC %d in initialisation step %u", i, s);
    }
    if (pc->cmos.index >= sizeof(pc->cmos.ram))
        return ERRF(err, err_len, "device state: CMOS index 0x%x beyond its RAM", pc->cmos.index);
    return 0;
}
