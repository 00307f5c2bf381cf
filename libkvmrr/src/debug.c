/*
 * debug.c - what a debugger needs from the core, outside the run loop: the segment and
 * control registers, guest memory by virtual address (through the guest's own page
 * tables, paging.c), and a stepping loop that stops at code breakpoints and on writes
 * to watched memory.
 *
 * Nothing here writes to the guest: a breakpoint is a stop when RIP reaches its
 * address, a watchpoint a comparison of the watched bytes after every instruction.
 * The stepping loop moves the replay one instruction at a time through the public exact
 * stop (kvmrr_vm_run with stop_icount = icount + 1), so it uses the run loop exactly as
 * any other caller does.  With only code breakpoints, at most KVMRR_USER_BP_MAX of them,
 * on `fast` where hardware breakpoints work, the loop instead steps once (off the
 * breakpoint it may stand on) and then lets the replay run free with them armed as
 * hardware breakpoints (run.c, user_break_debug): the same stops, found at full speed
 * (docs/debugging.md, "Speed").  KVMRR_GDB_STEP=1 in the environment keeps the stepping
 * loop (for comparisons: make bench-gdb measures both).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

#include "internal.h"

int kvmrr_vm_get_sregs(struct kvmrr_vm *vm, struct kvmrr_sregs *out)
{
    struct kvm_sregs s;
    if (ioctl(vm->vcpu_fd, KVM_GET_SREGS, &s) < 0)
        return -1;
    memset(out, 0, sizeof(*out));
    out->cs = s.cs.selector;
    out->ss = s.ss.selector;
    out->ds = s.ds.selector;
    out->es = s.es.selector;
    out->fs = s.fs.selector;
    out->gs = s.gs.selector;
    out->fs_base = s.fs.base;
    out->gs_base = s.gs.base;
    out->cr0 = s.cr0;
    out->cr2 = s.cr2;
    out->cr3 = s.cr3;
    out->cr4 = s.cr4;
    out->cr8 = s.cr8;
    out->efer = s.efer;
    return 0;
}

/* Bytes readable from gva on, up to len: stops at the first unmapped page. */
static size_t read_virt(struct kvmrr_vm *vm, const struct kvm_sregs *s, uint64_t gva,
                        uint8_t *buf, size_t len)
{
    size_t done = 0;
    while (done < len) {
        size_t chunk = 0x1000 - ((gva + done) & 0xfff);
        if (chunk > len - done)
            chunk = len - done;
        if (guest_read(vm, s, gva + done, buf + done, chunk) < 0)
            break;
        done += chunk;
    }
    return done;
}

