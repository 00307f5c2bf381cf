/*
 * start.S - entry point and interrupt stubs of the kvmrr guest runtime.
 *
 * Entered in 64-bit long mode at ring 0 with interrupts off, paging identity-mapped,
 * RSP 16-byte aligned at the top of RAM, CS = 0x8 (see kvmrr_abi.h).
 */
#include "runtime.h"

    .section .text.start, "ax"
    .globl _start
    .type _start, @function
_start:
    cli
    cld
    /* .bss plus RT_STACK_MIN of stack must fit below the initial RSP. */
    movl $(__bss_end + RT_STACK_MIN), %eax
    cmpq %rsp, %rax
    ja .Lnomem
    /* Zero .bss (the loader already does; a snapshot-restored image must not rely on it). */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subq %rdi, %rcx
    shrq $3, %rcx
    xorl %eax, %eax
    rep stosq
    xorl %ebp, %ebp
    call rt_init            /* IDT, boot arguments */
    call main
    movl %eax, %edi
    call kvmrr_exit         /* does not return */
1:  cli
    hlt
    jmp 1b

.Lnomem:
    movl $.Lnomem_msg, %esi
    movw $KVMRR_PORT_SERIAL, %dx
2:  movb (%rsi), %al
    testb %al, %al
    jz 3f
    outb %al, %dx
    incq %rsi
    jmp 2b
3:  movl $RT_EXIT_NOMEM, %eax
    outl %eax, $KVMRR_PORT_EXIT
4:  cli
    hlt
    jmp 4b
    .size _start, . - _start

    .section .rodata
.Lnomem_msg:
    .asciz "runtime: image does not fit in RAM below the stack\n"

/*
 * Interrupt stubs. Each leaves a struct irq_frame (runtime.h) on the stack:
 * 15 GPRs, vector, error code (0 where the CPU pushes none), then the CPU's frame.
 * In long mode the CPU aligns RSP to 16 before pushing its frame, so with the 17
 * quadwords pushed here the C handler is called with the stack ABI-aligned.
 */
    .text

.macro PUSH_GPRS
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
.endm

.macro POP_GPRS
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
.endm

/* CPU exceptions that push an error code: #DF #TS #NP #SS #GP #PF #AC #CP #VC #SX. */
.macro FAULT vec
    .p2align 3
isr_fault_\vec:
    .if (\vec == 8) || (\vec >= 10 && \vec <= 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
    .else
    pushq $0
    .endif
    pushq $\vec
    jmp isr_fault_common
.endm

    .altmacro
.set vec, 0
.rept 32
    FAULT %vec
    .set vec, vec + 1
.endr
    .noaltmacro

isr_fault_common:
    PUSH_GPRS
    cld
    movq %rsp, %rdi
    call rt_fault           /* does not return */
5:  cli
    hlt
    jmp 5b

    .globl isr_timer
isr_timer:
    pushq $0
    pushq $KVMRR_VEC_TIMER
    PUSH_GPRS
    cld
    movq %rsp, %rdi
    call rt_timer_isr
    POP_GPRS
    addq $16, %rsp
    iretq

    .globl isr_nic_rx
isr_nic_rx:
    pushq $0
    pushq $KVMRR_VEC_NIC_RX
    PUSH_GPRS
    cld
    movq %rsp, %rdi
    call rt_nic_isr
    POP_GPRS
    addq $16, %rsp
    iretq

/* Addresses of the 32 exception stubs, for rt_init's IDT. */
    .section .rodata
    .p2align 3
    .globl rt_fault_stubs
rt_fault_stubs:
.macro STUB_ADDR vec
    .quad isr_fault_\vec
.endm
    .altmacro
.set vec, 0
.rept 32
    STUB_ADDR %vec
    .set vec, vec + 1
.endr
    .noaltmacro

    .section .note.GNU-stack, "", @progbits
