/* vm.c - the KVM objects of one VM: /dev/kvm, the VM, its RAM and its one vCPU. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "internal.h"

int kvmrr_abi_version(void) { return KVMRR_ABI_VERSION; }

static int vm_open(struct kvmrr_vm *vm, char *err, size_t err_len)
{
    vm->kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (vm->kvm_fd < 0)
        return ERRF(err, err_len, "cannot open /dev/kvm: %s", strerror(errno));
    int api = ioctl(vm->kvm_fd, KVM_GET_API_VERSION, 0);
    if (api != KVM_API_VERSION)
        return ERRF(err, err_len, "/dev/kvm speaks API %d, kvmrr needs %d", api, KVM_API_VERSION);
    if (ioctl(vm->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_SYNC_REGS) <= 0)
        return ERRF(err, err_len, "KVM lacks KVM_CAP_SYNC_REGS");
    if (ioctl(vm->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_SET_GUEST_DEBUG) <= 0)
        return ERRF(err, err_len, "KVM lacks KVM_CAP_SET_GUEST_DEBUG (single-step)");

    vm->vm_fd = ioctl(vm->kvm_fd, KVM_CREATE_VM, 0);
    if (vm->vm_fd < 0)
        return ERRF(err, err_len, "KVM_CREATE_VM: %s", strerror(errno));
    /* Needed by VMX for real-mode emulation; harmless elsewhere. */
    (void)ioctl(vm->vm_fd, KVM_SET_TSS_ADDR, 0xfffbd000UL);

    vm->mem = mmap(NULL, vm->cfg.mem_size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (vm->mem == MAP_FAILED) {
        vm->mem = NULL;
        return ERRF(err, err_len, "cannot map %llu bytes of guest RAM: %s",
                    (unsigned long long)vm->cfg.mem_size, strerror(errno));
    }
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = vm->cfg.mem_size,
        .userspace_addr = (uint64_t)(uintptr_t)vm->mem,
    };
    if (ioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        return ERRF(err, err_len, "KVM_SET_USER_MEMORY_REGION: %s", strerror(errno));

    vm->vcpu_fd = ioctl(vm->vm_fd, KVM_CREATE_VCPU, 0);
    if (vm->vcpu_fd < 0)
        return ERRF(err, err_len, "KVM_CREATE_VCPU: %s", strerror(errno));
    int run_size = ioctl(vm->kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size <= 0)
        return ERRF(err, err_len, "KVM_GET_VCPU_MMAP_SIZE: %s", strerror(errno));
    vm->run_size = (size_t)run_size;
    vm->run = mmap(NULL, vm->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vm->vcpu_fd, 0);
    if (vm->run == MAP_FAILED) {
        vm->run = NULL;
        return ERRF(err, err_len, "mmap of kvm_run: %s", strerror(errno));
    }
    /* Registers travel with every exit: no GET_REGS ioctl per single-step. */
    vm->run->kvm_valid_regs = KVM_SYNC_X86_REGS;
    if (cpu_model_set(vm, err, err_len) < 0)
        return -1;
    return snapshot_msrs_init(vm, err, err_len);
}

