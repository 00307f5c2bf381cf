/*
 * emulate.c - the instructions the core executes itself, and interrupt delivery through
 * the guest's IDT.
 *
 * Two reasons to execute an instruction here rather than in KVM:
 *  - this host's instruction emulator cannot: INT3 (cc), INT n (cd ib), IRET with a 16- or
 *    32-bit operand size (it raises #GP where the CPU would return), CLAC/STAC, FWAIT,
 *    FNSTSW AX, XGETBV, RDTSCP all end KVM_RUN with an emulation failure (measured
 *    2026-12-01; the statistic has already counted the instruction then); SERIALIZE
 *    (0f 01 e8), which Linux uses when the host CPU has it (CPUID leaf 7 comes from the
 *    host here), is run as if it were no instruction: single-stepped, it and the next
 *    retire as one step; POPCNT's register form (measured 2026-12-01, booting Linux 6.1);
 *  - single-stepped, some misbehave: the trap after IRET is lost (the popped RFLAGS has no
 *    TF), PUSHF pushes the debugger's TF, a HLT stays pending past the next delivery.
 * Every access goes through the guest's page tables (paging.c).  Constants are the SDM's
 * (vol. 2 for the encodings, vol. 3A §6.14 for 64-bit interrupt delivery).
 */
#include <cpuid.h>
#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>

#include "internal.h"

#define RFLAGS_TF     (1ull << 8)
#define RFLAGS_IF     (1ull << 9)
#define RFLAGS_NT     (1ull << 14)
#define RFLAGS_RF     (1ull << 16)
#define RFLAGS_VM     (1ull << 17)
#define RFLAGS_AC     (1ull << 18)
/* What IRET may load at CPL 0: CF PF AF ZF SF TF IF DF OF IOPL NT RF AC VIF VIP ID
 * (VM is 0 in 64-bit mode; bit 1 reads as 1). */
#define RFLAGS_IRET   0x3f7fd5ull
#define CR0_MP        (1ull << 1)
#define CR0_EM        (1ull << 2)
#define CR0_TS        (1ull << 3)
#define CR0_NE        (1ull << 5)
#define CR4_SMAP      (1ull << 21)
#define GATE_INTR     0xe
#define GATE_TRAP     0xf
#define FSW_ES        (1u << 7)

/* XGETBV with ECX = 1: offered where CPUID leaf 0xd subleaf 1 EAX bit 2 says so, which on
 * this host the guest reads from the host CPU (docs/ARCHITECTURE.md §8). */
static bool xgetbv1_offered(void)
{
    unsigned a, b, c, d;
    return __get_cpuid_count(0xd, 1, &a, &b, &c, &d) && (a & 4);
}

static uint64_t *gpr(struct kvm_regs *r, int reg)
{
    uint64_t *map[16] = { (uint64_t *)&r->rax, (uint64_t *)&r->rcx, (uint64_t *)&r->rdx,
                          (uint64_t *)&r->rbx, (uint64_t *)&r->rsp, (uint64_t *)&r->rbp,
                          (uint64_t *)&r->rsi, (uint64_t *)&r->rdi, (uint64_t *)&r->r8,
                          (uint64_t *)&r->r9, (uint64_t *)&r->r10, (uint64_t *)&r->r11,
                          (uint64_t *)&r->r12, (uint64_t *)&r->r13, (uint64_t *)&r->r14,
                          (uint64_t *)&r->r15 };
    return map[reg & 15];
}

uint64_t *insn_gpr(struct kvm_regs *r, int reg) { return gpr(r, reg); }

/* A register's value, read as the __u64 it is (gpr()'s uint64_t pointers into a local
 * copy would break the aliasing rules: GCC -O2 then drops the copy). */
