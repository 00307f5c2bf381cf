/*
 * pc.h - the standard PC devices a stock Linux kernel drives (docs/ARCHITECTURE.md §7):
 * an 8250/16550A UART, the i8254 PIT (and port 0x61), the 8259 PIC pair, the CMOS RTC and
 * the i8042's status and reset.  One device per file (dev_*.c), each a pure function of
 * its state and the access, as the kvmrr machine's ports are (devices.c); dev_pc.c routes
 * the ports.  What the host decides (the time a PIT count or an RTC register shows) is
 * never read here: the device asks for it as a PIO_INPUT and gets it back, from the host
 * on record and from the log on replay, through devices_input_apply().
 */
#ifndef KVMRR_PC_H
#define KVMRR_PC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct pio_access;

/* What a PIO_INPUT asks the host for: the value logged is the raw host reading, and the
 * device turns it into what the guest reads, so a replay applies the same conversion. */
enum pio_input { INPUT_RANDOM = 0, INPUT_WALL_NS, INPUT_MONO_NS };

/* ---- 8250 UART (dev_uart8250.c): COM1 at 0x3f8, seen as a 16550A ---- */
#define PC_COM1 0x3f8
struct pc_uart {
    uint8_t ier, lcr, mcr, scr, fcr, dll, dlm;
    uint8_t thr_irq;        /* a THR-empty interrupt is pending (read and cleared by IIR) */
};

/* ---- i8254 PIT (dev_pit.c) ---- */
#define PIT_HZ 1193182ull   /* the PIT's input clock */
struct pit_channel {
    uint8_t mode;           /* 0..5 from the control word */
    uint8_t access;         /* 1 LSB, 2 MSB, 3 LSB then MSB */
    uint8_t write_msb;      /* access 3: the next write is the MSB */
    uint8_t read_msb;       /* access 3: the next read is the MSB */
    uint8_t latched;        /* a latch command is waiting for its first read */
    uint8_t latch_valid;    /* latch holds a count being read out */
    uint8_t latch_msb;      /* the next read of the latch is its MSB */
    uint8_t pad;
    uint16_t latch;
    uint16_t pending_lsb;   /* access 3: the LSB written, waiting for the MSB */
    uint32_t reload;        /* 1..65536 (0 written means 65536) */
    uint64_t load_ns;       /* host monotonic ns at the load (a logged input) */
    uint8_t loaded;         /* the channel counts */
    uint8_t pad2[7];
};
struct pc_pit {
    struct pit_channel ch[3];
    uint8_t port61;         /* bits 0 (gate 2) and 1 (speaker) as written */
    uint8_t refresh;        /* bit 4 of port 0x61 toggles at every read */
    uint8_t pad[6];
};

/* ---- 8259 PIC pair (dev_pic.c): master 0x20/0x21, slave 0xa0/0xa1 ---- */
struct pic_chip {
    uint8_t imr, irr, isr;
    uint8_t base;           /* vector of IR0, from ICW2 */
    uint8_t icw_step;       /* 0 ready; 2, 3, 4: the next data write is that ICW */
    uint8_t icw4;           /* ICW1 said an ICW4 follows */
    uint8_t single;         /* ICW1: no cascade */
    uint8_t read_isr;       /* OCW3: the command port reads the ISR, else the IRR */
    uint8_t auto_eoi;       /* ICW4 */
    uint8_t pad[7];
};
struct pc_pic { struct pic_chip chip[2]; };

/* ---- CMOS RTC (dev_cmos.c) ---- */
struct pc_cmos {
    uint8_t index;          /* the register selected by port 0x70 (NMI bit dropped) */
    uint8_t ram[128];       /* what the guest wrote; the clock registers come from time */
    uint8_t pad[7];
};

struct pc_devices {
    struct pc_uart uart;
    struct pc_pit pit;
    struct pc_pic pic;
    struct pc_cmos cmos;
};

/* Each device's port handler returns an enum pio_effect (internal.h); out-of-range
 * accesses are for the caller (dev_pc.c) to refuse. */
int uart_pio(struct pc_uart *u, struct pio_access *io, uint8_t *byte_out);
int pit_pio(struct pc_pit *p, struct pio_access *io, uint64_t *period_ns);
/* Channel 0 as a periodic timer: its period in ns, or 0 when it is not one. */
uint64_t pit_period_ns(const struct pc_pit *p);
void pit_input(struct pc_pit *p, struct pio_access *io, uint64_t mono_ns);
int pic_pio(struct pc_pic *p, struct pio_access *io);
/* The vector IRQ irq would be delivered at now, or -1 if the PIC holds it back (masked,
 * or a request of the same or higher priority in service). */
int pic_vector(const struct pc_pic *p, int irq);
/* The CPU took IRQ irq: in service until its EOI (unless auto-EOI). */
void pic_deliver(struct pc_pic *p, int irq);
int cmos_pio(struct pc_cmos *c, struct pio_access *io);
void cmos_input(struct pc_cmos *c, struct pio_access *io, uint64_t wall_ns);
int kbdctl_pio(struct pio_access *io);

/* dev_pc.c: the PC machine's port map */
struct kvmrr_devices;
int pc_pio(struct kvmrr_devices *dev, struct pio_access *io);
void pc_input_apply(struct kvmrr_devices *dev, struct pio_access *io, uint64_t value);
int pc_validate(const struct pc_devices *pc, char *err, size_t err_len);

#endif
