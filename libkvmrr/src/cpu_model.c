/*
 * cpu_model.c - the one CPU every kvmrr guest sees, whatever the host.
 *
 * CPUID is guest-visible state: passing the host's answers through would make a log
 * depend on the machine that recorded it, and KVM's own leaves (0x40000000..) invite the
 * guest to enable kvmclock, async page faults and steal time, which make the host write
 * guest RAM behind the log's back.  So the vCPU gets a fixed table chosen here.  It
 * offers what a 64-bit ring-0 guest needs (long mode, PAE, NX, SYSCALL, x87/MMX/SSE/SSE2,
 * the TSC, MSRs, an APIC bit for the PC device model to come) and hides what the recorder
 * cannot log or this host's instruction emulator cannot execute: RDRAND, RDSEED, RDPID,
 * RDTSCP, the TSC deadline timer, x2APIC, XSAVE and everything built on it (AVX, ...),
 * MONITOR/MWAIT, SMEP/SMAP/CLAC, the hypervisor bit.  The leaves are constants, not
 * masked by the host: a host that lacks one of the features offered cannot run the model
 * and is refused, so every host that runs it gives the same answers.
 *
 * The table's xxh64 names it in logs and snapshots; a change to any leaf is a new model.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "internal.h"

#define MODEL_NAME "kvmrr-x86-64-v1"

/* A brand string of 48 bytes, 16 per leaf 0x80000002..4 (NUL-padded). */
static const char brand[48] = "kvmrr x86-64 model v1";

#define R(s) ((uint32_t)(s)[0] | (uint32_t)(s)[1] << 8 | (uint32_t)(s)[2] << 16 \
              | (uint32_t)(s)[3] << 24)

/* Leaf 1 EDX (SDM vol. 2A, CPUID, table 3-11). */
#define F1D_FPU     (1u << 0)
#define F1D_DE      (1u << 2)
#define F1D_PSE     (1u << 3)
#define F1D_TSC     (1u << 4)
#define F1D_MSR     (1u << 5)
#define F1D_PAE     (1u << 6)
#define F1D_CX8     (1u << 8)
#define F1D_APIC    (1u << 9)
#define F1D_SEP     (1u << 11)
#define F1D_PGE     (1u << 13)
#define F1D_CMOV    (1u << 15)
#define F1D_PAT     (1u << 16)
#define F1D_CLFSH   (1u << 19)
#define F1D_MMX     (1u << 23)
#define F1D_FXSR    (1u << 24)
#define F1D_SSE     (1u << 25)
#define F1D_SSE2    (1u << 26)
/* Leaf 1 ECX */
#define F1C_CX16    (1u << 13)
/* Leaf 0x80000001 */
#define E1C_LAHF    (1u << 0)
#define E1D_SYSCALL (1u << 11)
#define E1D_NX      (1u << 20)
#define E1D_LM      (1u << 29)

static const struct kvm_cpuid_entry2 model_base[] = {
    /* vendor GenuineIntel: KVM's emulator follows Intel's rules for SYSCALL/SYSENTER and
     * for leaves beyond the maximum, which is what the host (Intel) does natively */
    { .function = 0, .eax = 7, .ebx = R("Genu"), .edx = R("ineI"), .ecx = R("ntel") },
    { .function = 1,
      .eax = 0x000206a7,            /* family 6, model 0x2a, stepping 7 */
      .ebx = 0x00010800,            /* APIC id 0, 1 logical processor, CLFLUSH 64 bytes */
      .ecx = F1C_CX16,
      .edx = F1D_FPU | F1D_DE | F1D_PSE | F1D_TSC | F1D_MSR | F1D_PAE | F1D_CX8 | F1D_APIC
             | F1D_SEP | F1D_PGE | F1D_CMOV | F1D_PAT | F1D_CLFSH | F1D_MMX | F1D_FXSR
             | F1D_SSE | F1D_SSE2 },
    { .function = 2, .eax = 0x00000001 },   /* one pass, no cache descriptors */
    { .function = 3 },
    { .function = 4, .flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX },   /* no cache levels */
    { .function = 5 },                      /* no MONITOR/MWAIT */
    { .function = 6 },
    { .function = 7, .flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX },   /* nothing extended */
    /* Explicitly empty, so the guest finds no hypervisor signature (an absent leaf would
     * read as the highest basic one, Intel's rule). */
    { .function = 0x40000000 },
    { .function = 0x40000001 },
    { .function = 0x80000000, .eax = 0x80000008 },
    { .function = 0x80000001, .ecx = E1C_LAHF, .edx = E1D_SYSCALL | E1D_NX | E1D_LM },
    { .function = 0x80000002 }, { .function = 0x80000003 }, { .function = 0x80000004 },
    { .function = 0x80000005 }, { .function = 0x80000006 }, { .function = 0x80000007 },
    { .function = 0x80000008, .eax = 0x00003028 },   /* 40 physical, 48 linear address bits */
};
#define MODEL_NENT (sizeof(model_base) / sizeof(model_base[0]))