static uint64_t reg_value(const struct kvm_regs *r, int reg)
{
    const __u64 *map[16] = { &r->rax, &r->rcx, &r->rdx, &r->rbx, &r->rsp, &r->rbp, &r->rsi,
                             &r->rdi, &r->r8, &r->r9, &r->r10, &r->r11, &r->r12, &r->r13,
                             &r->r14, &r->r15 };
    return *map[reg & 15];
}

const char *insn_name(int kind)
{
    static const char *names[] = { "?", "IRET", "PUSHF", "HLT", "RDTSC", "RDTSCP", "RDRAND",
                                   "RDSEED", "INT3", "INT n", "CLAC", "STAC", "FWAIT",
                                   "XGETBV", "RDPID", "RDMSR", "SERIALIZE", "SWAPGS or the 0f ae group",
                                   "POPCNT", "XSAVE", "XSAVEOPT", "XRSTOR", "XSAVEC", "XSAVES",
                                   "XRSTORS", "FNSTSW AX", "POPF" };
    return kind >= 0 && kind < (int)(sizeof(names) / sizeof(names[0])) ? names[kind] : "?";
}

/* Bytes of a 64-bit mode ModRM operand from the ModRM byte on: ModRM, SIB, displacement
 * (SDM vol. 2 §2.1.5; RIP-relative when mod is 0 and r/m is 5). */
static int modrm_len(const uint8_t *m)
{
    int mod = m[0] >> 6, rm = m[0] & 7, n = 1;
    if (mod == 3)
        return n;
    if (rm == 4) {
        n++;
        if (mod == 0 && (m[1] & 7) == 5)
            return n + 4;
    }
    if (mod == 0 && rm == 5)
        return n + 4;
    return n + (mod == 1 ? 1 : mod == 2 ? 4 : 0);
}

/*
 * The linear address of a ModRM memory operand (SDM vol. 2A §2.1.5, 64-bit mode): m points
 * at the ModRM byte, which sits `at` bytes into the instruction (RIP-relative addresses
 * count from its end).  FS and GS overrides add their bases; 0x67 truncates to 32 bits.
 * *len: the ModRM, SIB and displacement bytes.
 */
static int modrm_ea(const uint8_t *m, int rex, bool addr32, int seg, const struct kvm_regs *r,
                    const struct kvm_sregs *s, int at, uint64_t *ea, int *len)
{
    int mod = m[0] >> 6, rm = m[0] & 7, n = 1;
    uint64_t a = 0;
    bool rip_rel = false;
    if (mod == 3)
        return -1;
    if (rm == 4) {
        int sib = m[1], scale = sib >> 6, index = ((sib >> 3) & 7) | ((rex & 2) << 2);
        int base = (sib & 7) | ((rex & 1) << 3);
        n = 2;
        if (index != 4)
            a += reg_value(r, index) << scale;
        if ((sib & 7) == 5 && mod == 0) {
            int32_t d; memcpy(&d, m + n, 4); a += (uint64_t)(int64_t)d; n += 4;
        } else {
            a += reg_value(r, base);
        }
    } else if (rm == 5 && mod == 0) {
        int32_t d; memcpy(&d, m + n, 4); a = (uint64_t)(int64_t)d; n += 4;
        rip_rel = true;
    } else {
        a = reg_value(r, rm | ((rex & 1) << 3));
    }
    if (mod == 1) { a += (uint64_t)(int64_t)(int8_t)m[n]; n += 1; }
    if (mod == 2) { int32_t d; memcpy(&d, m + n, 4); a += (uint64_t)(int64_t)d; n += 4; }
    if (rip_rel)
        a += r->rip + (uint64_t)at + (uint64_t)n;
    if (addr32)
        a = (uint32_t)a;
    if (seg == 0x64) a += s->fs.base;
    if (seg == 0x65) a += s->gs.base;
    *ea = a;
    *len = n;
    return 0;
}

