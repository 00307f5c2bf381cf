/*
 * shadows - interrupts due in STI and MOV SS shadows and on HLT; PUSHF, POPF (turning IF
 * on and off), and IRETQ through frames the guest builds itself.
 */
#include "tlib.h"

int main(void)
{
    uint64_t n = t_iters(400);
    t_timer_start();
    for (uint64_t i = 0; i < n; i++) {
        uint64_t a = i, f;
        __asm__ volatile("sti\n\tinc %0\n\tcli" : "+r"(a) :: "memory");
        __asm__ volatile("sti\n\tmov %%ss, %%ax\n\tmov %%ax, %%ss\n\tinc %%rbx\n\tcli"
                         : "+b"(a) :: "rax", "memory");
        __asm__ volatile("pushfq\n\tpopq %0" : "=r"(f) :: "memory");
        t_fold(f & ~0x100ull);
        /* POPF with IF set, then clear again */
        __asm__ volatile("pushfq\n\torq $0x200, (%%rsp)\n\tpopfq\n\tnop\n\tnop\n\t"
                         "pushfq\n\tandq $~0x200, (%%rsp)\n\tpopfq" ::: "memory", "cc");
        /* IRETQ to the next instruction, with IF on in the popped RFLAGS */
        __asm__ volatile("movq %%rsp, %%rax\n\tpushq $0x10\n\tpushq %%rax\n\tpushfq\n\t"
                         "orq $0x200, (%%rsp)\n\tpushq $0x8\n\tleaq 1f(%%rip), %%rax\n\t"
                         "pushq %%rax\n\tiretq\n1:\tinc %%rcx\n\tinc %%rcx\n\tcli"
                         : "+c"(a) :: "rax", "memory", "cc");
        if (i % 8 == 0 && bootarg_u64("timer_hz", 1000) >= 100)
            idle_wait();   /* sti; hlt; cli: woken by the next tick */
        t_fold(a);
    }
    return t_finish("shadows");
}