/* The full table (brand string filled in). */
static void model_entries(struct kvm_cpuid_entry2 out[MODEL_NENT])
{
    memcpy(out, model_base, sizeof(model_base));
    for (size_t i = 0; i < MODEL_NENT; i++) {
        uint32_t f = out[i].function;
        if (f >= 0x80000002 && f <= 0x80000004) {
            const char *p = brand + 16 * (f - 0x80000002);
            out[i].eax = R(p); out[i].ebx = R(p + 4); out[i].ecx = R(p + 8); out[i].edx = R(p + 12);
        }
    }
}

int kvmrr_cpu_model(char *name, size_t name_len, uint64_t *hash)
{
    struct kvm_cpuid_entry2 e[MODEL_NENT];
    model_entries(e);
    if (name && name_len)
        snprintf(name, name_len, "%s", MODEL_NAME);
    if (hash)
        *hash = kvmrr_hash64((const uint8_t *)e, sizeof(e), 0);
    return (int)MODEL_NENT;
}

static const struct kvm_cpuid_entry2 *find_entry(const struct kvm_cpuid2 *c, uint32_t function)
{
    for (uint32_t i = 0; i < c->nent; i++)
        if (c->entries[i].function == function && c->entries[i].index == 0)
            return &c->entries[i];
    return NULL;
}

/* A feature register the model offers must be offered by KVM on this host, bit for bit. */
static int model_check_host(const struct kvm_cpuid2 *host, const struct kvm_cpuid_entry2 *e,
                            char *err, size_t err_len)
{
    static const struct { uint32_t function; int reg; } features[] = {
        { 1, 2 }, { 1, 3 }, { 0x80000001, 2 }, { 0x80000001, 3 },
    };
    static const char *reg_names[] = { "eax", "ebx", "ecx", "edx" };
    for (size_t i = 0; i < sizeof(features) / sizeof(features[0]); i++) {
        const struct kvm_cpuid_entry2 *want = NULL;
        for (size_t k = 0; k < MODEL_NENT; k++)
            if (e[k].function == features[i].function)
                want = &e[k];
        const struct kvm_cpuid_entry2 *have = find_entry(host, features[i].function);
        const uint32_t w[4] = { want->eax, want->ebx, want->ecx, want->edx };
        uint32_t h = 0;
        if (have) {
            const uint32_t hv[4] = { have->eax, have->ebx, have->ecx, have->edx };
            h = hv[features[i].reg];
        }
        uint32_t missing = w[features[i].reg] & ~h;
        if (missing)
            return ERRF(err, err_len, "this host cannot run CPU model %s: KVM lacks CPUID "
                        "0x%x %s bit %d", MODEL_NAME, features[i].function,
                        reg_names[features[i].reg], __builtin_ctz(missing));
    }
    return 0;
}

int cpu_model_set(struct kvmrr_vm *vm, char *err, size_t err_len)
{
    int n = 256;
    struct kvm_cpuid2 *host = calloc(1, sizeof(*host) + n * sizeof(struct kvm_cpuid_entry2));
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + MODEL_NENT * sizeof(struct kvm_cpuid_entry2));
    int rc = -1;
    if (!host || !cpuid) {
        ERRF(err, err_len, "out of memory");
        goto out;
    }
    host->nent = n;
    if (ioctl(vm->kvm_fd, KVM_GET_SUPPORTED_CPUID, host) < 0) {
        ERRF(err, err_len, "KVM_GET_SUPPORTED_CPUID: %s", strerror(errno));
        goto out;
    }
    cpuid->nent = MODEL_NENT;
    model_entries(cpuid->entries);
    if (model_check_host(host, cpuid->entries, err, err_len) < 0)
        goto out;
    if (ioctl(vm->vcpu_fd, KVM_SET_CPUID2, cpuid) < 0) {
        ERRF(err, err_len, "KVM_SET_CPUID2 (CPU model %s): %s", MODEL_NAME, strerror(errno));
        goto out;
    }
    /* Without this KVM honours writes to its paravirtual MSRs (kvmclock, async PF, steal
     * time) even though CPUID hides them; with it they raise #GP, as on a real CPU. */
    struct kvm_enable_cap cap = { .cap = KVM_CAP_ENFORCE_PV_FEATURE_CPUID, .args = { 1 } };
    if (ioctl(vm->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_ENFORCE_PV_FEATURE_CPUID) <= 0
        || ioctl(vm->vcpu_fd, KVM_ENABLE_CAP, &cap) < 0) {
        ERRF(err, err_len, "KVM cannot hide its paravirtual MSRs from the guest "
             "(KVM_CAP_ENFORCE_PV_FEATURE_CPUID)");
        goto out;
    }
    kvmrr_cpu_model(NULL, 0, &vm->cpu_model_hash);
    rc = 0;
out:
    free(host);
    free(cpuid);
    return rc;
}

bool cpu_model_leaf(uint32_t function, uint32_t out[4])
{
    struct kvm_cpuid_entry2 e[MODEL_NENT];
    model_entries(e);
    for (size_t i = 0; i < MODEL_NENT; i++) {
        if (e[i].function == function) {
            out[0] = e[i].eax; out[1] = e[i].ebx; out[2] = e[i].ecx; out[3] = e[i].edx;
            return true;
        }
    }
    return false;
}

