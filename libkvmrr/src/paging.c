/*
 * paging.c - the guest's own address translation, for the core's reads and writes of
 * guest memory by virtual address (the instruction at RIP, interrupt frames at RSP, the
 * IDT and TSS by their linear bases).
 *
 * A guest may run with page tables of its own (a higher-half kernel, non-identity maps,
 * 4 KiB pages), so physical = virtual holds only for the loader's initial tables.  The
 * walk follows the SDM vol. 3A §4.5 (4-level paging, IA-32e mode): CR3 bits 51:12 give
 * the PML4; a PDPTE or PDE with PS maps a 1 GiB or 2 MiB page.  Without CR0.PG the
 * address is physical.  Accessed/dirty bits are not set: the core's accesses stand in
 * for the CPU's, which on this host KVM's emulator makes and which set them itself on
 * the instruction's own path; the few the core performs (frame pushes) touch pages the
 * guest's stack already uses.
 */
#include <string.h>

#include "internal.h"

#define CR0_PG        (1ull << 31)
#define CR0_WP        (1ull << 16)
#define CR4_PAE       (1ull << 5)
#define EFER_LMA      (1ull << 10)
#define PTE_P         (1ull << 0)
#define PTE_RW        (1ull << 1)
#define PTE_PS        (1ull << 7)
#define PTE_ADDR      0x000ffffffffff000ull   /* bits 51:12 */

static bool read_pte(struct kvmrr_vm *vm, uint64_t gpa, uint64_t *pte)
{
    if (gpa + 8 > vm->cfg.mem_size || gpa + 8 < gpa)
        return false;
    memcpy(pte, vm->mem + gpa, 8);
    return true;
}

int gva_to_gpa(struct kvmrr_vm *vm, const struct kvm_sregs *s, uint64_t gva, bool write,
               uint64_t *gpa)
{
    if (!(s->cr0 & CR0_PG)) {
        *gpa = gva;
        return 0;
    }
    if (!(s->cr4 & CR4_PAE) || !(s->efer & EFER_LMA))
        return -1;   /* 32-bit paging: no guest of the core's runs there (entered in long mode) */
    /* A canonical address has bits 63:47 all equal. */
    int64_t sx = (int64_t)gva >> 47;
    if (sx != 0 && sx != -1)
        return -1;
    uint64_t table = s->cr3 & PTE_ADDR;
    static const int shift[4] = { 39, 30, 21, 12 };
    for (int level = 0; level < 4; level++) {
        uint64_t pte;
        if (!read_pte(vm, table + ((gva >> shift[level]) & 0x1ff) * 8, &pte) || !(pte & PTE_P))
            return -1;
        if (write && !(pte & PTE_RW) && (s->cr0 & CR0_WP))
            return -1;
        bool leaf = level == 3 || ((level == 1 || level == 2) && (pte & PTE_PS));
        if (leaf) {
            uint64_t mask = (1ull << shift[level]) - 1;
            *gpa = ((pte & PTE_ADDR) & ~mask) | (gva & mask);
            return 0;
        }
        table = pte & PTE_ADDR;
    }
    return -1;
}

/* Copy between a host buffer and guest virtual memory, page by page. */
static int guest_copy(struct kvmrr_vm *vm, const struct kvm_sregs *s, uint64_t gva,
                      void *buf, size_t len, bool write)
{
    uint8_t *p = buf;
    while (len) {
        uint64_t gpa;
        if (gva_to_gpa(vm, s, gva, write, &gpa) < 0)
            return -1;
        size_t chunk = 0x1000 - (gva & 0xfff);
        if (chunk > len)
            chunk = len;
        if (gpa + chunk > vm->cfg.mem_size || gpa + chunk < gpa)
            return -1;
        if (write)
            memcpy(vm->mem + gpa, p, chunk);
        else
            memcpy(p, vm->mem + gpa, chunk);
        gva += chunk;
        p += chunk;
        len -= chunk;
    }
    return 0;
}

int guest_read(struct kvmrr_vm *vm, const struct kvm_sregs *s, uint64_t gva, void *buf,
               size_t len)
{
    return guest_copy(vm, s, gva, buf, len, false);
}

int guest_write(struct kvmrr_vm *vm, const struct kvm_sregs *s, uint64_t gva,
                const void *buf, size_t len)
{
    return guest_copy(vm, s, gva, (void *)buf, len, true);
}