struct kvmrr_vm *kvmrr_vm_create(const struct kvmrr_config *cfg, const uint8_t *elf,
                                 size_t elf_len, const char *bootargs,
                                 char *err, size_t err_len)
{
    if (cfg->mem_size < (4u << 20) || cfg->mem_size % (2u << 20) || cfg->mem_size > (1ull << 30)) {
        ERRF(err, err_len, "memory size must be a multiple of 2 MiB between 4 MiB and 1 GiB");
        return NULL;
    }
    if (cfg->counter != KVMRR_COUNTER_STEP && cfg->counter != KVMRR_COUNTER_FAST) {
        ERRF(err, err_len, "unknown counter %d", cfg->counter);
        return NULL;
    }
    if (cfg->machine != KVMRR_MACHINE_KVMRR && cfg->machine != KVMRR_MACHINE_PC) {
        ERRF(err, err_len, "unknown machine %d", cfg->machine);
        return NULL;
    }
    if (cfg->machine == KVMRR_MACHINE_KVMRR && bootargs && strlen(bootargs) >= KVMRR_BOOTARGS_MAX) {
        ERRF(err, err_len, "boot arguments longer than %d bytes", KVMRR_BOOTARGS_MAX - 1);
        return NULL;
    }
    struct kvmrr_vm *vm = calloc(1, sizeof(*vm));
    if (!vm) {
        ERRF(err, err_len, "out of memory");
        return NULL;
    }
    vm->cfg = *cfg;
    vm->kvm_fd = vm->vm_fd = vm->vcpu_fd = vm->stats_fd = vm->wake_fd = -1;
    vm->insn_stat_offset = -1;
    pthread_mutex_init(&vm->lock, NULL);
    vm->dev.machine = (uint32_t)cfg->machine;
    uint64_t entry = 0;
    if (host_cpu_pin(vm, err, err_len) < 0)
        goto fail;
    if (vm_open(vm, err, err_len) < 0)
        goto fail;
    if (cfg->machine == KVMRR_MACHINE_PC) {
        if (linux_boot_setup(vm, elf, elf_len, bootargs ? bootargs : "", &entry, err,
                             err_len) < 0
            || x86_setup_long_mode(vm, entry, 0x10, err, err_len) < 0
            || linux_boot_regs(vm, err, err_len) < 0)
            goto fail;
    } else {
        if (elf_load(vm->mem, cfg->mem_size, elf, elf_len, &entry, err, err_len) < 0)
            goto fail;
        struct kvmrr_bootinfo *bi = (struct kvmrr_bootinfo *)(vm->mem + KVMRR_BOOTINFO_ADDR);
        bi->magic = KVMRR_BOOTINFO_MAGIC;
        bi->mem_size = cfg->mem_size;
        snprintf(bi->args, sizeof(bi->args), "%s", bootargs ? bootargs : "");
        if (x86_setup_long_mode(vm, entry, 0x8, err, err_len) < 0)
            goto fail;
    }
    if (counter_open(vm) < 0 && cfg->counter == KVMRR_COUNTER_FAST) {
        ERRF(err, err_len, "counter 'fast' needs KVM's insn_emulation statistic, absent here");
        goto fail;
    }
    counter_rebase(vm, 0);
    vm->nic_queue = calloc(KVMRR_NIC_QUEUE, sizeof(struct nic_packet));
    vm->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (!vm->nic_queue || vm->wake_fd < 0 || queue_init(&vm->recorded, KVMRR_RECORD_CAP) < 0
        || queue_init(&vm->replay, 1024) < 0) {
        ERRF(err, err_len, "out of memory");
        goto fail;
    }
    if (kick_init(vm) < 0) {
        ERRF(err, err_len, "cannot create the vCPU kick timer: %s", strerror(errno));
        goto fail;
    }
    return vm;
fail:
    kvmrr_vm_destroy(vm);
    return NULL;
}

void kvmrr_vm_destroy(struct kvmrr_vm *vm)
{
    if (!vm)
        return;
    kick_free(vm);
    queue_free(&vm->recorded);
    queue_free(&vm->replay);
    free(vm->nic_queue);
    free(vm->snap_msrs);
    free(vm->skipped_msrs);
    if (vm->run)
        munmap(vm->run, vm->run_size);
    if (vm->mem)
        munmap(vm->mem, vm->cfg.mem_size);
    int fds[] = { vm->wake_fd, vm->stats_fd, vm->vcpu_fd, vm->vm_fd, vm->kvm_fd };
    for (size_t i = 0; i < sizeof(fds) / sizeof(fds[0]); i++)
        if (fds[i] >= 0)
            close(fds[i]);
    pthread_mutex_destroy(&vm->lock);
    free(vm);
}

int vm_get_regs(struct kvmrr_vm *vm, struct kvm_regs *regs)
{
    return ioctl(vm->vcpu_fd, KVM_GET_REGS, regs);
}