int insn_decode(struct kvmrr_vm *vm, const struct kvm_regs *r, const struct kvm_sregs *s,
                struct insn *in)
{
    uint8_t p[16];
    memset(in, 0, sizeof(*in));
    /* Fetch what lies on this page and the next one if mapped: an instruction at the end
     * of the last mapped page is still decoded from the bytes that exist. */
    size_t first = 0x1000 - (r->rip & 0xfff);
    if (first > sizeof(p))
        first = sizeof(p);
    memset(p, 0, sizeof(p));
    if (guest_read(vm, s, r->rip, p, first) < 0)
        return -1;
    if (first < sizeof(p))
        (void)guest_read(vm, s, r->rip + first, p + first, sizeof(p) - first);
    int i = 0, rex = 0, seg = 0;
    bool f3 = false, f2 = false, p66 = false, addr32 = false;
    in->opsize = 4;
    /* Legacy prefixes, then REX (only the last byte before the opcode counts). */
    for (; i < 14; i++) {
        if (p[i] == 0x66) { in->opsize = 2; p66 = true; }
        else if (p[i] == 0xf3) f3 = true;
        else if (p[i] == 0xf2) f2 = true;
        else if (p[i] == 0xf0) in->lock = true;
        else if (p[i] == 0x67) addr32 = true;
        else if (p[i] == 0x64 || p[i] == 0x65) seg = p[i];
        else if (p[i] == 0x2e || p[i] == 0x3e || p[i] == 0x26 || p[i] == 0x36) continue;
        else break;
    }
    if ((p[i] & 0xf0) == 0x40) { rex = p[i]; i++; }
    if (rex & 0x8)
        in->opsize = 8;
    in->rex_w = rex & 0x8;
    const uint8_t *o = p + i;
    switch (o[0]) {
    case 0xf4: in->kind = INSN_HLT; in->len = i + 1; return 0;
    case 0x9c: in->kind = in->opsize == 2 ? INSN_NONE : INSN_PUSHF; in->len = i + 1; return 0;
    case 0xcf: in->kind = INSN_IRET; in->len = i + 1; return 0;
    case 0x9d: in->kind = INSN_POPF; in->len = i + 1; return 0;
    case 0xcc: in->kind = INSN_INT3; in->len = i + 1; in->vector = 3; return 0;
    case 0xcd: in->kind = INSN_INTN; in->len = i + 2; in->vector = o[1]; return 0;
    case 0x9b: in->kind = INSN_FWAIT; in->len = i + 1; return 0;
    case 0xdf:
        if (o[1] == 0xe0) { in->kind = INSN_FNSTSW_AX; in->len = i + 2; }
        return 0;
    case 0x0f: break;
    default: return 0;
    }
    if (o[1] == 0x31) { in->kind = INSN_RDTSC; in->len = i + 2; return 0; }
    if (o[1] == 0x32) { in->kind = INSN_RDMSR; in->len = i + 2; return 0; }
    if (o[1] == 0x01) {
        in->len = i + 3;
        switch (o[2]) {
        case 0xf9: in->kind = INSN_RDTSCP; break;
        case 0xca: in->kind = INSN_CLAC; break;
        case 0xcb: in->kind = INSN_STAC; break;
        case 0xd0: in->kind = INSN_XGETBV; break;
        case 0xe8: in->kind = INSN_SERIALIZE; break;
        case 0xf8: in->kind = INSN_AFTER_BP; break;      /* SWAPGS */
        default: in->len = 0;
        }
        return 0;
    }
    /* The XSAVE family: 0f ae /4 /5 /6 and 0f c7 /3 /4 /5, memory operand, no 66/f2/f3
     * (with one of those the same bytes are PTWRITE, CLWB, ...: not the core's). */
    if ((o[1] == 0xae || o[1] == 0xc7) && (o[2] & 0xc0) != 0xc0 && !p66 && !f2 && !f3) {
        static const int ae[8] = { 0, 0, 0, 0, INSN_XSAVE, INSN_XRSTOR, INSN_XSAVEOPT, 0 };
        static const int c7[8] = { 0, 0, 0, INSN_XRSTORS, INSN_XSAVEC, INSN_XSAVES, 0, 0 };
        int op = (o[2] >> 3) & 7, kind = o[1] == 0xae ? ae[op] : c7[op];
        int mlen;
        if (kind && modrm_ea(o + 2, rex, addr32, seg, r, s, i + 2, &in->ea, &mlen) == 0) {
            in->kind = kind;
            in->len = i + 2 + mlen;
            return 0;
        }
        /* not one of the family: FXSAVE, the fences, ... go on below */
    }
    if (o[1] == 0xb8 && f3) {
        /* POPCNT: this host's emulator cannot execute it, and Linux uses it when CPUID
         * (leaf 1 ECX, the host's here) has it.  The register form only; the memory
         * form is left to the emulator's failure, a clear error. */
        if ((o[2] & 0xc0) == 0xc0) {
            in->kind = INSN_POPCNT;
            in->reg = ((o[2] >> 3) & 7) | ((rex & 4) << 1);     /* destination */
            in->vector = (o[2] & 7) | ((rex & 1) << 3);         /* source */
            in->len = i + 3;
        }
        return 0;
    }
    if (o[1] == 0xae) {
        /* The 0f ae group (FXSAVE, FXRSTOR, LDMXCSR, STMXCSR, RD/WRFSBASE, RD/WRGSBASE,
         * the fences, ...): executed by KVM, see INSN_AFTER_BP */
        in->kind = INSN_AFTER_BP;
        in->len = i + 2 + modrm_len(o + 2);
        return 0;
    }
    if (o[1] == 0xc7 && (o[2] & 0xc0) == 0xc0) {
        int op = (o[2] >> 3) & 7;
        in->reg = (o[2] & 7) | ((rex & 1) << 3);
        in->len = i + 3;
        if (op == 6 && !f3) in->kind = INSN_RDRAND;
        else if (op == 7 && !f3) in->kind = INSN_RDSEED;
        else if (op == 7 && f3) in->kind = INSN_RDPID;
        else in->len = 0;
    }
    return 0;
}

