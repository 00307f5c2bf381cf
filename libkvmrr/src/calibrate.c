/*
 * calibrate.c - decide at start which counting backend is exact on this host.
 *
 * A probe of known length (mov; 1000 x {dec; jnz}; out = 2002 instructions at the exit)
 * runs once single-stepped and once free.  `fast` is used only if KVM's statistic gives
 * exactly the count that single-stepping gives.
 */
#include <elf.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "internal.h"

#define PROBE_EXPECTED 2002

/* A minimal ELF64 executable holding code at KVMRR_LOAD_MIN. */
size_t probe_elf_build(const uint8_t *code, size_t code_len, uint8_t *out, size_t cap)
{
    size_t off = sizeof(Elf64_Ehdr) + sizeof(Elf64_Phdr);
    if (cap < off + code_len)
        return 0;
    memset(out, 0, off);
    Elf64_Ehdr *eh = (Elf64_Ehdr *)out;
    memcpy(eh->e_ident, ELFMAG, SELFMAG);
    eh->e_ident[EI_CLASS] = ELFCLASS64;
    eh->e_ident[EI_DATA] = ELFDATA2LSB;
    eh->e_ident[EI_VERSION] = EV_CURRENT;
    eh->e_type = ET_EXEC;
    eh->e_machine = EM_X86_64;
    eh->e_version = EV_CURRENT;
    eh->e_entry = KVMRR_LOAD_MIN;
    eh->e_phoff = sizeof(Elf64_Ehdr);
    eh->e_ehsize = sizeof(Elf64_Ehdr);
    eh->e_phentsize = sizeof(Elf64_Phdr);
    eh->e_phnum = 1;
    Elf64_Phdr *ph = (Elf64_Phdr *)(out + sizeof(Elf64_Ehdr));
    ph->p_type = PT_LOAD;
    ph->p_flags = PF_R | PF_X;
    ph->p_offset = off;
    ph->p_vaddr = ph->p_paddr = KVMRR_LOAD_MIN;
    ph->p_filesz = ph->p_memsz = code_len;
    ph->p_align = 0x1000;
    memcpy(out + off, code, code_len);
    return off + code_len;
}

static const uint8_t probe_code[] = {
    0xb9, 0xe8, 0x03, 0x00, 0x00,   /* mov ecx, 1000 */
    0xff, 0xc9,                     /* dec ecx */
    0x75, 0xfc,                     /* jnz -4 */
    0xe6, KVMRR_PORT_EXIT,          /* out 0xf4, al */
};

static int probe_count(int counter, kvmrr_icount_t *count, char *why, size_t why_len)
{
    uint8_t elf[256];
    size_t n = probe_elf_build(probe_code, sizeof(probe_code), elf, sizeof(elf));
    struct kvmrr_config cfg = { .mem_size = 4 << 20, .mode = KVMRR_MODE_RUN, .counter = counter };
    struct kvmrr_vm *vm = kvmrr_vm_create(&cfg, elf, n, "", why, why_len);
    if (!vm)
        return -1;
    struct kvmrr_limits lim = { .stop_icount = -1, .deadline_ns = 0 };
    struct kvmrr_result res;
    kvmrr_vm_run(vm, &lim, &res);
    kvmrr_vm_destroy(vm);
    if (res.stop != KVMRR_STOP_EXITED) {
        snprintf(why, why_len, "probe did not finish: %s", res.message);
        return -1;
    }
    *count = res.icount;
    return 0;
}

int kvmrr_calibrate(char *why, size_t why_len)
{
    kvmrr_icount_t stepped = 0, fast = 0;
    if (probe_count(KVMRR_COUNTER_STEP, &stepped, why, why_len) < 0)
        return -1;
    if (stepped != PROBE_EXPECTED) {
        snprintf(why, why_len, "single-stepping counted %lld instructions of a %d-instruction "
                 "probe", (long long)stepped, PROBE_EXPECTED);
        return -1;
    }
    char err[256];
    if (probe_count(KVMRR_COUNTER_FAST, &fast, err, sizeof(err)) < 0) {
        snprintf(why, why_len, "fast counter unavailable: %s", err);
        return KVMRR_COUNTER_STEP;
    }
    if (fast != stepped) {
        snprintf(why, why_len, "KVM's insn_emulation statistic counted %lld instructions of a "
                 "%lld-instruction probe: not exact on this host", (long long)fast,
                 (long long)stepped);
        return KVMRR_COUNTER_STEP;
    }
    snprintf(why, why_len, "insn_emulation statistic exact (%lld of %lld)", (long long)fast,
             (long long)stepped);
    return KVMRR_COUNTER_FAST;
}

/*
 * Whether a hardware instruction breakpoint (KVM_GUESTDBG_USE_HW_BP, DR0) stops ring-0
 * guest code here before the instruction at it, with the statistic exact at the stop, and
 * re-arms after a single-step over it (docs/ARCHITECTURE.md §8).  KVM checks code
 * breakpoints in its emulator path too on this host; a host that does not would let a
 * replay run past its target, so replay uses breakpoints only if this probe passes.
 * Probed once per process; KVMRR_NO_HWBP=1 in the environment turns them off (for
 * comparisons).
 */
static pthread_once_t hwbp_once = PTHREAD_ONCE_INIT;
static bool hwbp_ok;

static bool hwbp_hit(struct kvmrr_vm *vm, uint64_t rip, uint64_t want)
{
    uint64_t stat;
    return ioctl(vm->vcpu_fd, KVM_RUN, 0) == 0 && vm->run->exit_reason == KVM_EXIT_DEBUG
           && vm->run->s.regs.regs.rip == rip && counter_read_stat(vm, &stat) == 0
           && stat - vm->stat_base == want;
}

static void hwbp_probe(void)
{
    const char *off = getenv("KVMRR_NO_HWBP");
    if (off && *off && strcmp(off, "0") != 0)
        return;
    uint8_t elf[256];
    size_t n = probe_elf_build(probe_code, sizeof(probe_code), elf, sizeof(elf));
    struct kvmrr_config cfg = { .mem_size = 4 << 20, .mode = KVMRR_MODE_RUN,
                                .counter = KVMRR_COUNTER_FAST };
    char err[256];
    struct kvmrr_vm *vm = kvmrr_vm_create(&cfg, elf, n, "", err, sizeof(err));
    if (!vm)
        return;
    uint64_t dec = KVMRR_LOAD_MIN + 5;   /* 1 instruction in; then every 2 */
    bool ok = vm->cfg.counter == KVMRR_COUNTER_FAST;
    for (int i = 0; ok && i < 3; i++) {
        ok = vm_set_guest_debug(vm, DEBUG_BP, dec) == 0 && hwbp_hit(vm, dec, 1 + 2 * i)
             && vm_set_guest_debug(vm, DEBUG_STEP, 0) == 0 && hwbp_hit(vm, dec + 2, 2 + 2 * i);
    }
    kvmrr_vm_destroy(vm);
    hwbp_ok = ok;
}

bool hwbp_usable(void)
{
    pthread_once(&hwbp_once, hwbp_probe);
    return hwbp_ok;
}
