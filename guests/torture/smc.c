/*
 * smc - self-modifying code: a routine rewritten before every call, and an instruction
 * rewritten by the instruction just before it, with the timer on.
 */
#include "tlib.h"

static uint8_t code[64] __attribute__((aligned(16)));

int main(void)
{
    uint64_t n = t_iters(2000);
    t_timer_start();
    irq_enable();
    for (uint64_t i = 0; i < n; i++) {
        /* mov eax, imm32; add eax, ecx; ret */
        uint32_t imm = (uint32_t)(i * 2654435761u);
        code[0] = 0xb8;
        for (int k = 0; k < 4; k++)
            code[1 + k] = (uint8_t)(imm >> (8 * k));
        code[5] = 0x01; code[6] = 0xc8;
        code[7] = (i & 1) ? 0x90 : 0xc3;   /* odd: nop; then the ret at 8 */
        code[8] = 0xc3;
        uint64_t r;
        __asm__ volatile("call *%1" : "=a"(r) : "r"(code), "c"(i) : "memory", "cc");
        t_fold(r);
        /* the store patches the immediate of the very next instruction */
        uint64_t v;
        __asm__ volatile("leaq 2f(%%rip), %%rdx\n\tmovl %k1, 1(%%rdx)\n"
                         "2:\tmovl $0, %%eax\n\tmovq %%rax, %0"
                         : "=r"(v) : "r"((uint32_t)i ^ 0x1234567u) : "rax", "rdx", "memory");
        t_fold(v);
    }
    return t_finish("smc");
}
