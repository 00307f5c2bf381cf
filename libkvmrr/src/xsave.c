/*
 * xsave.c - the XSAVE family, executed by the core.
 *
 * This host's instruction emulator cannot execute XSAVE, XRSTOR or their kin: KVM_RUN
 * ends in an emulation failure, having counted the instruction (measured 2026-12-01,
 * docs/ARCHITECTURE.md §8).  A stock Linux kernel uses them as soon as CPUID leaf 1 says
 * XSAVE, which on this host the guest reads from the host CPU whatever the CPU model says
 * (cpu_model.c), and leaf 0xd (the components, their offsets, XSAVEOPT, XSAVEC, XGETBV1,
 * XSAVES) comes from the host too.  So the core executes what Linux uses without XSAVES:
 *  - XSAVE, XSAVEOPT and XRSTOR in the standard form (SDM vol. 1 §13.7-13.9), on the
 *    vCPU's state through KVM_GET/SET_XSAVE, whose region has the standard layout at the
 *    host's offsets, the ones the guest reads in leaf 0xd;
 *  - XSAVEC and XRSTOR of a compacted area (§13.8.2, §13.10), which this host offers in
 *    leaf 0xd subleaf 1: components of XCOMP_BV one after the other from byte 576, each
 *    aligned to 64 bytes where leaf 0xd's ECX bit 1 says so;
 *  - XSAVES/XRSTORS raise #UD where leaf 0xd subleaf 1 lacks XSS (this host), as the CPU
 *    would (where it has XSS they are refused, never executed approximately).
 * Faults come first and alike in every mode: #UD (CR4.OSXSAVE clear, LOCK), #NM (CR0.TS),
 * #GP(0) (non-canonical or not 64-byte aligned, a bad header, reserved MXCSR bits), #PF
 * (any byte the instruction would touch unmapped or read-only; nothing is written then).
 *
 * XINUSE, which XSAVEOPT, XGETBV(1) and the XSTATE_BV an XSAVE writes reveal, is processor
 * dependent: a CPU may keep a bit set for a component already back in its initial
 * configuration.  The core defines it as "not in its initial configuration", computed
 * from the state itself, so it is a function of the guest's state and the same on record
 * and replay (what KVM's own header says could depend on when the host saved the state).
 * XSAVEOPT uses the init optimization (a component with XINUSE clear is not written), not
 * the modified optimization (which a CPU may always forgo).
 */
#include <cpuid.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "internal.h"

#define CR0_TS        (1ull << 3)
#define CR4_OSXSAVE   (1ull << 18)
#define LEGACY        512            /* the legacy region; the header follows */
#define HDR           512
#define HDR_LEN       64
#define AREA_MAX      4096           /* KVM_GET_XSAVE's region */
#define X_FP          (1ull << 0)
#define X_SSE         (1ull << 1)
#define X_AVX         (1ull << 2)
#define MXCSR_OFF     24
#define XMM_OFF       160
#define XMM_LEN       256
#define FCW_INIT      0x037f
#define MXCSR_DEFAULT_MASK 0xffbf
#define MXCSR_INIT    0x1f80

bool insn_is_xsave(int kind)
{
    return kind >= INSN_XSAVE && kind <= INSN_XRSTORS;
}

struct layout {
    uint32_t off[64], size[64];
    bool align[64];                  /* compacted form: starts on a 64-byte boundary */
};

/* Leaf 0xd as the guest reads it here (the host's): components 2.. of xcr0. */
static int layout_of(uint64_t xcr0, struct layout *l, char *why, size_t why_len)
{
    memset(l, 0, sizeof(*l));
    for (int i = 2; i < 63; i++) {
        if (!(xcr0 >> i & 1))
            continue;
        unsigned a, b, c, d;
        if (!__get_cpuid_count(0xd, (unsigned)i, &a, &b, &c, &d) || a == 0)
            return ERRF(why, why_len, "XCR0 bit %d has no layout in CPUID leaf 0xd", i);
        if ((uint64_t)b + a > AREA_MAX)
            return ERRF(why, why_len, "XSAVE component %d lies beyond KVM_GET_XSAVE's %d "
                        "bytes", i, AREA_MAX);
        l->off[i] = b;
        l->size[i] = a;
        l->align[i] = c >> 1 & 1;
    }
    return 0;
}

