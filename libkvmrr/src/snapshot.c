/*
 * snapshot.c - the whole VM as one versioned blob (Firecracker's shape: magic, version,
 * sizes, state, checksum, and every field checked before anything is applied).
 *
 *   header | vCPU state | core state | MSRs (header.nmsrs) | RAM | xxh64 of all before
 *
 * The vCPU part is everything KVM holds for it: registers, segment and control state,
 * the FPU/SSE state (XSAVE), XCR0, pending and injected events, debug registers, the TSC
 * and every MSR KVM lists that reads and writes back (the rest are named by
 * kvmrr_vm_msrs_skipped).  The core part is what the run loop keeps beside KVM: the
 * devices, a halted guest, a tick waiting for injection, the frame of an interrupt
 * injected but not yet delivered.  So a snapshot taken between an injection and its
 * delivery resumes with the interrupt still on its way.
 *
 * A blob is input like any other: the checksum catches corruption, not forgery, so
 * restore validates every field it reads whatever the checksum says, and applies nothing
 * until all of it passed; if KVM still refuses part of the vCPU state, the vCPU is put
 * back as it was.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "internal.h"
#include "snapshot_format.h"

#define SNAP_MAX_MSRS 512
#define RFLAGS_TF (1ull << 8)

int snapshot_msrs_init(struct kvmrr_vm *vm, char *err, size_t err_len)
{
    struct kvm_msr_list probe = { .nmsrs = 0 };
    if (ioctl(vm->kvm_fd, KVM_GET_MSR_INDEX_LIST, &probe) < 0 && errno != E2BIG)
        return ERRF(err, err_len, "KVM_GET_MSR_INDEX_LIST: %s", strerror(errno));
    uint32_t n = probe.nmsrs;
    if (n > SNAP_MAX_MSRS)
        return ERRF(err, err_len, "KVM lists %u MSRs, a snapshot holds at most %d", n,
                    SNAP_MAX_MSRS);
    struct kvm_msr_list *list = calloc(1, sizeof(*list) + n * sizeof(uint32_t));
    vm->snap_msrs = calloc(n + 1, sizeof(uint32_t));
    vm->skipped_msrs = calloc(n + 1, sizeof(uint32_t));
    if (!list || !vm->snap_msrs || !vm->skipped_msrs) {
        free(list);
        return ERRF(err, err_len, "out of memory");
    }
    list->nmsrs = n;
    if (ioctl(vm->kvm_fd, KVM_GET_MSR_INDEX_LIST, list) < 0) {
        free(list);
        return ERRF(err, err_len, "KVM_GET_MSR_INDEX_LIST: %s", strerror(errno));
    }
    /* One at a time: KVM_GET/SET_MSRS stop at the first MSR they cannot handle.  An MSR
     * that reads but does not write back (a write-only acknowledgement register, say)
     * could not be restored either. */
    for (uint32_t i = 0; i < list->nmsrs; i++) {
        struct { struct kvm_msrs hdr; struct kvm_msr_entry e; } one;
        memset(&one, 0, sizeof(one));
        one.hdr.nmsrs = 1;
        one.e.index = list->indices[i];
        bool ok = ioctl(vm->vcpu_fd, KVM_GET_MSRS, &one) == 1
                  && ioctl(vm->vcpu_fd, KVM_SET_MSRS, &one) == 1;
        if (ok)
            vm->snap_msrs[vm->snap_nmsrs++] = list->indices[i];
        else
            vm->skipped_msrs[vm->skipped_nmsrs++] = list->indices[i];
    }
    free(list);
    return 0;
}

int kvmrr_vm_msrs_skipped(struct kvmrr_vm *vm, uint32_t *out, int max)
{
    int n = vm->skipped_nmsrs < max ? vm->skipped_nmsrs : max;
    if (n > 0)
        memcpy(out, vm->skipped_msrs, (size_t)n * sizeof(uint32_t));
    return vm->skipped_nmsrs;
}

size_t kvmrr_vm_snapshot_size(struct kvmrr_vm *vm)
{
    return SNAP_FIXED + (size_t)vm->snap_nmsrs * sizeof(struct kvm_msr_entry)
           + vm->cfg.mem_size + 8;
}

/* The MSRs go through a kvm_msrs header followed by the entries. */
static struct kvm_msrs *msrs_alloc(int n)
{
    struct kvm_msrs *m = calloc(1, sizeof(*m) + (size_t)n * sizeof(struct kvm_msr_entry));
    if (m)
        m->nmsrs = (uint32_t)n;
    return m;
}