/* Load a code segment descriptor from the GDT (64-bit mode: only L, D, DPL, P matter). */
static int load_cs(struct kvmrr_vm *vm, struct kvm_sregs *s, uint16_t sel, char *why,
                   size_t why_len)
{
    if (sel == s->cs.selector)
        return 0;
    if (sel & 4)
        return ERRF(why, why_len, "code selector 0x%x in an LDT", sel);
    uint64_t off = sel & ~7u;
    uint64_t d;
    if (off + 7 > s->gdt.limit || guest_read(vm, s, s->gdt.base + off, &d, 8) < 0)
        return ERRF(why, why_len, "code selector 0x%x outside the GDT", sel);
    bool present = d >> 47 & 1, code = (d >> 43 & 3) == 3, lmode = d >> 53 & 1;
    if (!present || !code || !lmode)
        return ERRF(why, why_len, "code selector 0x%x is not a present 64-bit code segment", sel);
    s->cs.selector = sel;
    s->cs.type = (uint8_t)(d >> 40 & 0xf);
    s->cs.dpl = (uint8_t)(d >> 45 & 3);
    s->cs.l = 1;
    s->cs.db = 0;
    s->cs.present = 1;
    s->cs.s = 1;
    return 1;
}

static int push64(struct kvmrr_vm *vm, const struct kvm_sregs *s, uint64_t *rsp, uint64_t v)
{
    *rsp -= 8;
    return guest_write(vm, s, *rsp, &v, 8);
}

