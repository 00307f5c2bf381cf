/*
 * triple - a fault with no IDT to deliver it: #UD, then #DF, then a triple fault (shutdown).
 * The core must end with a clear error, not hang or crash.
 */
#include "tlib.h"

struct dtr {
    uint16_t limit;
    uint64_t base;
} __attribute__((packed));

int main(void)
{
    struct dtr none = { 0, 0 };
    puts("triple: faulting with an empty IDT\n");
    __asm__ volatile("lidt %0\n\tud2" :: "m"(none) : "memory");
    return 1;
}
