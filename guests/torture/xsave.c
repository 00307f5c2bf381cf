/*
 * xsave - the XSAVE family, which the core executes itself (libkvmrr/src/xsave.c): with
 * CR4.OSXSAVE set and XCR0 = x87 | SSE (| AVX where CPUID leaf 0xd offers it), each
 * iteration loads x87/SSE/AVX state from memory with XRSTOR (some components in their
 * initial configuration by XSTATE_BV), saves it with XSAVE, XSAVE64 and XSAVEOPT, and
 * compacted with XSAVEC, loads that back with XRSTOR and saves it again, reads XGETBV(1),
 * and folds the areas; and the faults the CPU raises for bad operands: #GP for a
 * misaligned area, a bad header (standard and compacted) and reserved MXCSR bits, #PF
 * for an unmapped area, #NM with CR0.TS, #UD with CR4.OSXSAVE clear.  The timer lands on
 * all of them.
 */
#include "tlib.h"

static uint8_t src[4096] __attribute__((aligned(64)));
static uint8_t dst[5][4096] __attribute__((aligned(64)));

static inline void xrstor64(void *p, uint64_t m)
{
    __asm__ volatile("xrstor64 (%0)" :: "D"(p), "a"((uint32_t)m), "d"((uint32_t)(m >> 32)) : "memory");
}

static uint64_t area_sum(const uint8_t *p, unsigned n)
{
    uint64_t h = 0;
    for (unsigned k = 0; k < n; k += 8)
        h = (h ^ *(const uint64_t *)(p + k)) * 0x100000001b3ull + k;
    return h;
}

