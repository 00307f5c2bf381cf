/*
 * snapshot.c - the whole VM as one versioned blob (Firecracker's shape: magic, version,
 * state, checksum, and a size check before anything is read back).
 *
 *   header | vcpu state | device state | RAM | xxh64 of everything before
 *
 * Restoring puts the vCPU, devices and RAM back and re-bases the counter, so the icount
 * continues from the snapshot's.
 */
#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>

#include "internal.h"

#define SNAP_MAGIC "KVMRRSN1"
#define SNAP_VERSION 1
#define SNAP_NMSRS 10

static const uint32_t snap_msrs[SNAP_NMSRS] = {
    0x174, 0x175, 0x176,                      /* SYSENTER_CS/ESP/EIP */
    0xc0000081, 0xc0000082, 0xc0000083, 0xc0000084, /* STAR LSTAR CSTAR SFMASK */
    0xc0000102, 0xc0000103,                   /* KERNEL_GS_BASE TSC_AUX */
    0x277,                                    /* PAT */
};

struct snap_header {
    char magic[8];
    uint32_t version;
    uint32_t header_size;
    uint64_t mem_size;
    int64_t icount;
    uint64_t total_size;
};

struct snap_vcpu {
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    struct kvm_xsave xsave;
    struct kvm_vcpu_events events;
    struct kvm_debugregs debugregs;
    uint32_t nmsrs;
    uint32_t halted;
    struct kvm_msr_entry msrs[SNAP_NMSRS];
    struct kvmrr_devices dev;
};

size_t kvmrr_vm_snapshot_size(struct kvmrr_vm *vm)
{
    return sizeof(struct snap_header) + sizeof(struct snap_vcpu) + vm->cfg.mem_size + 8;
}

int kvmrr_vm_snapshot_save(struct kvmrr_vm *vm, uint8_t *buf, size_t cap, size_t *len)
{
    size_t need = kvmrr_vm_snapshot_size(vm);
    if (cap < need)
        return -1;
    memset(buf, 0, sizeof(struct snap_header) + sizeof(struct snap_vcpu));
    struct snap_header *h = (struct snap_header *)buf;
    struct snap_vcpu *c = (struct snap_vcpu *)(buf + sizeof(*h));
    memcpy(h->magic, SNAP_MAGIC, 8);
    h->version = SNAP_VERSION;
    h->header_size = sizeof(*h);
    h->mem_size = vm->cfg.mem_size;
    h->icount = vm->icount;
    h->total_size = need;
    struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry e[SNAP_NMSRS];
    } msrs;
    memset(&msrs, 0, sizeof(msrs));
    msrs.hdr.nmsrs = SNAP_NMSRS;
    for (int i = 0; i < SNAP_NMSRS; i++)
        msrs.e[i].index = snap_msrs[i];
    if (ioctl(vm->vcpu_fd, KVM_GET_REGS, &c->regs) < 0
        || ioctl(vm->vcpu_fd, KVM_GET_SREGS, &c->sregs) < 0
        || ioctl(vm->vcpu_fd, KVM_GET_XSAVE, &c->xsave) < 0
        || ioctl(vm->vcpu_fd, KVM_GET_VCPU_EVENTS, &c->events) < 0
        || ioctl(vm->vcpu_fd, KVM_GET_DEBUGREGS, &c->debugregs) < 0)
        return -1;
    int n = ioctl(vm->vcpu_fd, KVM_GET_MSRS, &msrs);
    if (n < 0)
        return -1;
    c->nmsrs = (uint32_t)n;   /* the MSRs this KVM knows, in list order */
    memcpy(c->msrs, msrs.e, sizeof(c->msrs));
    c->halted = vm->halted;
    c->dev = vm->dev;
    uint8_t *mem = buf + sizeof(*h) + sizeof(*c);
    memcpy(mem, vm->mem, vm->cfg.mem_size);
    uint64_t sum = kvmrr_hash64(buf, need - 8, 0);
    memcpy(buf + need - 8, &sum, 8);
    *len = need;
    return 0;
}

int kvmrr_vm_snapshot_restore(struct kvmrr_vm *vm, const uint8_t *buf, size_t len,
                              char *err, size_t err_len)
{
    const struct snap_header *h = (const struct snap_header *)buf;
    if (len < sizeof(*h) || memcmp(h->magic, SNAP_MAGIC, 8) != 0)
        return ERRF(err, err_len, "not a kvmrr snapshot (bad magic)");
    if (h->version != SNAP_VERSION || h->header_size != sizeof(*h))
        return ERRF(err, err_len, "snapshot version %u, this build reads %u", h->version,
                    SNAP_VERSION);
    if (h->mem_size != vm->cfg.mem_size)
        return ERRF(err, err_len, "snapshot of a %llu-byte VM, this VM has %llu bytes",
                    (unsigned long long)h->mem_size, (unsigned long long)vm->cfg.mem_size);
    size_t need = kvmrr_vm_snapshot_size(vm);
    if (h->total_size != need || len != need)
        return ERRF(err, err_len, "snapshot is %zu bytes, expected %zu (truncated?)", len, need);
    uint64_t sum;
    memcpy(&sum, buf + need - 8, 8);
    if (kvmrr_hash64(buf, need - 8, 0) != sum)
        return ERRF(err, err_len, "snapshot checksum mismatch (corrupt)");
    const struct snap_vcpu *c = (const struct snap_vcpu *)(buf + sizeof(*h));
    if (c->nmsrs > SNAP_NMSRS)
        return ERRF(err, err_len, "snapshot holds %u MSRs, at most %d", c->nmsrs, SNAP_NMSRS);
    struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry e[SNAP_NMSRS];
    } msrs;
    memset(&msrs, 0, sizeof(msrs));
    msrs.hdr.nmsrs = c->nmsrs;
    memcpy(msrs.e, c->msrs, sizeof(msrs.e));
    struct kvm_vcpu_events events = c->events;
    events.flags &= KVM_VCPUEVENT_VALID_SHADOW | KVM_VCPUEVENT_VALID_NMI_PENDING;
    if (ioctl(vm->vcpu_fd, KVM_SET_SREGS, &c->sregs) < 0
        || vm_set_regs(vm, &c->regs) < 0
        || ioctl(vm->vcpu_fd, KVM_SET_XSAVE, &c->xsave) < 0
        || ioctl(vm->vcpu_fd, KVM_SET_VCPU_EVENTS, &events) < 0
        || ioctl(vm->vcpu_fd, KVM_SET_DEBUGREGS, &c->debugregs) < 0
        || ioctl(vm->vcpu_fd, KVM_SET_MSRS, &msrs) != (int)c->nmsrs)
        return ERRF(err, err_len, "KVM refused the snapshot's vCPU state: %s", strerror(errno));
    memcpy(vm->mem, buf + sizeof(*h) + sizeof(*c), vm->cfg.mem_size);
    vm->dev = c->dev;
    vm->halted = c->halted;
    vm->timer_pending = false;
    vm->frame_rflags_gpa = 0;
    vm->bp_target = -1;             /* passes seen before are of another history */
    vm->bp_last_hit = -1;
    vm->bp_period = 0;
    vm->in_pending = vm->in_completing = false;
    vm->next_tick_ns = 0;
    queue_clear(&vm->replay);
    queue_clear(&vm->recorded);
    vm->last_event_icount = h->icount;
    vm->horizon = h->icount;
    vm->last_checksum = h->icount;
    counter_rebase(vm, h->icount);
    return 0;
}