int vm_set_regs(struct kvmrr_vm *vm, const struct kvm_regs *regs)
{
    /* Keep the synced copy in kvm_run coherent with what KVM now holds. */
    vm->run->s.regs.regs = *regs;
    return ioctl(vm->vcpu_fd, KVM_SET_REGS, regs);
}

void vm_regs_to_array(const struct kvm_regs *r, uint64_t out[KVMRR_NREGS])
{
    const uint64_t v[KVMRR_NREGS] = {
        r->rax, r->rbx, r->rcx, r->rdx, r->rsi, r->rdi, r->rsp, r->rbp, r->r8, r->r9,
        r->r10, r->r11, r->r12, r->r13, r->r14, r->r15, r->rip, r->rflags,
    };
    memcpy(out, v, sizeof(v));
}

int kvmrr_vm_get_regs(struct kvmrr_vm *vm, uint64_t regs[])
{
    struct kvm_regs r;
    if (vm_get_regs(vm, &r) < 0)
        return -1;
    vm_regs_to_array(&r, regs);
    return 0;
}

int vm_set_guest_debug(struct kvmrr_vm *vm, int mode, uint64_t bp)
{
    if (vm->debug_mode == mode && (mode != DEBUG_BP || vm->debug_bp == bp))
        return 0;
    struct kvm_guest_debug dbg = { 0 };
    if (mode == DEBUG_STEP)
        dbg.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
    if (mode == DEBUG_BP) {
        dbg.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
        dbg.arch.debugreg[0] = bp;
        dbg.arch.debugreg[7] = 0x401;   /* L0, execute, 1 byte (bit 10 reads as 1) */
    }
    if (ioctl(vm->vcpu_fd, KVM_SET_GUEST_DEBUG, &dbg) < 0)
        return -1;
    vm->debug_mode = mode;
    vm->debug_bp = bp;
    return 0;
}

kvmrr_icount_t kvmrr_vm_icount(struct kvmrr_vm *vm) { return vm->icount; }

int kvmrr_vm_host_cpu(struct kvmrr_vm *vm) { return vm->cfg.host_cpu; }

/* CPUID leaf 1 EBX[31:24] shows the guest the APIC ID of the host CPU its vCPU thread runs
 * on (docs/ARCHITECTURE.md §2.7, §8), and a kernel keeps it in RAM: the vCPU runs on one
 * host CPU for the whole run, the log says which, and a replay takes the same one.  Here
 * the CPU is chosen (the one the creating thread is on, if not given) and checked;
 * kvmrr_vm_run pins the thread that runs the vCPU for the call (host_cpu_enter). */
int host_cpu_pin(struct kvmrr_vm *vm, char *err, size_t err_len)
{
    if (vm->cfg.host_cpu < 0) {
        int cpu = sched_getcpu();
        vm->cfg.host_cpu = cpu < 0 ? 0 : cpu;
    }
    cpu_set_t set;
    CPU_ZERO(&set);
    if (vm->cfg.host_cpu >= CPU_SETSIZE || sched_getaffinity(0, sizeof(set), &set) < 0
        || !CPU_ISSET(vm->cfg.host_cpu, &set))
        return ERRF(err, err_len, "this host has no CPU %d to run the vCPU on (the guest "
                    "saw that CPU's APIC ID in CPUID when it was recorded)", vm->cfg.host_cpu);
    return 0;
}

/* Pin the calling thread to the VM's host CPU, keeping its old set in *saved. */
int host_cpu_enter(struct kvmrr_vm *vm, cpu_set_t *saved)
{
    if (sched_getaffinity(0, sizeof(*saved), saved) < 0)
        return -1;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(vm->cfg.host_cpu, &set);
    return sched_setaffinity(0, sizeof(set), &set);
}

void host_cpu_leave(const cpu_set_t *saved)
{
    (void)sched_setaffinity(0, sizeof(*saved), saved);
}

void kvmrr_vm_stats(struct kvmrr_vm *vm, struct kvmrr_stats *out) { *out = vm->stats; }

void kvmrr_vm_divergence(struct kvmrr_vm *vm, struct kvmrr_divergence *out) { *out = vm->div; }