/* The compacted form's offsets (§13.4.3): the components of comp (bits 2..62) in order
 * from the end of the header.  Into off[]; returns the area's size. */
static uint32_t compacted(uint64_t comp, const struct layout *l, uint32_t *off)
{
    uint32_t at = LEGACY + HDR_LEN;
    for (int i = 2; i < 63; i++) {
        off[i] = 0;
        if (!(comp >> i & 1))
            continue;
        if (l->align[i])
            at = (at + 63) & ~63u;
        off[i] = at;
        at += l->size[i];
    }
    return at;
}

static bool leaf_d1(unsigned bit)
{
    unsigned a, b, c, d;
    return __get_cpuid_count(0xd, 1, &a, &b, &c, &d) && (a >> bit & 1);
}

static bool all_zero(const uint8_t *p, size_t n)
{
    for (size_t k = 0; k < n; k++)
        if (p[k])
            return false;
    return true;
}

/* Put the initial configuration of component i into a standard-format area (MXCSR, part
 * of no component's init here, is left alone). */
static void component_init(uint8_t *a, int i, const struct layout *l)
{
    if (i == 0) {
        memset(a, 0, MXCSR_OFF);
        memset(a + 32, 0, XMM_OFF - 32);
        uint16_t fcw = FCW_INIT;
        memcpy(a, &fcw, 2);
    } else if (i == 1) {
        memset(a + XMM_OFF, 0, XMM_LEN);
    } else {
        memset(a + l->off[i], 0, l->size[i]);
    }
}

static bool component_is_init(const uint8_t *a, int i, const struct layout *l)
{
    if (i == 0) {
        uint16_t fcw;
        memcpy(&fcw, a, 2);
        return fcw == FCW_INIT && all_zero(a + 2, MXCSR_OFF - 2)
               && all_zero(a + 32, XMM_OFF - 32);
    }
    if (i == 1)
        return all_zero(a + XMM_OFF, XMM_LEN);
    return all_zero(a + l->off[i], l->size[i]);
}

struct vcpu_x {
    struct kvm_xsave k;
    uint64_t xcr0, xinuse;
    uint64_t kvm_bv;        /* KVM's XSTATE_BV as read */
    struct layout l;
};

static int xcr0_get(struct kvmrr_vm *vm, uint64_t *xcr0)
{
    struct kvm_xcrs xcrs;
    if (ioctl(vm->vcpu_fd, KVM_GET_XCRS, &xcrs) < 0)
        return -1;
    *xcr0 = 1;
    for (uint32_t k = 0; k < xcrs.nr_xcrs; k++)
        if (xcrs.xcrs[k].xcr == 0)
            *xcr0 = xcrs.xcrs[k].value;
    return 0;
}

/* The vCPU's XSAVE state, components KVM marks absent put in their initial configuration,
 * and XINUSE as defined above. */
static int vcpu_x_get(struct kvmrr_vm *vm, struct vcpu_x *x, char *why, size_t why_len)
{
    if (xcr0_get(vm, &x->xcr0) < 0)
        return ERRF(why, why_len, "KVM_GET_XCRS: %s", strerror(errno));
    if (ioctl(vm->vcpu_fd, KVM_GET_XSAVE, &x->k) < 0)
        return ERRF(why, why_len, "KVM_GET_XSAVE: %s", strerror(errno));
    if (layout_of(x->xcr0, &x->l, why, why_len) < 0)
        return -1;
    uint8_t *a = (uint8_t *)x->k.region;
    uint64_t bv;
    memcpy(&bv, a + HDR, 8);
    x->kvm_bv = bv;
    x->xinuse = 0;
    for (int i = 0; i < 63; i++) {
        if (!(x->xcr0 >> i & 1))
            continue;
        if (!(bv >> i & 1))
            component_init(a, i, &x->l);
        if (!component_is_init(a, i, &x->l))
            x->xinuse |= 1ull << i;
    }
    return 0;
}