/*
 * What a guest actually sees.  KVM_SET_CPUID2 is not the whole story on every host: on
 * this one (kvm_pvm) the guest reads leaf 1 ECX/EDX, leaf 7 and leaf 0xd from the host
 * CPU, with a few bits masked, whatever the table says; every other leaf answers as set.
 * Nor does the table gate what those bits offer there: a guest may set CR4.OSXSAVE and
 * XSETBV although the model has no XSAVE (so snapshots carry XCR0 all the same).
 * So the core runs the leaves a guest would ask in a probe VM and hashes the answers:
 * that hash, not the table's, is what a log must state and a replaying host must match.
 */
static const uint32_t seen_leaves[][2] = {
    { 0, 0 }, { 1, 0 }, { 2, 0 }, { 3, 0 }, { 4, 0 }, { 5, 0 }, { 6, 0 }, { 7, 0 }, { 7, 1 },
    { 0xd, 0 }, { 0xd, 1 }, { 0x40000000, 0 }, { 0x40000001, 0 }, { 0x80000000, 0 },
    { 0x80000001, 0 }, { 0x80000002, 0 }, { 0x80000003, 0 }, { 0x80000004, 0 },
    { 0x80000005, 0 }, { 0x80000006, 0 }, { 0x80000007, 0 }, { 0x80000008, 0 },
    { 0x80000009, 0 },   /* beyond the maximum: Intel's rule answers for it */
};
#define SEEN_NLEAVES (sizeof(seen_leaves) / sizeof(seen_leaves[0]))
#define SEEN_LIST 0x80
#define SEEN_OUT 0x200000

int kvmrr_cpu_seen(uint32_t *out, int max_words, uint64_t *hash, char *err, size_t err_len)
{
    static const uint8_t text[] = {
        0xbe, 0x80, 0x00, 0x10, 0x00,   /* 0:  mov esi, LOAD + SEEN_LIST */
        0xbf, 0x00, 0x00, 0x20, 0x00,   /* 5:  mov edi, SEEN_OUT */
        0x8b, 0x06,                     /* a:  mov eax, [rsi]: leaf */
        0x8b, 0x4e, 0x04,               /* c:  mov ecx, [rsi+4]: subleaf */
        0x83, 0xf8, 0xff,               /* f:  cmp eax, -1 */
        0x74, 0x17,                     /* 12: je 2b */
        0x0f, 0xa2,                     /* 14: cpuid */
        0x89, 0x07, 0x89, 0x5f, 0x04,   /* 16: mov [rdi], eax; mov [rdi+4], ebx */
        0x89, 0x4f, 0x08, 0x89, 0x57, 0x0c, /* 1b: mov [rdi+8], ecx; mov [rdi+12], edx */
        0x48, 0x83, 0xc6, 0x08,         /* 21: add rsi, 8 */
        0x48, 0x83, 0xc7, 0x10,         /* 25: add rdi, 16 */
        0xeb, 0xdf,                     /* 29: jmp a */
        0x31, 0xc0, 0xe6, 0xf4,         /* 2b: xor eax, eax; out 0xf4, al */
    };
    uint8_t code[SEEN_LIST + sizeof(seen_leaves) + 8];
    memset(code, 0, sizeof(code));
    memcpy(code, text, sizeof(text));
    memcpy(code + SEEN_LIST, seen_leaves, sizeof(seen_leaves));
    memset(code + SEEN_LIST + sizeof(seen_leaves), 0xff, 8);
    uint8_t elf[1024];
    size_t n = probe_elf_build(code, sizeof(code), elf, sizeof(elf));
    struct kvmrr_config cfg = { .mem_size = 4 << 20, .mode = KVMRR_MODE_RUN,
                                .counter = KVMRR_COUNTER_STEP };
    struct kvmrr_vm *vm = kvmrr_vm_create(&cfg, elf, n, "", err, err_len);
    if (!vm)
        return -1;
    struct kvmrr_limits lim = { .stop_icount = 100000, .deadline_ns = 0 };
    struct kvmrr_result res;
    kvmrr_vm_run(vm, &lim, &res);
    uint32_t seen[SEEN_NLEAVES][4];
    memcpy(seen, vm->mem + SEEN_OUT, sizeof(seen));
    kvmrr_vm_destroy(vm);
    if (res.stop != KVMRR_STOP_EXITED)
        return ERRF(err, err_len, "the CPUID probe did not finish: %s", res.message);
    if (hash)
        *hash = kvmrr_hash64((const uint8_t *)seen, sizeof(seen),
                             kvmrr_hash64((const uint8_t *)seen_leaves, sizeof(seen_leaves), 0));
    int words = (int)(SEEN_NLEAVES * 4);
    if (out)
        memcpy(out, seen, (size_t)(words < max_words ? words : max_words) * sizeof(uint32_t));
    return words;
}
