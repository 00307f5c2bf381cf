/* hash.c - XXH64 (Yann Collet's xxHash, 64-bit) and the VM state hash built on it. */
#include <string.h>
#include <sys/ioctl.h>

#include "internal.h"

#define P1 11400714785074694791ull
#define P2 14029467366897019727ull
#define P3 1609587929392839161ull
#define P4 9650029242287828579ull
#define P5 2870177450012600261ull

static inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t round1(uint64_t acc, uint64_t in) { return rotl(acc + in * P2, 31) * P1; }
static inline uint64_t merge(uint64_t acc, uint64_t v) { return (acc ^ round1(0, v)) * P1 + P4; }

uint64_t kvmrr_hash64(const uint8_t *p, size_t len, uint64_t seed)
{
    const uint8_t *end = p + len;
    uint64_t h;
    if (len >= 32) {
        uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
        const uint8_t *limit = end - 32;
        do {
            v1 = round1(v1, rd64(p)); v2 = round1(v2, rd64(p + 8));
            v3 = round1(v3, rd64(p + 16)); v4 = round1(v4, rd64(p + 24));
            p += 32;
        } while (p <= limit);
        h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18);
        h = merge(h, v1); h = merge(h, v2); h = merge(h, v3); h = merge(h, v4);
    } else {
        h = seed + P5;
    }
    h += (uint64_t)len;
    for (; p + 8 <= end; p += 8)
        h = rotl(h ^ round1(0, rd64(p)), 27) * P1 + P4;
    if (p + 4 <= end) {
        h = rotl(h ^ ((uint64_t)rd32(p) * P1), 23) * P2 + P3;
        p += 4;
    }
    for (; p < end; p++)
        h = rotl(h ^ (*p * P5), 11) * P1;
    h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32;
    return h;
}

/*
 * The x87, SSE and AVX state (and the rest of XCR0's components) as KVM_GET_XSAVE gives
 * it, in the form two runs of the same guest agree on.  KVM fills each component whose
 * XSTATE_BV bit is clear with its initial values, so a register in use but zero and one
 * in its initial configuration read alike; left out are the bytes that say how the state
 * was last stored rather than what it is: the XSAVE header (XSTATE_BV, which component
 * this CPU found in its initial configuration), the reserved byte after the abridged FTW
 * (this CPU clears it when the state passes through it, KVM keeps what was set until
 * then: docs/ARCHITECTURE.md §8), the reserved upper bytes of the ST(i) slots, and bytes
 * 464-511 (reserved, and the kernel's software area).  (Hashed since format version 2.)
 */
static void fpu_canonical(struct kvmrr_vm *vm, uint8_t *out, size_t len)
{
    struct kvm_xsave x;
    memset(out, 0, len);
    if (ioctl(vm->vcpu_fd, KVM_GET_XSAVE, &x) < 0)
        return;
    memcpy(out, x.region, len < sizeof(x.region) ? len : sizeof(x.region));
    out[5] = 0;
    for (int i = 0; i < 8; i++)
        memset(out + 32 + 16 * i + 10, 0, 6);
    memset(out + 464, 0, 512 + 64 - 464);
}

/* Registers (general, FPU/SSE/AVX), the control state that shapes execution, device
 * state and all of RAM.  The icount is part of it: equal state at different counts is
 * not the same replay. */
uint64_t state_hash(struct kvmrr_vm *vm)
{
    struct {
        uint64_t regs[KVMRR_NREGS];
        uint64_t cr0, cr3, cr4, efer, idt_base, gdt_base;
        int64_t icount;
    } cpu;
    memset(&cpu, 0, sizeof(cpu));
    struct kvm_regs r;
    struct kvm_sregs s;
    if (vm_get_regs(vm, &r) == 0)
        vm_regs_to_array(&r, cpu.regs);
    if (ioctl(vm->vcpu_fd, KVM_GET_SREGS, &s) == 0) {
        cpu.cr0 = s.cr0; cpu.cr3 = s.cr3; cpu.cr4 = s.cr4; cpu.efer = s.efer;
        cpu.idt_base = s.idt.base; cpu.gdt_base = s.gdt.base;
    }
    cpu.icount = vm->icount;
    uint64_t h = kvmrr_hash64((const uint8_t *)&cpu, sizeof(cpu), 0);
    uint8_t fpu[4096];
    fpu_canonical(vm, fpu, sizeof(fpu));
    h = kvmrr_hash64(fpu, sizeof(fpu), h);
    h = kvmrr_hash64((const uint8_t *)&vm->dev, sizeof(vm->dev), h);
    return kvmrr_hash64(vm->mem, vm->cfg.mem_size, h);
}

uint64_t kvmrr_vm_state_hash(struct kvmrr_vm *vm) { return state_hash(vm); }
