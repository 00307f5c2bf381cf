/*
 * trapflag - the guest's own debug machinery, which kvmrr refuses at record (run.c,
 * guest_debug_used; docs/ARCHITECTURE.md §2.7).  bootarg how=:
 *  0  POPF sets RFLAGS.TF, the instruction after it traps (#DB, vector 1), the handler
 *     clears TF in its frame;
 *  1  the same, with a handler that also clears DR6, as an OS's does (the trap is then
 *     seen only at the handler's entry);
 *  2  a breakpoint of its own: DR0 on an instruction of the loop, enabled in DR7;
 *  3  none of it: vector 1's gate shares the timer's handler, which every tick then
 *     enters (the record's watch on the #DB handler must tell the two apart).
 * Running free KVM delivers those traps, but this host hides the guest's TF from a core
 * that single-steps, and the core's breakpoints take the debug registers: a record stops
 * at the first such trap (or DR7 write) with exit 2 and one line.
 */
#include "tlib.h"


extern char isr_timer[];   /* the runtime's timer handler (start.S) */

int main(void)
{
    uint64_t how = bootarg_u64("how", 0);
    t_gate(1, how == 0 ? t_db_untrap : how == 1 ? t_db_untrap_dr6
              : how == 2 ? (const void *)t_db_resume : (const void *)isr_timer, T_GATE_INTR);
    uint64_t n = t_iters(100);
    t_timer_start();
    irq_enable();
    if (how == 2) {
        uint64_t at;
        __asm__ volatile("lea 1f(%%rip), %0\n\tjmp 2f\n1:\tnop\n\tret\n2:" : "=r"(at));
        __asm__ volatile("mov %0, %%dr0\n\tmov %1, %%dr7" :: "r"(at), "r"(0x401ull));
        for (uint64_t i = 0; i < n; i++) {
            __asm__ volatile("call *%0" :: "r"(at) : "memory");
            t_fold(i ^ t_traps);
        }
        return t_finish("trapflag");
    }
    uint64_t tf = how == 3 ? 0 : 0x100;
    for (uint64_t i = 0; i < n; i++) {
        __asm__ volatile("pushfq\n\torq %0, (%%rsp)\n\tpopfq\n\tnop\n\tnop" :: "r"(tf) : "memory", "cc");
        t_fold(i ^ t_traps);
    }
    return t_finish("trapflag");
}