static int vcpu_state_get(struct kvmrr_vm *vm, struct snap_vcpu *c, struct kvm_msr_entry *msrs)
{
    memset(c, 0, sizeof(*c));
    if (ioctl(vm->vcpu_fd, KVM_GET_REGS, &c->regs) < 0
        || ioctl(vm->vcpu_fd, KVM_GET_SREGS, &c->sregs) < 0
        || ioctl(vm->vcpu_fd, KVM_GET_XSAVE, &c->xsave) < 0
        || ioctl(vm->vcpu_fd, KVM_GET_VCPU_EVENTS, &c->events) < 0
        || ioctl(vm->vcpu_fd, KVM_GET_DEBUGREGS, &c->debugregs) < 0
        || ioctl(vm->vcpu_fd, KVM_GET_XCRS, &c->xcrs) < 0)
        return -1;
    struct kvm_msrs *m = msrs_alloc(vm->snap_nmsrs);
    if (!m)
        return -1;
    for (int i = 0; i < vm->snap_nmsrs; i++)
        m->entries[i].index = vm->snap_msrs[i];
    int got = ioctl(vm->vcpu_fd, KVM_GET_MSRS, m);
    if (got == vm->snap_nmsrs)
        memcpy(msrs, m->entries, (size_t)got * sizeof(*msrs));
    free(m);
    return got == vm->snap_nmsrs ? 0 : -1;
}

/* Which state KVM refused, for the error message; NULL when all of it went in. */
static const char *vcpu_state_set(struct kvmrr_vm *vm, const struct snap_vcpu *c,
                                  const struct kvm_msr_entry *msrs, uint32_t nmsrs)
{
    struct kvm_vcpu_events events = c->events;
    events.flags &= KVM_VCPUEVENT_VALID_SHADOW | KVM_VCPUEVENT_VALID_NMI_PENDING;
    if (ioctl(vm->vcpu_fd, KVM_SET_SREGS, &c->sregs) < 0)
        return "segment and control registers";
    if (vm_set_regs(vm, &c->regs) < 0)
        return "registers";
    if (ioctl(vm->vcpu_fd, KVM_SET_XSAVE, &c->xsave) < 0)
        return "FPU/XSAVE state";
    if (c->xcrs.nr_xcrs && ioctl(vm->vcpu_fd, KVM_SET_XCRS, &c->xcrs) < 0)
        return "XCR0";
    if (ioctl(vm->vcpu_fd, KVM_SET_DEBUGREGS, &c->debugregs) < 0)
        return "debug registers";
    struct kvm_msrs *m = msrs_alloc((int)nmsrs);
    if (!m)
        return "MSRs (out of memory)";
    memcpy(m->entries, msrs, nmsrs * sizeof(*msrs));
    int set = ioctl(vm->vcpu_fd, KVM_SET_MSRS, m);
    free(m);
    if (set != (int)nmsrs)
        return "MSRs";
    /* Events last: setting registers and MSRs must not clear an injection in flight. */
    if (ioctl(vm->vcpu_fd, KVM_SET_VCPU_EVENTS, &events) < 0)
        return "pending and injected events";
    return NULL;
}

int kvmrr_vm_snapshot_save(struct kvmrr_vm *vm, uint8_t *buf, size_t cap, size_t *len)
{
    size_t need = kvmrr_vm_snapshot_size(vm);
    if (cap < need)
        return -1;
    memset(buf, 0, SNAP_FIXED);
    struct snap_header *h = (struct snap_header *)buf;
    struct snap_vcpu *c = (struct snap_vcpu *)(buf + sizeof(*h));
    struct snap_core *core = (struct snap_core *)(buf + sizeof(*h) + sizeof(*c));
    struct kvm_msr_entry *msrs = (struct kvm_msr_entry *)(buf + SNAP_FIXED);
    memcpy(h->magic, SNAP_MAGIC, 8);
    h->version = SNAP_VERSION;
    h->header_size = sizeof(*h);
    h->mem_size = vm->cfg.mem_size;
    h->icount = vm->icount;
    h->total_size = need;
    h->vcpu_size = sizeof(*c);
    h->core_size = sizeof(*core);
    h->nmsrs = (uint32_t)vm->snap_nmsrs;
    h->cpu_model_hash = vm->cpu_model_hash;
    int khz = ioctl(vm->vcpu_fd, KVM_GET_TSC_KHZ, 0);
    h->tsc_khz = khz > 0 ? (uint32_t)khz : 0;
    if (vcpu_state_get(vm, c, msrs) < 0)
        return -1;
    core->halted = vm->halted;
    core->timer_pending = vm->timer_pending;
    core->frame_rflags_gpa = vm->frame_rflags_gpa;
    core->delivery_tf = vm->delivery_tf;
    core->last_checksum = vm->last_checksum;
    core->dev = vm->dev;
    uint8_t *mem = buf + need - 8 - vm->cfg.mem_size;
    memcpy(mem, vm->mem, vm->cfg.mem_size);
    uint64_t sum = kvmrr_hash64(buf, need - 8, 0);
    memcpy(buf + need - 8, &sum, 8);
    *len = need;
    return 0;
}