int xsave_xinuse(struct kvmrr_vm *vm, uint64_t *xinuse)
{
    struct vcpu_x x;
    char why[96];
    if (vcpu_x_get(vm, &x, why, sizeof(why)) < 0)
        return -1;
    *xinuse = x.xinuse;
    return 0;
}

/*
 * What the CPU itself makes of an area XRSTOR loads: reserved bits dropped (the byte after
 * the abridged FTW, FOP's top five bits, ...), the rest kept.  KVM does not tell: the
 * region KVM_SET_XSAVE took comes back unchanged from KVM_GET_XSAVE until the state has
 * passed through the CPU at a guest entry, which `step` and `fast` do at different
 * moments (found by test_xsave_matches_the_cpu).  So the core passes it through this CPU
 * here, in its own thread, its own state saved around it: XRSTOR64 then XSAVE64 of the
 * guest's components (mask), which this host's XCR0 holds (the guest's XCR0 is a subset
 * of what KVM supports here).  The header was checked before; its reserved bytes are 0.
 */
static int through_the_cpu(uint8_t *region, uint64_t mask, char *why, size_t why_len)
{
    static __thread uint8_t *own;
    static __thread size_t own_size;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(0xd, 0, &a, &b, &c, &d) || !__get_cpuid_count(1, 0, &a, &b, &c, &d)
        || !(c & (1u << 27)))
        return ERRF(why, why_len, "this host's CPU has no XSAVE enabled");
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    uint64_t host_xcr0 = (uint64_t)hi << 32 | lo;
    if (mask & ~host_xcr0)
        return ERRF(why, why_len, "the guest's XCR0 0x%llx exceeds this host's 0x%llx",
                    (unsigned long long)mask, (unsigned long long)host_xcr0);
    __get_cpuid_count(0xd, 0, &a, &b, &c, &d);
    size_t need = ((size_t)b + 63) & ~(size_t)63;
    if (own_size < need) {
        free(own);
        own = aligned_alloc(64, need);
        own_size = own ? need : 0;
        if (!own)
            return ERRF(why, why_len, "out of memory");
    }
    static __thread uint8_t area[AREA_MAX] __attribute__((aligned(64)));
    memcpy(area, region, AREA_MAX);
    memset(own + LEGACY, 0, HDR_LEN);
    uint32_t ml = (uint32_t)mask, mh = (uint32_t)(mask >> 32);
    __asm__ volatile("xsave64 (%0)" :: "r"(own), "a"(lo), "d"(hi) : "memory");
    __asm__ volatile("xrstor64 (%0)" :: "r"(area), "a"(ml), "d"(mh) : "memory");
    __asm__ volatile("xsave64 (%0)" :: "r"(area), "a"(ml), "d"(mh) : "memory");
    __asm__ volatile("xrstor64 (%0)" :: "r"(own), "a"(lo), "d"(hi) : "memory");
    memcpy(region, area, AREA_MAX);
    return 0;
}

/* ---- faults ---- */

static int fault(struct kvmrr_vm *vm, struct kvm_regs *r, struct kvm_sregs *s, int vector,
                 bool has_error, bool *sregs_changed, char *why, size_t why_len)
{
    return deliver_vector(vm, r, s, vector, has_error, 0, sregs_changed, why, why_len);
}

/* Every page of [ea, ea+len) mapped (and writable if write); else #PF as the CPU raises it
 * at the first such byte: CR2 = that address, error code P (a protection fault) and W. */
static int check_range(struct kvmrr_vm *vm, struct kvm_regs *r, struct kvm_sregs *s,
                       uint64_t ea, uint64_t len, bool write, bool *faulted,
                       bool *sregs_changed, char *why, size_t why_len)
{
    *faulted = false;
    for (uint64_t at = ea; at < ea + len; at = (at & ~0xfffull) + 0x1000) {
        uint64_t gpa;
        if (gva_to_gpa(vm, s, at, write, &gpa) == 0 && gpa < vm->cfg.mem_size)
            continue;
        uint32_t code = (write ? 2u : 0u)
                        | (gva_to_gpa(vm, s, at, false, &gpa) == 0 ? 1u : 0u);
        *faulted = true;
        s->cr2 = at;
        bool cs = false;
        int rc = deliver_vector(vm, r, s, 14, true, code, &cs, why, why_len);
        *sregs_changed = true;
        return rc;
    }
    return 0;
}

