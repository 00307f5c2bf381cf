/*
 * repstr - interrupts due inside REP string instructions of every kind (MOVS, STOS, LODS,
 * CMPS, SCAS), every size (b, w, d, q), both directions, and lengths 0, 1, small and more
 * than 4 KiB (this host executes long ones in chunks of about 1 KiB: one count each).
 */
#include "tlib.h"

static uint8_t src[12288] __attribute__((aligned(64)));
static uint8_t dst[12288] __attribute__((aligned(64)));

#define ASM_0(insn) insn "\n\tpushfq\n\tpopq %4"
#define ASM_1(insn) "std\n\t" insn "\n\tcld\n\tpushfq\n\tpopq %4"
#define REP_OP(insn, size, df)                                                          \
    do {                                                                               \
        uint64_t s = (uint64_t)(df ? src + off_end : src + 64);                        \
        uint64_t d = (uint64_t)(df ? dst + off_end : dst + 64);                        \
        uint64_t c = cnt, a = 0x5a5a5a5a5a5a5a5aull ^ cnt;                             \
        uint64_t fl;                                                                   \
        __asm__ volatile(ASM_##df(insn)                                                \
                         : "+S"(s), "+D"(d), "+c"(c), "+a"(a), "=r"(fl) : : "memory", "cc"); \
        t_fold(s ^ (d << 1) ^ (c << 2) ^ (a << 3) ^ ((fl & 0x8d5) << 4));              \
    } while (0)

#define ALL_SIZES(op, df)                                                              \
    do {                                                                               \
        REP_OP("rep " op "b", 1, df); REP_OP("rep " op "w", 2, df);                    \
        REP_OP("rep " op "l", 4, df); REP_OP("rep " op "q", 8, df);                    \
    } while (0)

#define CMP_SIZES(op, df)                                                              \
    do {                                                                               \
        REP_OP("repe " op "b", 1, df); REP_OP("repne " op "w", 2, df);                 \
        REP_OP("repe " op "l", 4, df); REP_OP("repne " op "q", 8, df);                 \
    } while (0)

int main(void)
{
    static const uint64_t counts[] = { 0, 1, 7, 300, 5000 };
    uint64_t n = t_iters(2);
    t_timer_start();
    irq_enable();
    for (unsigned k = 0; k < sizeof(src); k += 8)
        *(uint64_t *)(src + k) = k * 0x0701030507010305ull + (k >> 9);
    for (uint64_t it = 0; it < n; it++) {
        for (unsigned ci = 0; ci < sizeof(counts) / sizeof(counts[0]); ci++) {
            /* counts are in elements; keep every access inside the buffers (q: 8 bytes) */
            uint64_t cnt = counts[ci] > 1400 ? 1400 : counts[ci];
            uint64_t off_end = 64 + 8 * 1400;
            ALL_SIZES("movs", 0); ALL_SIZES("movs", 1);
            ALL_SIZES("stos", 0); ALL_SIZES("stos", 1);
            ALL_SIZES("lods", 0); ALL_SIZES("lods", 1);
            CMP_SIZES("cmps", 0); CMP_SIZES("cmps", 1);
            CMP_SIZES("scas", 0); CMP_SIZES("scas", 1);
            /* bytes: more than 4 KiB in one instruction */
            cnt = counts[ci];
            off_end = 64 + 5000;
            REP_OP("rep movsb", 1, 0); REP_OP("rep movsb", 1, 1);
            REP_OP("rep stosb", 1, 0); REP_OP("repe cmpsb", 1, 0);
        }
        for (unsigned k = 0; k < sizeof(dst); k += 512)
            t_fold(dst[k]);
    }
    return t_finish("repstr");
}