static bool msr_listed(const struct kvmrr_vm *vm, uint32_t index)
{
    for (int i = 0; i < vm->snap_nmsrs; i++)
        if (vm->snap_msrs[i] == index)
            return true;
    return false;
}

/* Everything in the blob that the core itself interprets, before any of it is used. */
static int snapshot_validate(struct kvmrr_vm *vm, const uint8_t *buf, size_t len,
                             char *err, size_t err_len)
{
    const struct snap_header *h = (const struct snap_header *)buf;
    if (len < 16 || memcmp(h->magic, SNAP_MAGIC, 8) != 0)
        return ERRF(err, err_len, "not a kvmrr snapshot (bad magic)");
    if (h->version != SNAP_VERSION)
        return ERRF(err, err_len, "snapshot format version %u, this build reads version %d "
                    "only (%s)", h->version, SNAP_VERSION,
                    h->version < SNAP_VERSION ? "older" : "newer");
    if (len < sizeof(*h) || h->header_size != sizeof(*h) || h->vcpu_size != sizeof(struct snap_vcpu)
        || h->core_size != sizeof(struct snap_core))
        return ERRF(err, err_len, "snapshot section sizes do not match version %d "
                    "(truncated or corrupt)", SNAP_VERSION);
    if (h->mem_size != vm->cfg.mem_size)
        return ERRF(err, err_len, "snapshot of a %llu-byte VM, this VM has %llu bytes",
                    (unsigned long long)h->mem_size, (unsigned long long)vm->cfg.mem_size);
    if (h->nmsrs > SNAP_MAX_MSRS)
        return ERRF(err, err_len, "snapshot holds %u MSRs, at most %d", h->nmsrs, SNAP_MAX_MSRS);
    size_t need = SNAP_FIXED + (size_t)h->nmsrs * sizeof(struct kvm_msr_entry)
                  + vm->cfg.mem_size + 8;
    if (h->total_size != need || len != need)
        return ERRF(err, err_len, "snapshot is %zu bytes, its header says %llu, expected %zu "
                    "(truncated?)", len, (unsigned long long)h->total_size, need);
    uint64_t sum;
    memcpy(&sum, buf + need - 8, 8);
    if (kvmrr_hash64(buf, need - 8, 0) != sum)
        return ERRF(err, err_len, "snapshot checksum mismatch (corrupt)");
    if (h->cpu_model_hash != vm->cpu_model_hash)
        return ERRF(err, err_len, "snapshot taken under CPU model %016llx, this VM runs "
                    "%016llx", (unsigned long long)h->cpu_model_hash,
                    (unsigned long long)vm->cpu_model_hash);
    if (h->icount < 0)
        return ERRF(err, err_len, "snapshot at negative icount %lld", (long long)h->icount);

    const struct snap_vcpu *c = (const struct snap_vcpu *)(buf + sizeof(*h));
    const struct kvm_vcpu_events *ev = &c->events;
    if (ev->exception.nr >= 32 || ev->exception.injected > 1 || ev->exception.pending > 1
        || ev->exception.has_error_code > 1 || ev->interrupt.injected > 1
        || ev->interrupt.soft > 1 || ev->interrupt.shadow > 3 || ev->nmi.injected > 1
        || ev->nmi.pending > 1 || ev->nmi.masked > 1)
        return ERRF(err, err_len, "snapshot's pending events are malformed");
    if (c->xcrs.nr_xcrs > KVM_MAX_XCRS || c->xcrs.flags)
        return ERRF(err, err_len, "snapshot holds %u XCRs, at most %d", c->xcrs.nr_xcrs,
                    KVM_MAX_XCRS);
    if (c->debugregs.flags)
        return ERRF(err, err_len, "snapshot's debug registers carry unknown flags");

    const struct snap_core *core = (const struct snap_core *)(buf + sizeof(*h) + sizeof(*c));
    if (core->halted > 1 || core->timer_pending > 1)
        return ERRF(err, err_len, "snapshot's core flags are malformed");
    if (core->frame_rflags_gpa && (core->frame_rflags_gpa > vm->cfg.mem_size - 8
                                   || !(ev->interrupt.injected)))
        return ERRF(err, err_len, "snapshot's interrupt frame at 0x%llx is outside RAM or "
                    "has no injection", (unsigned long long)core->frame_rflags_gpa);
    if (core->delivery_tf & ~RFLAGS_TF)
        return ERRF(err, err_len, "snapshot's delivery flags are malformed");
    if (core->last_checksum < 0 || core->last_checksum > h->icount)
        return ERRF(err, err_len, "snapshot's last checksum icount %lld lies outside 0..%lld",
                    (long long)core->last_checksum, (long long)h->icount);
    if (devices_validate(&core->dev, vm->cfg.mem_size, err, err_len) < 0)
        return -1;

    const struct kvm_msr_entry *msrs = (const struct kvm_msr_entry *)(buf + SNAP_FIXED);
    for (uint32_t i = 0; i < h->nmsrs; i++) {
        if (msrs[i].reserved)
            return ERRF(err, err_len, "snapshot's MSR entry %u is malformed", i);
        if (!msr_listed(vm, msrs[i].index))
            return ERRF(err, err_len, "snapshot sets MSR 0x%x, which this host's KVM does not "
                        "save and restore", msrs[i].index);
    }
    return 0;
}

