/*
 * devices.c - the device models behind the guest's I/O ports (kvmrr_abi.h).
 *
 * devices_pio() is the exit handler for port I/O and is pure: it changes only the device
 * state and guest memory it is given, and tells the run loop what else the access means
 * (a non-deterministic input to take from the host or the log, an output to log, ...).
 * Both record and replay call it, so the device models run identically on every replica
 * and only PIO_INPUT values ever need the log.
 */
#include <string.h>

#include "internal.h"

static bool guest_range_ok(uint64_t mem_size, uint64_t addr, uint64_t len)
{
    return addr <= mem_size && len <= mem_size - addr;
}

bool devices_serial_flush(struct kvmrr_devices *dev, struct pio_access *io)
{
    if (!dev->serial_len)
        return false;
    io->channel = KVMRR_CHANNEL_SERIAL;
    io->out_data = dev->serial_buf;
    io->out_len = dev->serial_len;
    dev->serial_len = 0;   /* the caller consumes out_data before the next serial write */
    return true;
}

int devices_serial_put(struct kvmrr_devices *dev, uint8_t byte, struct pio_access *io)
{
    dev->serial_buf[dev->serial_len++] = byte;
    if (byte == '\n' || dev->serial_len == KVMRR_SERIAL_LINE)
        return devices_serial_flush(dev, io) ? PIO_OUTPUT : PIO_DONE;
    return PIO_DONE;
}

int devices_timer_vector(const struct kvmrr_devices *dev)
{
    return dev->machine == KVMRR_MACHINE_PC ? pic_vector(&dev->pc.pic, 0) : KVMRR_VEC_TIMER;
}

void devices_timer_delivered(struct kvmrr_devices *dev)
{
    if (dev->machine == KVMRR_MACHINE_PC)
        pic_deliver(&dev->pc.pic, 0);
}

enum pio_effect devices_pio(struct kvmrr_devices *dev, uint8_t *mem, uint64_t mem_size,
                            struct pio_access *io)
{
    if (dev->machine == KVMRR_MACHINE_PC)
        return (enum pio_effect)pc_pio(dev, io);
    uint32_t v32 = (uint32_t)io->value;
    switch (io->port) {
    case KVMRR_PORT_SERIAL:
        if (!io->write)
            return PIO_BAD;
        return (enum pio_effect)devices_serial_put(dev, (uint8_t)io->value, io);
    case KVMRR_PORT_EXIT:
        return io->write ? PIO_EXIT : PIO_BAD;
    case KVMRR_PORT_TIMER:
        if (!io->write || io->size != 4)
            return PIO_BAD;
        dev->timer_period_ns = (uint64_t)v32 * 1000;
        return PIO_TIMER;
    case KVMRR_PORT_CLOCK_LO:
        /* The run loop supplies the 64-bit value (host clock or log) through
         * devices_input_apply(): one logged event per clock read, not two. */
        io->input = INPUT_WALL_NS;
        return (!io->write && io->size == 4) ? PIO_INPUT : PIO_BAD;
    case KVMRR_PORT_CLOCK_HI:
        if (io->write || io->size != 4)
            return PIO_BAD;
        io->value = dev->clock_latch >> 32;
        return PIO_DONE;
    case KVMRR_PORT_RANDOM:
        return (!io->write && io->size == 4) ? PIO_INPUT : PIO_BAD;
    case KVMRR_PORT_NIC_RX_ADDR:
        if (!io->write || io->size != 4)
            return PIO_BAD;
        dev->nic_rx_addr = v32;
        return PIO_DONE;
    case KVMRR_PORT_NIC_RX_CAP:
        if (!io->write || io->size != 4)
            return PIO_BAD;
        dev->nic_rx_cap = v32 > KVMRR_NIC_MTU ? KVMRR_NIC_MTU : v32;
        return PIO_DONE;
    case KVMRR_PORT_NIC_RX_LEN:
        if (io->write || io->size != 4)
            return PIO_BAD;
        io->value = dev->nic_rx_len;
        return PIO_DONE;
    case KVMRR_PORT_NIC_RX_ACK:
        if (!io->write)
            return PIO_BAD;
        dev->nic_rx_len = 0;
        return PIO_RX_ACK;
    case KVMRR_PORT_NIC_TX_ADDR:
        if (!io->write || io->size != 4)
            return PIO_BAD;
        dev->nic_tx_addr = v32;
        return PIO_DONE;
    case KVMRR_PORT_NIC_TX_LEN:
        if (!io->write || io->size != 4 || v32 > KVMRR_NIC_MTU
            || !guest_range_ok(mem_size, dev->nic_tx_addr, v32))
            return PIO_BAD;
        io->channel = KVMRR_CHANNEL_NIC;
        io->out_data = mem + dev->nic_tx_addr;
        io->out_len = v32;
        return PIO_OUTPUT;
    default:
        return PIO_BAD;
    }
}

