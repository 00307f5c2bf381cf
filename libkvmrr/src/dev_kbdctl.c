/*
 * dev_kbdctl.c - the little of the i8042 keyboard controller a kernel without a keyboard
 * driver touches: its status (port 0x64: both buffers empty, so a wait for the input
 * buffer ends at once), its data port (0x60: nothing to read), and the pulse of the CPU's
 * reset line (command 0xfe to port 0x64), which is how Linux reboots with reboot=k.  The
 * reset ends the run, as the kvmrr machine's exit port does, with exit code 0.
 */
#include "internal.h"

#define KBD_DATA   0x60
#define KBD_STATUS 0x64
#define KBD_RESET  0xfe

int kbdctl_pio(struct pio_access *io)
{
    if (io->size != 1)
        return PIO_BAD;
    if (!io->write) {
        io->value = io->port == KBD_STATUS ? 0x1c : 0x00;   /* system flag, command mode, unlocked */
        return PIO_DONE;
    }
    if (io->port == KBD_STATUS && (uint8_t)io->value == KBD_RESET) {
        io->value = 0;
        return PIO_EXIT;
    }
    return PIO_DONE;     /* other controller commands and keyboard bytes: no effect here */
}