int kvmrr_vm_snapshot_restore(struct kvmrr_vm *vm, const uint8_t *buf, size_t len,
                              char *err, size_t err_len)
{
    if (!buf)
        return ERRF(err, err_len, "no snapshot");
    if (snapshot_validate(vm, buf, len, err, err_len) < 0)
        return -1;
    const struct snap_header *h = (const struct snap_header *)buf;
    const struct snap_vcpu *c = (const struct snap_vcpu *)(buf + sizeof(*h));
    const struct snap_core *core = (const struct snap_core *)(buf + sizeof(*h) + sizeof(*c));
    const struct kvm_msr_entry *msrs = (const struct kvm_msr_entry *)(buf + SNAP_FIXED);

    /* The TSC rate is the one part a host may be unable to match; try before touching
     * anything else. */
    int khz = ioctl(vm->vcpu_fd, KVM_GET_TSC_KHZ, 0);
    if (h->tsc_khz && khz > 0 && (uint32_t)khz != h->tsc_khz
        && ioctl(vm->vcpu_fd, KVM_SET_TSC_KHZ, (unsigned long)h->tsc_khz) < 0)
        return ERRF(err, err_len, "snapshot's TSC runs at %u kHz, this host's at %d kHz and "
                    "KVM cannot scale it", h->tsc_khz, khz);

    struct snap_vcpu *before = malloc(sizeof(*before));
    struct kvm_msr_entry *before_msrs = calloc((size_t)vm->snap_nmsrs + 1, sizeof(*before_msrs));
    if (!before || !before_msrs || vcpu_state_get(vm, before, before_msrs) < 0) {
        free(before);
        free(before_msrs);
        return ERRF(err, err_len, "cannot read the vCPU state to restore over: %s",
                    strerror(errno));
    }
    const char *refused = vcpu_state_set(vm, c, msrs, h->nmsrs);
    if (refused) {
        int saved = errno;
        (void)vcpu_state_set(vm, before, before_msrs, (uint32_t)vm->snap_nmsrs);
        free(before);
        free(before_msrs);
        return ERRF(err, err_len, "KVM refused the snapshot's %s: %s", refused,
                    strerror(saved));
    }
    free(before);
    free(before_msrs);

    memcpy(vm->mem, buf + len - 8 - vm->cfg.mem_size, vm->cfg.mem_size);
    vm->dev = core->dev;
    vm->halted = core->halted;
    vm->timer_pending = core->timer_pending;
    vm->frame_rflags_gpa = core->frame_rflags_gpa;
    vm->delivery_tf = core->delivery_tf;
    vm->last_checksum = core->last_checksum;
    vm->bp_target = -1;             /* passes seen before are of another history */
    vm->bp_last_hit = -1;
    vm->bp_period = 0;
    vm->in_pending = vm->in_completing = false;
    vm->next_tick_ns = 0;
    queue_clear(&vm->replay);
    queue_clear(&vm->recorded);
    vm->last_event_icount = h->icount;
    vm->horizon = h->icount;
    counter_rebase(vm, h->icount);
    return 0;
}