int deliver_vector(struct kvmrr_vm *vm, struct kvm_regs *r, struct kvm_sregs *s, int vector,
                   bool has_error, uint32_t error, bool *cs_changed, char *why, size_t why_len)
{
    uint8_t gate[16];
    *cs_changed = false;
    if ((uint64_t)vector * 16 + 15 > s->idt.limit
        || guest_read(vm, s, s->idt.base + (uint64_t)vector * 16, gate, 16) < 0)
        return ERRF(why, why_len, "vector %d lies outside the guest's IDT", vector);
    int type = gate[5] & 0xf;
    bool present = gate[5] & 0x80;
    if (!present || (type != GATE_INTR && type != GATE_TRAP))
        return ERRF(why, why_len, "the IDT gate of vector %d is not a present 64-bit "
                    "interrupt or trap gate", vector);
    uint64_t target = (uint64_t)(gate[0] | gate[1] << 8) | (uint64_t)(gate[6] | gate[7] << 8) << 16
                      | (uint64_t)(gate[8] | gate[9] << 8 | gate[10] << 16) << 32
                      | (uint64_t)gate[11] << 56;
    uint16_t sel = (uint16_t)(gate[2] | gate[3] << 8);
    int ist = gate[4] & 7;
    if ((sel & 3) != 0 || (s->cs.selector & 3) != 0)
        return ERRF(why, why_len, "vector %d would change privilege level", vector);
    uint64_t rsp = r->rsp;
    if (ist) {
        /* The 64-bit TSS holds IST1..7 at offset 0x24 + 8 * (n - 1). */
        if (s->tr.limit < 0x24 + 8 * (unsigned)ist - 1
            || guest_read(vm, s, s->tr.base + 0x24 + 8 * (uint64_t)(ist - 1), &rsp, 8) < 0)
            return ERRF(why, why_len, "vector %d: IST%d outside the TSS", vector, ist);
    }
    rsp &= ~0xfull;   /* 64-bit delivery aligns the stack to 16 bytes */
    uint64_t old_cs = s->cs.selector, old_ss = s->ss.selector;
    int rc = load_cs(vm, s, sel, why, why_len);
    if (rc < 0)
        return -1;
    *cs_changed = rc > 0;
    if (push64(vm, s, &rsp, old_ss) < 0 || push64(vm, s, &rsp, r->rsp) < 0
        || push64(vm, s, &rsp, r->rflags) < 0 || push64(vm, s, &rsp, old_cs) < 0
        || push64(vm, s, &rsp, r->rip) < 0
        || (has_error && push64(vm, s, &rsp, error) < 0))
        return ERRF(why, why_len, "vector %d: the interrupt frame at 0x%llx is not mapped "
                    "writable", vector, (unsigned long long)rsp);
    r->rsp = rsp;
    r->rip = target;
    r->rflags &= ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM);
    if (type == GATE_INTR)
        r->rflags &= ~RFLAGS_IF;
    return 0;
}

/* IRET in 64-bit mode pops RIP, CS, RFLAGS, RSP and SS, each of the operand size. */
static int exec_iret(struct kvmrr_vm *vm, struct kvm_regs *r, struct kvm_sregs *s, int opsize,
                     bool *cs_changed, char *why, size_t why_len)
{
    uint8_t frame[40];
    if (guest_read(vm, s, r->rsp, frame, 5 * opsize) < 0)
        return ERRF(why, why_len, "IRET: the stack at 0x%llx is not mapped",
                    (unsigned long long)r->rsp);
    uint64_t v[5] = { 0 };
    for (int k = 0; k < 5; k++)
        memcpy(&v[k], frame + k * opsize, opsize);
    if ((v[1] & 3) != 0)
        return EMU_RING3;
    int rc = load_cs(vm, s, (uint16_t)v[1], why, why_len);
    if (rc < 0)
        return -1;
    *cs_changed = rc > 0;
    uint64_t keep = opsize == 2 ? ~0xffffull : opsize == 4 ? ~0xffffffffull : 0;
    r->rip = opsize == 8 ? v[0] : (uint32_t)v[0] & (opsize == 2 ? 0xffff : 0xffffffff);
    r->rflags = (r->rflags & keep) | (v[2] & RFLAGS_IRET & ~keep) | 0x2;
    r->rsp = opsize == 8 ? v[3] : opsize == 4 ? (uint32_t)v[3] : (r->rsp & ~0xffffull) | (uint16_t)v[3];
    return 0;
}

