/*
 * dev_uart8250.c - an 8250-family UART at COM1 that Linux's 8250 driver detects as a
 * 16550A: its autoconfig checks that IER keeps its low nibble, that loopback (MCR bit 4)
 * reflects MCR's outputs into MSR's inputs, and that IIR's top bits read 11 once FCR
 * enables the FIFOs.  Transmission is instant (LSR always says THR and the shifter are
 * empty), nothing is ever received, and the UART never raises its IRQ: the kernel's
 * console writes by polling LSR.  Bytes written to THR outside loopback are the guest's
 * console output.  Register layout: the 16550A data sheet (TI/National PC16550D).
 */
#include "internal.h"

enum { RBR_THR = 0, IER = 1, IIR_FCR = 2, LCR = 3, MCR = 4, LSR = 5, MSR = 6, SCR = 7 };
#define LCR_DLAB 0x80
#define MCR_LOOP 0x10
#define LSR_THRE 0x20
#define LSR_TEMT 0x40
#define IIR_NONE 0x01
#define IIR_THRI 0x02
#define IIR_FIFO 0xc0
#define IER_THRI 0x02

/* MSR's modem inputs: in loopback they are MCR's outputs (DTR->DSR, RTS->CTS,
 * OUT1->RI, OUT2->DCD); otherwise a modem that is there and ready (CTS, DSR, DCD). */
static uint8_t msr(const struct pc_uart *u)
{
    if (!(u->mcr & MCR_LOOP))
        return 0xb0;
    return (uint8_t)(((u->mcr & 0x01) << 5) | ((u->mcr & 0x02) << 3)
                     | ((u->mcr & 0x04) << 4) | ((u->mcr & 0x08) << 4));
}

int uart_pio(struct pc_uart *u, struct pio_access *io, uint8_t *byte_out)
{
    if (io->size != 1)
        return PIO_BAD;
    int reg = io->port - PC_COM1;
    uint8_t v = (uint8_t)io->value;
    bool dlab = u->lcr & LCR_DLAB;
    if (io->write) {
        switch (reg) {
        case RBR_THR:
            if (dlab) { u->dll = v; return PIO_DONE; }
            u->thr_irq = 1;           /* sent at once: THR is empty again */
            if (u->mcr & MCR_LOOP)
                return PIO_DONE;      /* looped back to a receiver that drops it */
            *byte_out = v;
            return PIO_OUTPUT;
        case IER:
            if (dlab) { u->dlm = v; return PIO_DONE; }
            u->ier = v & 0x0f;
            if (u->ier & IER_THRI)
                u->thr_irq = 1;
            return PIO_DONE;
        case IIR_FCR: u->fcr = v & 0xc9; return PIO_DONE;  /* bits 1-2 reset, not kept */
        case LCR: u->lcr = v; return PIO_DONE;
        case MCR: u->mcr = v & 0x1f; return PIO_DONE;
        case LSR: case MSR: return PIO_DONE;               /* read-only: ignored */
        case SCR: u->scr = v; return PIO_DONE;
        }
        return PIO_BAD;
    }
    switch (reg) {
    case RBR_THR: io->value = dlab ? u->dll : 0; return PIO_DONE;
    case IER: io->value = dlab ? u->dlm : u->ier; return PIO_DONE;
    case IIR_FCR: {
        uint8_t iir = IIR_NONE;
        if ((u->ier & IER_THRI) && u->thr_irq) {
            iir = IIR_THRI;
            u->thr_irq = 0;           /* reading IIR clears a THR-empty interrupt */
        }
        io->value = iir | ((u->fcr & 0x01) ? IIR_FIFO : 0);
        return PIO_DONE;
    }
    case LCR: io->value = u->lcr; return PIO_DONE;
    case MCR: io->value = u->mcr; return PIO_DONE;
    case LSR: io->value = LSR_THRE | LSR_TEMT; return PIO_DONE;
    case MSR: io->value = msr(u); return PIO_DONE;
    case SCR: io->value = u->scr; return PIO_DONE;
    }
    return PIO_BAD;
}