static inline uint64_t cr_read4(void) { uint64_t v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void cr_write4(uint64_t v) { __asm__ volatile("mov %0, %%cr4" :: "r"(v) : "memory"); }
static inline uint64_t cr_read0(void) { uint64_t v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline void cr_write0(uint64_t v) { __asm__ volatile("mov %0, %%cr0" :: "r"(v) : "memory"); }

int main(void)
{
    t_gate(6, t_ud_skip3, T_GATE_INTR);
    t_gate(7, t_nm_skip3, T_GATE_INTR);
    t_gate(13, t_gp_skip3, T_GATE_INTR);
    t_gate(14, t_pf_skip3, T_GATE_INTR);
    uint32_t a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0xd), "c"(0));
    uint64_t xcr0 = 3 | (a & 4);        /* x87, SSE, and AVX if offered */
    unsigned size = b > 4096 ? 4096 : b;
    cr_write4(cr_read4() | (1ull << 18));   /* CR4.OSXSAVE */
    __asm__ volatile("xsetbv" :: "c"(0), "a"((uint32_t)xcr0), "d"(0u));
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0xd), "c"(0));
    size = b > 4096 ? 4096 : b;             /* now for this XCR0 */
    uint64_t n = t_iters(200);
    t_timer_start();
    irq_enable();
    for (uint64_t i = 0; i < n; i++) {
        /* An area to load: FCW, MXCSR and the registers from i; XSTATE_BV drops a
         * component now and then (it then loads in its initial configuration). */
        for (unsigned k = 0; k < 512; k += 8)
            *(uint64_t *)(src + k) = (i + 1) * 0x9e3779b97f4a7c15ull ^ k;
        *(uint16_t *)(src + 0) = (uint16_t)(0x37f ^ (i & 0x0c00));    /* FCW: rounding */
        *(uint16_t *)(src + 2) = 0;                                    /* FSW */
        *(uint32_t *)(src + 24) = 0x1f80 | (uint32_t)(i & 0x6000);     /* MXCSR */
        *(uint32_t *)(src + 28) = 0;
        for (unsigned k = 32; k < 160; k += 16)
            *(uint64_t *)(src + k + 8) &= 0xffff;                      /* 80-bit ST(i) */
        for (unsigned k = 512; k < size; k += 8)
            *(uint64_t *)(src + k) = k >= 576 ? (i * 31 + k) : 0;
        *(uint64_t *)(src + 512) = xcr0 & ~((i % 5 == 0 ? 2ull : 0) | (i % 3 == 0 ? 4ull : 0)
                                            | (i % 7 == 0 ? 1ull : 0));
        xrstor64(src, ~0ull);
        __asm__ volatile("xsave64 (%0)" :: "D"(dst[0]), "a"(~0u), "d"(~0u) : "memory");
        __asm__ volatile("xsave (%0)" :: "D"(dst[1]), "a"(1u | (i & 2)), "d"(0u) : "memory");
        __asm__ volatile("xsaveopt64 (%0)" :: "D"(dst[2]), "a"(~0u), "d"(~0u) : "memory");
        /* Compacted: all of XCR0, or x87 and AVX only; loaded back, saved standard. */
        uint32_t cm = i % 2 ? ~0u : 5u;
        __asm__ volatile("xsavec64 (%0)" :: "D"(dst[3]), "a"(cm), "d"(0u) : "memory");
        xrstor64(dst[3], ~0ull);
        __asm__ volatile("xsave64 (%0)" :: "D"(dst[4]), "a"(~0u), "d"(~0u) : "memory");
        uint32_t lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(1));
        t_fold(area_sum(dst[0], size) ^ area_sum(dst[1], 576) << 1 ^ area_sum(dst[2], size) << 2
               ^ area_sum(dst[3], size) << 3 ^ area_sum(dst[4], size) << 4
               ^ ((uint64_t)hi << 32 | lo));
        uint64_t bv = *(uint64_t *)(dst[3] + 512);
        *(uint64_t *)(dst[3] + 512) = bv | 2;                          /* beyond XCOMP_BV */
        *(uint64_t *)(dst[3] + 520) = (1ull << 63) | 5;
        __asm__ volatile("xrstor (%0)" :: "D"(dst[3]), "a"(~0u), "d"(~0u) : "memory");    /* #GP */
        /* Bad operands: each faults (the skip handlers step over 3 bytes). */
        __asm__ volatile("xsave (%0)" :: "D"(dst[0] + 8), "a"(~0u), "d"(~0u) : "memory"); /* #GP */
        *(uint64_t *)(src + 520) = 1;                                  /* XCOMP_BV != 0 */
        __asm__ volatile("xrstor (%0)" :: "D"(src), "a"(~0u), "d"(~0u) : "memory");       /* #GP */
        *(uint64_t *)(src + 520) = 0;
        *(uint64_t *)(src + 512) = 1ull << 40;                         /* not in XCR0 */
        __asm__ volatile("xrstor (%0)" :: "D"(src), "a"(~0u), "d"(~0u) : "memory");       /* #GP */
        *(uint64_t *)(src + 512) = xcr0;
        *(uint32_t *)(src + 24) = 0xffff0000;                          /* reserved MXCSR */
        __asm__ volatile("xrstor (%0)" :: "D"(src), "a"(~0u), "d"(~0u) : "memory");       /* #GP */
        __asm__ volatile("xsave (%0)" :: "D"(0x80000000ull + i * 64), "a"(~0u), "d"(~0u) : "memory"); /* #PF */
        if (i % 4 == 0) {
            uint64_t cr0 = cr_read0();
            cr_write0(cr0 | 8);                                        /* CR0.TS */
            __asm__ volatile("xsave (%0)" :: "D"(dst[0]), "a"(~0u), "d"(~0u) : "memory"); /* #NM */
            cr_write0(cr0);
            uint64_t cr4 = cr_read4();
            cr_write4(cr4 & ~(1ull << 18));
            __asm__ volatile("xsave (%0)" :: "D"(dst[0]), "a"(~0u), "d"(~0u) : "memory"); /* #UD */
            cr_write4(cr4);
        }
        t_fold(t_faults);
    }
    return t_finish("xsave");
}
