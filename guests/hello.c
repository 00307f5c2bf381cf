/*
 * hello - the smallest kvmrr guest: one line on the serial port, exit 0.
 *
 * Boot argument fault=<kind> then raises a CPU exception instead of returning, to test
 * the runtime's fault path ("fault <vec> rip=<hex>", exit code 0x80 + vec):
 *   de (#DE, 0)  ud (#UD, 6)  gp (#GP, 13: non-canonical load)
 *   pf (#PF, 14: load from 256 GiB, beyond any guest RAM)
 * (No int3: on this host KVM's instruction emulator cannot execute INT3/INT n at all.)
 */
#include "runtime.h"

static void raise_fault(const char *kind)
{
    if (strcmp(kind, "de") == 0) {
        unsigned long zero = 0, hi = 0, lo = 1;
        __asm__ volatile("divq %2" : "+a"(lo), "+d"(hi) : "r"(zero));
    } else if (strcmp(kind, "ud") == 0) {
        __asm__ volatile("ud2");
    } else if (strcmp(kind, "gp") == 0) {
        __asm__ volatile("movq (%0), %%rax" : : "r"(0x8000000000000000ul) : "rax", "memory");
    } else if (strcmp(kind, "pf") == 0) {
        __asm__ volatile("movq (%0), %%rax" : : "r"(0x4000000000ul) : "rax", "memory");
    }
    printf("hello: no fault raised for fault=%s\n", kind);
}

int main(void)
{
    puts("hello from kvmrr\n");
    const char *fault = bootarg("fault");
    if (fault) {
        raise_fault(fault);
        return 1;
    }
    return 0;
}