int insn_execute(struct kvmrr_vm *vm, struct kvm_regs *r, struct kvm_sregs *s,
                 const struct insn *in, bool *sregs_changed, char *why, size_t why_len)
{
    *sregs_changed = false;
    uint64_t next = r->rip + (uint64_t)in->len;
    switch (in->kind) {
    case INSN_IRET:
        return exec_iret(vm, r, s, in->opsize, sregs_changed, why, why_len);
    case INSN_PUSHF: {
        uint64_t image = r->rflags & ~(RFLAGS_RF | RFLAGS_VM), rsp = r->rsp;
        if (push64(vm, s, &rsp, image) < 0)
            return ERRF(why, why_len, "PUSHFQ: the stack at 0x%llx is not mapped writable",
                        (unsigned long long)r->rsp);
        r->rsp = rsp;
        r->rip = next;
        return 0;
    }
    case INSN_HLT:
        r->rip = next;
        return 0;
    case INSN_INT3:
    case INSN_INTN:
        /* A software interrupt pushes the address of the next instruction. */
        r->rip = next;
        return deliver_vector(vm, r, s, in->vector, false, 0, sregs_changed, why, why_len);
    case INSN_POPCNT: {
        uint64_t src = *gpr(r, in->vector);
        if (in->opsize == 4) src = (uint32_t)src;
        if (in->opsize == 2) src = (uint16_t)src;
        uint64_t n = (uint64_t)__builtin_popcountll(src);
        uint64_t *dst = gpr(r, in->reg);
        *dst = in->opsize == 2 ? ((*dst & ~0xffffull) | n) : n;   /* 32-bit: upper half 0 */
        r->rflags &= ~0x8d5ull;                 /* OF SF ZF AF CF PF cleared ... */
        if (!src)
            r->rflags |= 1ull << 6;             /* ... ZF set for a zero source */
        r->rip = next;
        return 0;
    }
    case INSN_SERIALIZE:
        /* Nothing to wait for: the core runs between two instructions already. */
        r->rip = next;
        return 0;
    case INSN_CLAC:
    case INSN_STAC:
        if (!(s->cr4 & CR4_SMAP))
            return deliver_vector(vm, r, s, 6, false, 0, sregs_changed, why, why_len);
        r->rflags = in->kind == INSN_CLAC ? r->rflags & ~RFLAGS_AC : r->rflags | RFLAGS_AC;
        r->rip = next;
        return 0;
    case INSN_FWAIT: {
        if ((s->cr0 & (CR0_MP | CR0_TS)) == (CR0_MP | CR0_TS))
            return deliver_vector(vm, r, s, 7, false, 0, sregs_changed, why, why_len);
        struct kvm_fpu fpu;
        if (ioctl(vm->vcpu_fd, KVM_GET_FPU, &fpu) < 0)
            return ERRF(why, why_len, "KVM_GET_FPU: %s", strerror(errno));
        /* An unmasked x87 exception pending: #MF with CR0.NE (the core sets NE). */
        if (fpu.fsw & FSW_ES) {
            if (!(s->cr0 & CR0_NE))
                return ERRF(why, why_len, "FWAIT with an x87 exception pending and CR0.NE "
                            "clear (external FERR#)");
            /* #MF is a fault: the frame points at the FWAIT. */
            return deliver_vector(vm, r, s, 16, false, 0, sregs_changed, why, why_len);
        }
        r->rip = next;
        return 0;
    }
    case INSN_FNSTSW_AX: {
        /* No-wait: no #MF; #NM with CR0.TS or CR0.EM (SDM vol. 2A, FSTSW). */
        if (s->cr0 & (CR0_TS | CR0_EM))
            return deliver_vector(vm, r, s, 7, false, 0, sregs_changed, why, why_len);
        struct kvm_fpu fpu;
        if (ioctl(vm->vcpu_fd, KVM_GET_FPU, &fpu) < 0)
            return ERRF(why, why_len, "KVM_GET_FPU: %s", strerror(errno));
        r->rax = (r->rax & ~0xffffull) | fpu.fsw;
        r->rip = next;
        return 0;
    }
    case INSN_XGETBV: {
        struct kvm_xcrs xcrs;
        if (ioctl(vm->vcpu_fd, KVM_GET_XCRS, &xcrs) < 0)
            return ERRF(why, why_len, "KVM_GET_XCRS: %s", strerror(errno));
        uint32_t want = (uint32_t)r->rcx;
        if (want == 1 && xgetbv1_offered()) {
            /* XCR0 AND XINUSE (xsave.c says what XINUSE is here) */
            uint64_t inuse;
            if (xsave_xinuse(vm, &inuse) < 0)
                return ERRF(why, why_len, "KVM_GET_XSAVE: %s", strerror(errno));
            r->rax = (uint32_t)inuse;
            r->rdx = inuse >> 32;
            r->rip = next;
            return 0;
        }
        for (uint32_t k = 0; k < xcrs.nr_xcrs; k++) {
            if (xcrs.xcrs[k].xcr == want) {
                r->rax = (uint32_t)xcrs.xcrs[k].value;
                r->rdx = xcrs.xcrs[k].value >> 32;
                r->rip = next;
                return 0;
            }
        }
        return deliver_vector(vm, r, s, 13, true, 0, sregs_changed, why, why_len);
    }
    default:
        if (insn_is_xsave(in->kind))
            return xsave_execute(vm, r, s, in, sregs_changed, why, why_len);
        return ERRF(why, why_len, "the core cannot execute %s", insn_name(in->kind));
    }
}

