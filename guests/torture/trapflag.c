/*
 * trapflag - the guest's own single-step: POPF sets RFLAGS.TF, the instruction after it
 * traps (#DB, vector 1), the handler clears TF in its frame.  Running free KVM delivers
 * those traps; single-stepped the core cannot keep the guest's TF on this host (run.c,
 * guest_tf_trap), so a `step` record refuses it at the first such POPF, exit 2.
 */
#include "tlib.h"

int main(void)
{
    t_gate(1, t_db_untrap, T_GATE_INTR);
    uint64_t n = t_iters(100);
    t_timer_start();
    irq_enable();
    for (uint64_t i = 0; i < n; i++) {
        __asm__ volatile("pushfq\n\torq $0x100, (%%rsp)\n\tpopfq\n\tnop\n\tnop" ::: "memory", "cc");
        t_fold(i ^ t_traps);
    }
    return t_finish("trapflag");
}