/* The byte ranges (offset, length) of the area an instruction touches beyond the legacy
 * region and header, for the components in mask. */
static int ranges_ok(struct kvmrr_vm *vm, struct kvm_regs *r, struct kvm_sregs *s,
                     uint64_t ea, const struct layout *l, const uint32_t *off, uint64_t mask,
                     bool write, bool *faulted, bool *sregs_changed, char *why, size_t why_len)
{
    if (check_range(vm, r, s, ea, LEGACY + HDR_LEN, write, faulted, sregs_changed, why,
                    why_len) < 0 || *faulted)
        return *faulted ? 0 : -1;
    for (int i = 2; i < 63; i++) {
        if (!(mask >> i & 1))
            continue;
        if (check_range(vm, r, s, ea + off[i], l->size[i], write, faulted, sregs_changed,
                        why, why_len) < 0 || *faulted)
            return *faulted ? 0 : -1;
    }
    return 0;
}

/* x87 FIP/FDP: the area holds the 64-bit forms (XSAVE64); without REX.W the instruction
 * uses 32-bit offsets and a selector, which this CPU saves as 0 (CPUID 7 EBX bit 13,
 * "FCS and FDS deprecated", from the host). */
static void fp_to_guest(uint8_t *g, const uint8_t *a, bool rex_w)
{
    memcpy(g, a, MXCSR_OFF);
    if (!rex_w) {
        memset(g + 12, 0, 4);
        memset(g + 20, 0, 4);
    }
}

static void fp_from_guest(uint8_t *a, const uint8_t *g, bool rex_w)
{
    memcpy(a, g, MXCSR_OFF);
    if (!rex_w) {
        memset(a + 12, 0, 4);
        memset(a + 20, 0, 4);
    }
}

static int do_xsave(struct kvmrr_vm *vm, struct kvm_regs *r, struct kvm_sregs *s,
                    const struct insn *in, struct vcpu_x *x, uint64_t rfbm, bool *sregs_changed,
                    char *why, size_t why_len)
{
    bool compact = in->kind == INSN_XSAVEC;
    /* What is written: with the init optimization (XSAVEOPT, XSAVEC), only components in
     * use; XSAVEC puts them at the compacted offsets of RFBM. */
    const uint8_t *a = (const uint8_t *)x->k.region;
    uint64_t inuse = x->xinuse;
    uint32_t mxcsr;
    memcpy(&mxcsr, a + MXCSR_OFF, 4);
    /* XSAVEC counts SSE as in use when MXCSR is not its initial value: the compacted
     * XRSTOR loads MXCSR only with SSE's state (matches this CPU: test_core's
     * test_xsavec_matches_the_cpu). */
    if (compact && mxcsr != MXCSR_INIT)
        inuse |= X_SSE;
    uint64_t store = in->kind == INSN_XSAVE ? rfbm : rfbm & inuse;
    uint32_t off[64];
    if (compact)
        compacted(rfbm, &x->l, off);
    else
        memcpy(off, x->l.off, sizeof(off));
    bool faulted;
    if (ranges_ok(vm, r, s, in->ea, &x->l, off, store, true, &faulted, sregs_changed, why,
                  why_len) < 0)
        return -1;
    if (faulted)
        return 0;
    uint8_t g[LEGACY + HDR_LEN];
    if (guest_read(vm, s, in->ea, g, sizeof(g)) < 0)
        return ERRF(why, why_len, "%s: the area at 0x%llx is not readable",
                    insn_name(in->kind), (unsigned long long)in->ea);
    if (store & X_FP) {
        fp_to_guest(g, a, in->rex_w);
        memcpy(g + 32, a + 32, XMM_OFF - 32);
    }
    /* MXCSR and MXCSR_MASK: the standard form for SSE or AVX; XSAVEC with SSE's state
     * only (above: SSE is then "in use" whenever MXCSR is not initial). */
    if (compact ? (store & X_SSE) != 0 : (rfbm & (X_SSE | X_AVX)) != 0)
        memcpy(g + MXCSR_OFF, a + MXCSR_OFF, 8);
    if (store & X_SSE)
        memcpy(g + XMM_OFF, a + XMM_OFF, XMM_LEN);
    uint64_t hdr[2];
    memcpy(hdr, g + HDR, 16);
    /* The standard form writes XSTATE_BV's bits of RFBM; XSAVEC writes XSTATE_BV and
     * XCOMP_BV whole. */
    hdr[0] = compact ? inuse & rfbm : (hdr[0] & ~rfbm) | (inuse & rfbm);
    hdr[1] = compact ? rfbm | 1ull << 63 : hdr[1];
    /* Bytes 464..511 of the legacy region are the software's. */
    if (guest_write(vm, s, in->ea, g, 416) < 0
        || guest_write(vm, s, in->ea + HDR, hdr, compact ? 16 : 8) < 0)
        return ERRF(why, why_len, "%s: the area at 0x%llx is not writable",
                    insn_name(in->kind), (unsigned long long)in->ea);
    for (int i = 2; i < 63; i++)
        if (store >> i & 1 && guest_write(vm, s, in->ea + off[i], a + x->l.off[i],
                                          x->l.size[i]) < 0)
            return ERRF(why, why_len, "%s: component %d is not writable",
                        insn_name(in->kind), i);
    r->rip += (uint64_t)in->len;
    return 0;
}