/*
 * Where guest RAM holds bytes that may be RDTSC (0f 31), RDRAND or RDSEED (0f c7 /6, /7
 * with a register operand, not after F3: that is RDPID).  This host's emulator runs those
 * three without an exit or a trace in any statistic (measured: CR4.TSD does not fault at
 * CPL 0, an MSR filter does not see RDTSC, CPUID without the RDRAND bit does not stop
 * RDRAND), so `fast` can only watch for them with hardware breakpoints, at most four.
 * A byte match is not always an instruction (data, the middle of another one): a
 * breakpoint there simply never hits.  Fills up to max physical addresses; returns how
 * many there are in all.
 */
int time_sites_scan(struct kvmrr_vm *vm, uint64_t *sites, int max)
{
    int n = 0;
    const uint8_t *m = vm->mem, *end = vm->mem + vm->cfg.mem_size - 2;
    for (const uint8_t *p = m; p < end; p++) {
        p = memchr(p, 0x0f, (size_t)(end - p));
        if (!p)
            break;
        bool hit = p[1] == 0x31;
        if (p[1] == 0xc7 && (p[2] & 0xc0) == 0xc0 && ((p[2] >> 3) & 7) >= 6) {
            /* REX (40-4f) may sit between; F3 before either makes it RDPID */
            const uint8_t *q = p > m && (p[-1] & 0xf0) == 0x40 ? p - 1 : p;
            hit = !(q > m && q[-1] == 0xf3);
        }
        if (!hit)
            continue;
        /* The breakpoint goes on the first byte of the instruction: REX and any legacy
         * prefixes before it (a 16-bit RDRAND is 66 0f c7 /6). */
        const uint8_t *start = p > m && (p[-1] & 0xf0) == 0x40 ? p - 1 : p;
        while (start > m && start > p - 14 && memchr("\x66\xf2\x2e\x3e\x26\x36\x64\x65\x67",
                                                     start[-1], 9))
            start--;
        if (n < max)
            sites[n] = (uint64_t)(start - m);
        n++;
    }
    return n;
}
