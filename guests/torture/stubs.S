/* stubs.S - exception handlers of the torture guests (see tlib.h).  They touch no
 * register but RSP and RIP in the frame: the interrupted code sees only the skip. */
    .text
    .globl t_ud_skip2, t_ud_nested, t_de_skip3, t_gp_skip3, t_pf_skip3, t_trap_count
    .globl t_ud_skip3, t_nm_skip3, t_db_untrap, t_db_untrap_dr6, t_db_resume

/* #UD on a 2-byte UD2 */
t_ud_skip2:
    incq t_faults(%rip)
    addq $2, (%rsp)
    iretq

/* #UD whose handler itself executes INT3 and, once, a nested UD2 */
t_ud_nested:
    cmpq $0, ud_depth(%rip)
    jne 1f
    incq ud_depth(%rip)
    int3
    ud2
    decq ud_depth(%rip)
1:  incq t_faults(%rip)
    addq $2, (%rsp)
    iretq

/* #DE on a 3-byte DIV r/m64 */
t_de_skip3:
    incq t_faults(%rip)
    addq $3, (%rsp)
    iretq

/* #GP and #PF (error code pushed) on a 3-byte MOV r64, [r64]; #PF folds CR2 */
t_gp_skip3:
    addq $8, %rsp
    incq t_faults(%rip)
    addq $3, (%rsp)
    iretq

t_pf_skip3:
    addq $8, %rsp
    pushq %rax
    movq %cr2, %rax
    xorq %rax, t_acc(%rip)
    popq %rax
    incq t_faults(%rip)
    addq $3, (%rsp)
    iretq

/* #UD and #NM (no error code) on a 3-byte instruction (XSAVE (%rax) and kin) */
t_ud_skip3:
t_nm_skip3:
    incq t_faults(%rip)
    addq $3, (%rsp)
    iretq

/* #DB from the guest's own RFLAGS.TF: count it and clear TF in the frame (one trap) */
t_db_untrap:
    incq t_traps(%rip)
    andq $~0x100, 16(%rsp)
    iretq

/* the same, clearing DR6's cause bits as an OS's handler does */
t_db_untrap_dr6:
    incq t_traps(%rip)
    andq $~0x100, 16(%rsp)
    pushq %rax
    movq $0xffff0ff0, %rax
    movq %rax, %dr6
    popq %rax
    iretq

/* a breakpoint of the guest's own (DR0): count it, resume past it with RF */
t_db_resume:
    incq t_traps(%rip)
    orq $0x10000, 16(%rsp)
    iretq

/* INT3 / INT n: a trap, RIP already past it */
t_trap_count:
    incq t_traps(%rip)
    iretq

    .data
ud_depth: .quad 0
    .section .note.GNU-stack, "", @progbits
