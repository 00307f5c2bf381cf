/*
 * exceptions - faults and software interrupts the guest handles itself, in a loop, with
 * the timer on so that ticks land on faulting instructions and inside handlers:
 * #UD (UD2), #DE (DIV by 0), #GP (a non-canonical load), #PF (a load above the mapped
 * 1 GiB), #NM (x87 instructions with CR0.TS set, raised by KVM's emulator), INT3 and
 * INT 0x40 (trap gates: the timer may interrupt their handler), and a #UD whose handler
 * executes INT3 and a nested UD2.
 */
#include "tlib.h"

int main(void)
{
    t_gate(0, t_de_skip3, T_GATE_INTR);
    t_gate(6, t_ud_skip2, T_GATE_INTR);
    t_gate(13, t_gp_skip3, T_GATE_INTR);
    t_gate(14, t_pf_skip3, T_GATE_INTR);
    t_gate(7, t_ud_skip2, T_GATE_TRAP);      /* #NM on 2-byte x87 instructions */
    t_gate(3, t_trap_count, T_GATE_TRAP);
    t_gate(0x40, t_trap_count, T_GATE_TRAP);
    t_gate(0x41, t_ud_nested, T_GATE_INTR);
    uint64_t n = t_iters(300);
    t_timer_start();
    irq_enable();
    for (uint64_t i = 0; i < n; i++) {
        __asm__ volatile("ud2" ::: "memory");
        __asm__ volatile("int3" ::: "memory");
        __asm__ volatile("int $0x40" ::: "memory");
        uint64_t q = i, r = 0;
        __asm__ volatile("divq %2" : "+a"(q), "+d"(r) : "c"(0ull) : "memory");  /* 48 f7 f1 */
        uint64_t v = i;
        __asm__ volatile("movq (%%rax), %%rbx" : "+b"(v) : "a"(0x8000000000000000ull) : "memory");
        __asm__ volatile("movq (%%rax), %%rbx" : "+b"(v) : "a"(0x80000000ull + i * 8) : "memory");
        /* #NM: FNINIT and FNSTSW with CR0.TS set (the handler skips them; a trap gate, so
         * a tick may land inside it) */
        uint64_t cr0;
        __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
        __asm__ volatile("mov %0, %%cr0" :: "r"(cr0 | 8) : "memory");
        __asm__ volatile("fninit" ::: "memory");                              /* db e3 */
        __asm__ volatile("fnstsw %%ax" ::: "rax", "memory");                  /* df e0 */
        __asm__ volatile("mov %0, %%cr0" :: "r"(cr0) : "memory");
        if (i % 16 == 0) {
            /* the nested case: UD2 handled by t_ud_nested (vector 6 repointed briefly) */
            irq_disable();
            t_gate(6, t_ud_nested, T_GATE_INTR);
            __asm__ volatile("ud2" ::: "memory");
            t_gate(6, t_ud_skip2, T_GATE_INTR);
            irq_enable();
        }
        t_fold(i ^ q ^ v ^ t_faults);
    }
    return t_finish("exceptions");
}
