/*
 * ring3 - drops to ring 3 with IRETQ and loops there.  This host cannot count ring-3
 * code, so a recording must refuse it (exit 2, one line), never record it.
 */
#include "tlib.h"

static uint64_t gdt[8] __attribute__((aligned(16)));
static uint8_t user_stack[4096] __attribute__((aligned(16)));

struct dtr {
    uint16_t limit;
    uint64_t base;
} __attribute__((packed));

static void user_loop(void)
{
    for (;;)
        __asm__ volatile("" ::: "memory");
}

int main(void)
{
    gdt[1] = 0x00af9a000000ffffull;   /* 0x08: ring-0 64-bit code */
    gdt[2] = 0x00cf92000000ffffull;   /* 0x10: ring-0 data */
    gdt[3] = 0x00affa000000ffffull;   /* 0x18: ring-3 64-bit code */
    gdt[4] = 0x00cff2000000ffffull;   /* 0x20: ring-3 data */
    struct dtr g = { sizeof(gdt) - 1, (uint64_t)gdt };
    __asm__ volatile("lgdt %0" :: "m"(g) : "memory");
    t_timer_start();
    puts("ring3: going to CPL 3\n");
    uint64_t top = (uint64_t)(user_stack + sizeof(user_stack));
    __asm__ volatile("pushq $0x23\n\tpushq %0\n\tpushq $0x202\n\tpushq $0x1b\n\tpushq %1\n\tiretq"
                     :: "r"(top), "r"((uint64_t)user_loop) : "memory");
    return 1;
}