/* The NIC can take a packet when the guest has given it a buffer and freed the last one. */
bool devices_nic_ready(const struct kvmrr_devices *dev, uint64_t mem_size)
{
    return dev->nic_rx_cap && dev->nic_rx_len == 0
           && guest_range_ok(mem_size, dev->nic_rx_addr, dev->nic_rx_cap);
}

/* DMA a packet into the rx buffer; returns the bytes written (cut to the buffer size). */
uint32_t devices_nic_deliver(struct kvmrr_devices *dev, uint8_t *mem, const uint8_t *data,
                             uint32_t len)
{
    if (len > dev->nic_rx_cap)
        len = (uint32_t)dev->nic_rx_cap;
    memcpy(mem + dev->nic_rx_addr, data, len);
    dev->nic_rx_len = len ? len : 1;   /* a zero-length packet still reads as present */
    return len;
}

/* Complete a PIO_INPUT read with its 64-bit value (from the host or the log). */
void devices_input_apply(struct kvmrr_devices *dev, struct pio_access *io, uint64_t value)
{
    if (dev->machine == KVMRR_MACHINE_PC) {
        pc_input_apply(dev, io, value);
        return;
    }
    if (io->port == KVMRR_PORT_CLOCK_LO) {
        dev->clock_latch = value;
        io->value = (uint32_t)value;
    } else {
        io->value = (uint32_t)value;
    }
}

/* The invariants devices_pio() keeps, checked on state read back from outside (a
 * snapshot): a serial line is flushed at KVMRR_SERIAL_LINE bytes, so a longer one would
 * write past serial_buf; addresses and periods come from 32-bit port writes. */
int devices_validate(const struct kvmrr_devices *dev, uint64_t mem_size, char *err,
                     size_t err_len)
{
    if (dev->machine != KVMRR_MACHINE_KVMRR && dev->machine != KVMRR_MACHINE_PC)
        return ERRF(err, err_len, "device state: unknown machine %u", dev->machine);
    if (dev->serial_len >= KVMRR_SERIAL_LINE)
        return ERRF(err, err_len, "device state: serial line of %u bytes, at most %d",
                    dev->serial_len, KVMRR_SERIAL_LINE - 1);
    if (dev->machine == KVMRR_MACHINE_PC) {
        if (dev->timer_period_ns != pit_period_ns(&dev->pc.pit))
            return ERRF(err, err_len, "device state: timer period differs from the PIT's");
        return pc_validate(&dev->pc, err, err_len);
    }
    if (dev->timer_period_ns % 1000 || dev->timer_period_ns / 1000 > UINT32_MAX)
        return ERRF(err, err_len, "device state: timer period %llu ns is not one the guest "
                    "can program", (unsigned long long)dev->timer_period_ns);
    if (dev->nic_rx_addr > UINT32_MAX || dev->nic_tx_addr > UINT32_MAX)
        return ERRF(err, err_len, "device state: NIC buffer address beyond 32 bits");
    if (dev->nic_rx_cap > KVMRR_NIC_MTU || dev->nic_rx_len > KVMRR_NIC_MTU)
        return ERRF(err, err_len, "device state: NIC rx buffer of %llu bytes holding %llu, "
                    "at most %d", (unsigned long long)dev->nic_rx_cap,
                    (unsigned long long)dev->nic_rx_len, KVMRR_NIC_MTU);
    (void)mem_size;   /* addresses are checked against RAM where they are used */
    return 0;
}