int64_t kvmrr_vm_read_virt(struct kvmrr_vm *vm, uint64_t gva, uint8_t *buf, size_t len)
{
    struct kvm_sregs s;
    if (len > KVMRR_DEBUG_READ_MAX)
        return -1;
    if (ioctl(vm->vcpu_fd, KVM_GET_SREGS, &s) < 0)
        return -1;
    return (int64_t)read_virt(vm, &s, gva, buf, len);
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The watched bytes now; an unmapped one reads as the marker value so that a mapping
 * appearing or disappearing also counts as a change. */
static void watch_read(struct kvmrr_vm *vm, const struct kvm_sregs *s,
                       const struct kvmrr_debug_stops *st, int i, uint8_t out[8])
{
    memset(out, 0, 8);
    uint32_t len = st->watch_len[i] > 8 ? 8 : st->watch_len[i];
    if (read_virt(vm, s, st->watch_addr[i], out, len) < len)
        memset(out, 0xa5, 8);
}

static bool stepping_forced(void)
{
    const char *v = getenv("KVMRR_GDB_STEP");
    return v && *v && strcmp(v, "0") != 0;
}

/* Which breakpoint RIP stands on: its index, -1 none, -2 KVM failed. */
static int break_at(struct kvmrr_vm *vm, const struct kvmrr_debug_stops *stops)
{
    struct kvm_regs regs;
    if (vm_get_regs(vm, &regs) < 0)
        return -2;
    for (int i = 0; i < stops->nbreak; i++)
        if (stops->breaks[i] == regs.rip)
            return i;
    return -1;
}

static void run_stop(struct kvmrr_debug_result *res, const struct kvmrr_result *r)
{
    res->why = KVMRR_DEBUG_RUN_STOP;
    res->run_stop = r->stop;
    res->exit_code = r->exit_code;
    memcpy(res->message, r->message, sizeof(res->message));
}

/* The free-running form of the stepping loop below, for code breakpoints only: 1 when
 * it ran (res filled in), 0 when these stops need the stepping loop. */
static int debug_run_free(struct kvmrr_vm *vm, const struct kvmrr_debug_stops *stops,
                          kvmrr_icount_t stop_icount, int64_t deadline_ns,
                          struct kvmrr_debug_result *res)
{
    int nb = stops->nbreak;
    if (stops->nwatch || nb == 0 || nb > KVMRR_USER_BP_MAX || vm->cfg.mode != KVMRR_MODE_REPLAY
        || vm->cfg.counter != KVMRR_COUNTER_FAST || stepping_forced() || !hwbp_usable())
        return 0;
    kvmrr_icount_t start = vm->icount;
    struct kvmrr_limits lim;
    struct kvmrr_result r;
    int hit = -1;
    for (;;) {
        if (stop_icount >= 0 && vm->icount >= stop_icount) {
            res->why = KVMRR_DEBUG_ICOUNT;
            break;
        }
        /* One exact step first, as the stepping loop: the vCPU may stand on a
         * breakpoint (the last stop), which armed would stop it again where it is. */
        kvmrr_icount_t was = vm->icount;
        lim.stop_icount = was + 1;
        lim.deadline_ns = 0;
        vm->user_bp_n = 0;
        vm->user_bp_hit = false;
        kvmrr_vm_run(vm, &lim, &r);
        if (r.stop != KVMRR_STOP_ICOUNT || vm->icount != was + 1) {
            run_stop(res, &r);
            if (r.stop == KVMRR_STOP_ICOUNT)
                snprintf(res->message, sizeof(res->message), "the exact stop moved from "
                         "icount %lld to %lld", (long long)was, (long long)vm->icount);
            break;
        }
        if ((hit = break_at(vm, stops)) != -1
            || (stop_icount >= 0 && vm->icount >= stop_icount))
            goto stopped;
        /* Then free, to the next breakpoint reached, stop_icount or the deadline. */
        memcpy(vm->user_bp, stops->breaks, (size_t)nb * sizeof(uint64_t));
        vm->user_bp_n = nb;
        lim.stop_icount = stop_icount;
        lim.deadline_ns = deadline_ns;
        kvmrr_vm_run(vm, &lim, &r);
        vm->user_bp_n = 0;
        vm->user_bp_hit = false;
        if (r.stop == STOP_USER_BREAK) {
            if ((hit = break_at(vm, stops)) == -1) {
                res->why = KVMRR_DEBUG_ERROR;
                snprintf(res->message, sizeof(res->message), "the run stopped for a "
                         "breakpoint at icount %lld, not at one", (long long)vm->icount);
                break;
            }
            goto stopped;
        }
        if (r.stop == KVMRR_STOP_ICOUNT)
            continue;                        /* the top says so */
        if (r.stop == KVMRR_STOP_DEADLINE) {
            res->why = KVMRR_DEBUG_DEADLINE;
            break;
        }
        run_stop(res, &r);
        break;
stopped:
        if (hit == -2) {
            res->why = KVMRR_DEBUG_ERROR;
            snprintf(res->message, sizeof(res->message), "KVM refused to show the vCPU: %s",
                     strerror(errno));
        } else if (hit >= 0) {
            res->why = KVMRR_DEBUG_BREAK;
            res->index = hit;
            res->address = stops->breaks[hit];
        } else {
            res->why = KVMRR_DEBUG_ICOUNT;
        }
        break;
    }
    res->icount = vm->icount;
    res->steps = vm->icount - start;
    return 1;
}

int kvmrr_vm_debug_run(struct kvmrr_vm *vm, const struct kvmrr_debug_stops *stops,
                       kvmrr_icount_t stop_icount, int64_t deadline_ns,
                       struct kvmrr_debug_result *res)
{
    memset(res, 0, sizeof(*res));
    res->index = -1;
    int nb = stops->nbreak, nw = stops->nwatch;
    if (nb < 0 || nb > KVMRR_DEBUG_MAX_BREAK || nw < 0 || nw > KVMRR_DEBUG_MAX_WATCH) {
        res->why = KVMRR_DEBUG_ERROR;
        snprintf(res->message, sizeof(res->message), "too many breakpoints or watchpoints");
        return -1;
    }
    if (debug_run_free(vm, stops, stop_icount, deadline_ns, res))
        return res->why == KVMRR_DEBUG_ERROR ? -1 : 0;
    int64_t steps = 0;
    struct kvm_sregs s;
    uint8_t before[KVMRR_DEBUG_MAX_WATCH][8];
    if (nw) {
        if (ioctl(vm->vcpu_fd, KVM_GET_SREGS, &s) < 0)
            goto kvm_failed;
        for (int i = 0; i < nw; i++)
            watch_read(vm, &s, stops, i, before[i]);
    }
    struct kvmrr_limits lim;
    struct kvmrr_result r;
    for (;;) {
        if (stop_icount >= 0 && vm->icount >= stop_icount) {
            res->why = KVMRR_DEBUG_ICOUNT;
            break;
        }
        /* The clock is read every 256 instructions: a deadline, not a hard limit. */
        if (deadline_ns && (steps & 255) == 0 && steps && now_ns() >= deadline_ns) {
            res->why = KVMRR_DEBUG_DEADLINE;
            break;
        }
        lim.stop_icount = vm->icount + 1;
        lim.deadline_ns = 0;
        kvmrr_icount_t was = vm->icount;
        kvmrr_vm_run(vm, &lim, &r);
        steps++;
        if (r.stop != KVMRR_STOP_ICOUNT || vm->icount != was + 1) {
            /* Anything but one more instruction: the caller acts on it (feed more
             * events, take recorded output, report an exit or a divergence). */
            res->why = KVMRR_DEBUG_RUN_STOP;
            res->run_stop = r.stop;
            res->exit_code = r.exit_code;
            memcpy(res->message, r.message, sizeof(res->message));
            if (r.stop == KVMRR_STOP_ICOUNT)      /* cannot happen: say so if it does */
                snprintf(res->message, sizeof(res->message),
                         "the exact stop moved from icount %lld to %lld",
                         (long long)was, (long long)vm->icount);
            break;
        }
        if (nb) {
            struct kvm_regs regs;
            if (vm_get_regs(vm, &regs) < 0)
                goto kvm_failed;
            int hit = -1;
            for (int i = 0; i < nb; i++)
                if (stops->breaks[i] == regs.rip) {
                    hit = i;
                    break;
                }
            if (hit >= 0) {
                res->why = KVMRR_DEBUG_BREAK;
                res->index = hit;
                res->address = regs.rip;
                break;
            }
        }
        if (nw) {
            if (ioctl(vm->vcpu_fd, KVM_GET_SREGS, &s) < 0)
                goto kvm_failed;
            int hit = -1;
            for (int i = 0; i < nw && hit < 0; i++) {
                uint8_t now[8];
                watch_read(vm, &s, stops, i, now);
                if (memcmp(now, before[i], 8) != 0)
                    hit = i;
            }
            if (hit >= 0) {
                res->why = KVMRR_DEBUG_WATCH;
                res->index = hit;
                res->address = stops->watch_addr[hit];
                break;
            }
        }
        if (vm->recorded.count >= KVMRR_RECORD_CAP / 2) {
            res->why = KVMRR_DEBUG_RUN_STOP;    /* let the caller take the output */
            res->run_stop = KVMRR_STOP_EVENTS_FULL;
            break;
        }
    }
    res->icount = vm->icount;
    res->steps = steps;
    return 0;

kvm_failed:
    res->why = KVMRR_DEBUG_ERROR;
    res->icount = vm->icount;
    res->steps = steps;
    snprintf(res->message, sizeof(res->message), "KVM refused to show the vCPU: %s",
             strerror(errno));
    return -1;
}
