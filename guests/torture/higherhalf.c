/*
 * higherhalf - the guest's own page tables: 4 KiB pages mapping its first 4 MiB again at
 * 0xffff800000000000 (non-identity), the stack moved there, the IDT loaded at its
 * higher-half alias with #UD, INT3 and INT 0x40 handled by higher-half aliases of the
 * handlers, and a loop run from the higher half with the timer on.  Every address the
 * core reads by (RIP, RSP, the IDT) is virtual here, and none equals its physical one.
 */
#include "tlib.h"

#define HH 0xffff800000000000ull
#define PTE_P 1ull
#define PTE_RW 2ull

static uint64_t pdpt[512] __attribute__((aligned(4096)));
static uint64_t pd[512] __attribute__((aligned(4096)));
static uint64_t pt[2][512] __attribute__((aligned(4096)));
static uint8_t hh_stack[16384] __attribute__((aligned(4096)));

struct dtr {
    uint16_t limit;
    uint64_t base;
} __attribute__((packed));

static void work(uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        uint64_t a = i;
        __asm__ volatile("ud2" ::: "memory");
        __asm__ volatile("int3\n\tinc %0\n\tint $0x40" : "+r"(a) :: "memory");
        uint64_t rsp;
        __asm__ volatile("movq %%rsp, %0" : "=r"(rsp));
        t_fold(a ^ rsp);
        uint64_t rip;
        __asm__ volatile("leaq 0(%%rip), %0" : "=r"(rip));
        t_fold(rip);
    }
}

int main(void)
{
    uint64_t cr3;
    __asm__ volatile("movq %%cr3, %0" : "=r"(cr3));
    uint64_t *pml4 = (uint64_t *)(cr3 & ~0xfffull);
    for (int t = 0; t < 2; t++)
        for (int k = 0; k < 512; k++)
            pt[t][k] = ((uint64_t)(t * 512 + k) << 12) | PTE_P | PTE_RW;
    pd[0] = (uint64_t)pt[0] | PTE_P | PTE_RW;
    pd[1] = (uint64_t)pt[1] | PTE_P | PTE_RW;
    pdpt[0] = (uint64_t)pd | PTE_P | PTE_RW;
    pml4[256] = (uint64_t)pdpt | PTE_P | PTE_RW;
    __asm__ volatile("movq %0, %%cr3" :: "r"(cr3) : "memory");   /* flush */

    struct dtr idtr;
    __asm__ volatile("sidt %0" : "=m"(idtr));
    idtr.base += HH;
    __asm__ volatile("lidt %0" :: "m"(idtr) : "memory");
    t_gate(6, (void *)((uint64_t)t_ud_skip2 + HH), T_GATE_INTR);
    t_gate(3, (void *)((uint64_t)t_trap_count + HH), T_GATE_TRAP);
    t_gate(0x40, (void *)((uint64_t)t_trap_count + HH), T_GATE_INTR);

    uint64_t n = t_iters(1500);
    t_timer_start();
    irq_enable();
    /* Call work() at its alias on the alias of hh_stack. */
    uint64_t fn = (uint64_t)work + HH;
    uint64_t top = (uint64_t)(hh_stack + sizeof(hh_stack)) + HH;
    __asm__ volatile("movq %%rsp, %%rbx\n\tmovq %1, %%rsp\n\tcall *%0\n\tmovq %%rbx, %%rsp"
                     :: "r"(fn), "r"(top), "D"(n)
                     : "rax", "rbx", "rcx", "rdx", "rsi", "r8", "r9", "r10", "r11", "memory", "cc");
    return t_finish("higherhalf");
}