static int do_xrstor(struct kvmrr_vm *vm, struct kvm_regs *r, struct kvm_sregs *s,
                     const struct insn *in, struct vcpu_x *x, uint64_t rfbm,
                     bool *sregs_changed, char *why, size_t why_len)
{
    bool faulted;
    uint32_t off[64];
    memcpy(off, x->l.off, sizeof(off));
    if (ranges_ok(vm, r, s, in->ea, &x->l, off, 0, false, &faulted, sregs_changed, why,
                  why_len) < 0)
        return -1;
    if (faulted)
        return 0;
    uint8_t g[LEGACY + HDR_LEN];
    if (guest_read(vm, s, in->ea, g, sizeof(g)) < 0)
        return ERRF(why, why_len, "XRSTOR: the area at 0x%llx is not readable",
                    (unsigned long long)in->ea);
    uint64_t bv, comp;
    memcpy(&bv, g + HDR, 8);
    memcpy(&comp, g + HDR + 8, 8);
    bool compact = comp >> 63;
    if (compact) {
        /* Compacted form (§13.8.2): where CPUID offers it, XCOMP_BV within XCR0, XSTATE_BV
         * within XCOMP_BV, header bytes 16..63 zero. */
        uint64_t c = comp & ~(1ull << 63);
        if (!leaf_d1(1) || (c & ~x->xcr0) || (bv & ~c) || !all_zero(g + HDR + 16, 48))
            return fault(vm, r, s, 13, true, sregs_changed, why, why_len);
        compacted(c, &x->l, off);
    } else if ((bv & ~x->xcr0) || !all_zero(g + HDR + 8, 16)) {
        /* Standard form: XSTATE_BV within XCR0, header bytes 8..23 zero (§13.8.1). */
        return fault(vm, r, s, 13, true, sregs_changed, why, why_len);
    }
    uint8_t *a = (uint8_t *)x->k.region;
    uint32_t mxcsr, mask;
    memcpy(&mxcsr, g + MXCSR_OFF, 4);
    memcpy(&mask, a + MXCSR_OFF + 4, 4);
    if (!mask)
        mask = MXCSR_DEFAULT_MASK;
    /* The standard form loads MXCSR for SSE or AVX whatever XSTATE_BV says; the compacted
     * form treats it as SSE's: loaded with SSE's state, else its initial value (matches
     * this CPU: test_xsavec_matches_the_cpu). */
    bool mxcsr_set = compact ? (rfbm & X_SSE) != 0 : (rfbm & (X_SSE | X_AVX)) != 0;
    bool mxcsr_load = mxcsr_set && (!compact || (bv & X_SSE));
    if (mxcsr_load && (mxcsr & ~mask))
        return fault(vm, r, s, 13, true, sregs_changed, why, why_len);
    if (!mxcsr_load)
        mxcsr = MXCSR_INIT;
    uint64_t load = rfbm & bv;
    if (ranges_ok(vm, r, s, in->ea, &x->l, off, load, false, &faulted, sregs_changed, why,
                  why_len) < 0)
        return -1;
    if (faulted)
        return 0;
    if (rfbm & X_FP) {
        if (load & X_FP) {
            fp_from_guest(a, g, in->rex_w);
            memcpy(a + 32, g + 32, XMM_OFF - 32);
        } else {
            component_init(a, 0, &x->l);
        }
    }
    if (mxcsr_set)
        memcpy(a + MXCSR_OFF, &mxcsr, 4);
    for (int i = 1; i < 63; i++) {
        if (!(rfbm >> i & 1))
            continue;
        uint32_t at = i == 1 ? XMM_OFF : x->l.off[i], len = i == 1 ? XMM_LEN : x->l.size[i];
        uint32_t from = i == 1 ? XMM_OFF : off[i];
        if (load >> i & 1) {
            if (guest_read(vm, s, in->ea + from, a + at, len) < 0)
                return ERRF(why, why_len, "XRSTOR: component %d is not readable", i);
        } else {
            component_init(a, i, &x->l);
        }
    }
    memset(a + HDR, 0, HDR_LEN);
    memcpy(a + HDR, &rfbm, 8);
    if (through_the_cpu(a, rfbm, why, why_len) < 0)
        return -1;
    /* KVM's header: every component of XCR0 present (the values say what is in use);
     * the others as KVM had them. */
    uint64_t kbv = x->kvm_bv | x->xcr0;
    memset(a + HDR, 0, HDR_LEN);
    memcpy(a + HDR, &kbv, 8);
    if (ioctl(vm->vcpu_fd, KVM_SET_XSAVE, &x->k) < 0)
        return ERRF(why, why_len, "KVM_SET_XSAVE: %s", strerror(errno));
    r->rip += (uint64_t)in->len;
    return 0;
}

