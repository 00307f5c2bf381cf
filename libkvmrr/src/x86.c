/* x86.c - put the vCPU in 64-bit long mode at ring 0 with identity paging.
 * Bit positions from the Intel SDM vol. 3A §2.5 (CR0/CR4) and §4.5 (paging). */
#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>

#include "internal.h"

#define CR0_PE (1ull << 0)
#define CR0_MP (1ull << 1)
#define CR0_ET (1ull << 4)
#define CR0_NE (1ull << 5)
#define CR0_WP (1ull << 16)
#define CR0_AM (1ull << 18)
#define CR0_PG (1ull << 31)
#define CR4_PAE (1ull << 5)
#define CR4_OSFXSR (1ull << 9)
#define CR4_OSXMMEXCPT (1ull << 10)
#define EFER_LME (1ull << 8)
#define EFER_LMA (1ull << 10)
#define PTE_P (1ull << 0)
#define PTE_RW (1ull << 1)
#define PTE_PS (1ull << 7)   /* 2 MiB page in a PD entry */

static struct kvm_segment segment(uint16_t selector, uint8_t type, bool code)
{
    struct kvm_segment s = {
        .base = 0, .limit = 0xffffffff, .selector = selector, .type = type,
        .present = 1, .dpl = 0, .db = code ? 0 : 1, .s = 1, .l = code ? 1 : 0, .g = 1,
    };
    return s;
}

int x86_setup_long_mode(struct kvmrr_vm *vm, uint64_t entry, uint16_t code_sel,
                        char *err, size_t err_len)
{
    uint8_t *mem = vm->mem;
    /* GDT: null, then a 64-bit code segment at code_sel and a data segment after it
     * (0x8/0x10 for kvmrr's guests; 0x10/0x18 for Linux, its boot protocol's __BOOT_CS
     * and __BOOT_DS). */
    uint64_t *gdt = (uint64_t *)(mem + KVMRR_GDT_ADDR);
    int ci = code_sel / 8;
    memset(gdt, 0, (size_t)(ci + 2) * 8);
    gdt[ci] = 0x00af9a000000ffffull;
    gdt[ci + 1] = 0x00cf92000000ffffull;

    /* PML4 -> PDPT -> one PD of 2 MiB pages (RAM is at most 1 GiB). */
    uint64_t pml4 = KVMRR_PML4_ADDR, pdpt = pml4 + 0x1000, pd = pml4 + 0x2000;
    memset(mem + pml4, 0, 0x3000);
    ((uint64_t *)(mem + pml4))[0] = pdpt | PTE_P | PTE_RW;
    ((uint64_t *)(mem + pdpt))[0] = pd | PTE_P | PTE_RW;
    for (uint64_t i = 0; i < vm->cfg.mem_size >> 21; i++)
        ((uint64_t *)(mem + pd))[i] = (i << 21) | PTE_P | PTE_RW | PTE_PS;

    struct kvm_sregs sregs;
    if (ioctl(vm->vcpu_fd, KVM_GET_SREGS, &sregs) < 0)
        return ERRF(err, err_len, "KVM_GET_SREGS: %s", strerror(errno));
    sregs.cs = segment(code_sel, 11, true);
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = segment(code_sel + 8, 3, false);
    sregs.tr = (struct kvm_segment){ .base = 0, .limit = 0x67, .selector = 0, .type = 11,
                                      .present = 1, .s = 0 };
    sregs.ldt = (struct kvm_segment){ .type = 2, .present = 0, .unusable = 1 };
    sregs.gdt.base = KVMRR_GDT_ADDR;
    sregs.gdt.limit = (uint16_t)((ci + 2) * 8 - 1);
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
    sregs.cr3 = pml4;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    if (ioctl(vm->vcpu_fd, KVM_SET_SREGS, &sregs) < 0)
        return ERRF(err, err_len, "KVM_SET_SREGS (long mode): %s", strerror(errno));

    struct kvm_fpu fpu = { .fcw = 0x37f, .mxcsr = 0x1f80 };
    if (ioctl(vm->vcpu_fd, KVM_SET_FPU, &fpu) < 0)
        return ERRF(err, err_len, "KVM_SET_FPU: %s", strerror(errno));

    struct kvm_regs regs = { .rip = entry, .rsp = vm->cfg.mem_size, .rflags = 0x2 };
    if (vm_set_regs(vm, &regs) < 0)
        return ERRF(err, err_len, "KVM_SET_REGS: %s", strerror(errno));
    return 0;
}
