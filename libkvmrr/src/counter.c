/*
 * counter.c - the exact instruction counter behind the `fast` backend.
 *
 * On hosts where KVM executes ring-0 guest code in its instruction emulator, the per-vCPU
 * binary statistic `insn_emulation` counts every guest instruction exactly
 * (docs/ARCHITECTURE.md §8).  icount = stat - stat_base; stat_base moves when a snapshot
 * is restored.  The `step` backend keeps vm->icount itself (run.c) and never reads this.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "internal.h"

int counter_open(struct kvmrr_vm *vm)
{
    vm->stats_fd = ioctl(vm->vcpu_fd, KVM_GET_STATS_FD, NULL);
    if (vm->stats_fd < 0)
        return -1;
    struct kvm_stats_header hdr;
    if (pread(vm->stats_fd, &hdr, sizeof(hdr), 0) != (ssize_t)sizeof(hdr))
        return -1;
    size_t desc_size = sizeof(struct kvm_stats_desc) + hdr.name_size;
    uint8_t *descs = malloc(desc_size * hdr.num_desc);
    if (!descs)
        return -1;
    ssize_t want = (ssize_t)(desc_size * hdr.num_desc);
    if (pread(vm->stats_fd, descs, want, hdr.desc_offset) != want) {
        free(descs);
        return -1;
    }
    for (uint32_t i = 0; i < hdr.num_desc; i++) {
        struct kvm_stats_desc *d = (struct kvm_stats_desc *)(descs + i * desc_size);
        if (strcmp(d->name, "insn_emulation") == 0 && d->size == 1) {
            vm->insn_stat_offset = hdr.data_offset + d->offset;
            break;
        }
    }
    free(descs);
    return vm->insn_stat_offset >= 0 ? 0 : -1;
}

int counter_read_stat(struct kvmrr_vm *vm, uint64_t *value)
{
    if (vm->insn_stat_offset < 0)
        return -1;
    return pread(vm->stats_fd, value, sizeof(*value), vm->insn_stat_offset) == sizeof(*value)
               ? 0 : -1;
}

int counter_sync(struct kvmrr_vm *vm)
{
    if (vm->cfg.counter != KVMRR_COUNTER_FAST)
        return 0;
    uint64_t v;
    if (counter_read_stat(vm, &v) < 0)
        return -1;
    vm->icount = (kvmrr_icount_t)(v - vm->stat_base);
    return 0;
}

void counter_rebase(struct kvmrr_vm *vm, kvmrr_icount_t icount)
{
    uint64_t v = 0;
    if (counter_read_stat(vm, &v) == 0)
        vm->stat_base = v - (uint64_t)icount;
    vm->icount = icount;
}