int xsave_execute(struct kvmrr_vm *vm, struct kvm_regs *r, struct kvm_sregs *s,
                  const struct insn *in, bool *sregs_changed, char *why, size_t why_len)
{
    *sregs_changed = false;
    bool supervisor = in->kind == INSN_XSAVES || in->kind == INSN_XRSTORS;
    /* #UD first: LOCK, an instruction CPUID does not offer, or CR4.OSXSAVE clear. */
    if (in->lock || (supervisor && !leaf_d1(3)) || (in->kind == INSN_XSAVEOPT && !leaf_d1(0))
        || (in->kind == INSN_XSAVEC && !leaf_d1(1)) || !(s->cr4 & CR4_OSXSAVE))
        return fault(vm, r, s, 6, false, sregs_changed, why, why_len);
    if (supervisor)
        return ERRF(why, why_len, "the core does not execute %s (supervisor state)",
                    insn_name(in->kind));
    if (s->cr0 & CR0_TS)
        return fault(vm, r, s, 7, false, sregs_changed, why, why_len);
    int64_t sx = (int64_t)in->ea >> 47;
    if ((sx != 0 && sx != -1) || (in->ea & 63))
        return fault(vm, r, s, 13, true, sregs_changed, why, why_len);
    struct vcpu_x x;
    if (vcpu_x_get(vm, &x, why, why_len) < 0)
        return -1;
    uint64_t rfbm = x.xcr0 & ((r->rdx << 32) | (uint32_t)r->rax);
    if (in->kind == INSN_XRSTOR)
        return do_xrstor(vm, r, s, in, &x, rfbm, sregs_changed, why, why_len);
    return do_xsave(vm, r, s, in, &x, rfbm, sregs_changed, why, why_len);
}
