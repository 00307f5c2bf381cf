/*
 * snapshot_format.h - the layout of a snapshot blob (snapshot.c), shared with the tests
 * that forge blobs field by field.
 *
 *   header | vCPU state | core state | MSRs (header.nmsrs) | RAM | xxh64 of all before
 */
#ifndef KVMRR_SNAPSHOT_FORMAT_H
#define KVMRR_SNAPSHOT_FORMAT_H

#include "internal.h"

/* Unchanged since version 1, so an old blob is recognised and refused by its version. */
#define SNAP_MAGIC "KVMRRSN1"
#define SNAP_VERSION 3               /* 2: XCRs, TSC rate, all listed MSRs, core state, model;
                                        3: the machine and the PC devices in the core state */

struct snap_header {                 /* the first 40 bytes are laid out as in version 1 */
    char magic[8];
    uint32_t version;
    uint32_t header_size;
    uint64_t mem_size;
    int64_t icount;
    uint64_t total_size;
    uint32_t vcpu_size;              /* sizeof(struct snap_vcpu) */
    uint32_t core_size;              /* sizeof(struct snap_core) */
    uint32_t nmsrs;
    uint32_t tsc_khz;
    uint64_t cpu_model_hash;         /* a snapshot is only valid under the same CPUID */
};

struct snap_vcpu {
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    struct kvm_xsave xsave;
    struct kvm_vcpu_events events;
    struct kvm_debugregs debugregs;
    struct kvm_xcrs xcrs;
};

struct snap_core {
    uint32_t halted;
    uint32_t timer_pending;
    uint64_t frame_rflags_gpa;       /* 0, or the RFLAGS image of an undelivered injection */
    uint64_t delivery_tf;
    int64_t last_checksum;
    struct kvmrr_devices dev;
};

#define SNAP_FIXED (sizeof(struct snap_header) + sizeof(struct snap_vcpu) \
                    + sizeof(struct snap_core))

#endif
