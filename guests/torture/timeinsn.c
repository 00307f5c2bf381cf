/*
 * timeinsn - RDTSC, RDTSCP, RDRAND, RDSEED, RDMSR of IA32_TSC and CPUID (leaf=N, default
 * 0), their results folded into the output: a replay must give back every value the
 * record saw.
 */
#include "tlib.h"

int main(void)
{
    uint64_t n = t_iters(200);
    t_timer_start();
    irq_enable();
    for (uint64_t i = 0; i < n; i++) {
        uint32_t lo, hi, aux;
        __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
        t_fold(((uint64_t)hi << 32) | lo);
        __asm__ volatile("rdtscp" : "=a"(lo), "=d"(hi), "=c"(aux));
        t_fold(((uint64_t)hi << 32) ^ lo ^ aux);
        uint64_t r;
        __asm__ volatile("rdrand %0" : "=r"(r) :: "cc");
        t_fold(r);
        __asm__ volatile("rdseed %0" : "=r"(r) :: "cc");
        t_fold(r);
        __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(0x10));
        t_fold(((uint64_t)hi << 32) | lo);
        /* CPUID leaf 0 only: on this host leaf 1 EBX[31:24] is the APIC ID of the host CPU
         * the vCPU thread happens to run on (0x20800 on CPU 0, 0x1020800 on CPU 1), not
         * KVM_SET_CPUID2's; tests/test_torture.py keeps that case apart. */
        uint32_t a, b, c, d;
        __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(bootarg_u64("leaf", 0)), "c"(0));
        t_fold(a ^ b ^ c ^ d);
    }
    return t_finish("timeinsn");
}
