"""make bench-core -> bench/core.json: instructions/s plain, recorded and replayed with each
counter, log bytes per event, snapshot size and time, state-hash throughput, ticks at a
1 kHz timer (replay/record, three trials), and the torture guests' ratios."""

from __future__ import annotations

import platform
import statistics
import time

from libkvmrr import Machine, best_counter, hash64
from kvmrr_log.guest_images import load_guest
from kvmrr_log.paths import REPO
from recorder.session import RecordSession
from replayer.session import replay_records
from schemas import encode_message


class MemorySink:
    def __init__(self):
        self.records = []
        self.encoded_bytes = 0

    def write(self, record):
        self.records.append(record)
        value, _ = encode_message(record)
        if record["kind"] == "EventBatch":
            self.encoded_bytes += len(value)

    def commit(self):
        pass


def per_second(n, seconds):
    return round(n / seconds) if seconds > 0 else None


def ticks_1khz(guest, n: int) -> dict:
    """Replay/record of ticks at a 1 kHz timer, where a replay stops exactly at about one
    event per thousand instructions (docs/ARCHITECTURE.md §2.3).  Wall time swings with
    the machine's load; the process's CPU time is given beside it."""
    sink = MemorySink()
    c0 = time.process_time()
    rec = RecordSession(guest, sink, counter="fast", vm_id="bench", bootargs="timer_hz=1000",
                        max_instructions=n, checksum_every=1_000_000).run()
    rec_cpu = time.process_time() - c0
    t, c0 = time.monotonic(), time.process_time()
    rep = replay_records(sink.records[0], sink.records[1:], counter="fast")
    rep_s, rep_cpu = time.monotonic() - t, time.process_time() - c0
    assert rep.state_hash == rec.state_hash
    events = rec.events_by_kind.get("Interrupt", 0)
    return {"interrupts": events,
            "replay_over_record_wall": round(rec.seconds / rep_s, 3),
            "replay_over_record_cpu": round(rec_cpu / rep_cpu, 3),
            "replay_exits_per_interrupt": round(rep.stats.get("exits", 0) / max(events, 1), 1),
            "replay_exits": {k: rep.stats.get(k) for k in ("exits", "kicks", "steps",
                                                              "breakpoints")}}


# The torture guests a fast recording can hold (timeinsn reads RDTSC, which `fast` refuses
# on this host: it is recorded with step; ring3 and triple are refused by design).
TORTURE = ("exceptions", "repstr", "shadows", "smc", "higherhalf", "xsave", "timeinsn")


def torture_ratios(n: int) -> dict:
    """Each torture guest at a 1 kHz timer over n instructions: record/plain and
    replay/record (both by wall time, in one run), with the counter it can be recorded
    with here."""
    out = {}
    for name in TORTURE:
        guest = load_guest(str(REPO / "build" / "guests" / "torture" / f"{name}.elf"))
        counter = "step" if name == "timeinsn" else "fast"
        count = n // 10 if counter == "step" else n
        args = dict(counter=counter, vm_id="bench", bootargs="timer_hz=1000 iters=1000000",
                    max_instructions=count)
        plain = RecordSession(guest, MemorySink(), mode="run", **args).run()
        sink = MemorySink()
        rec = RecordSession(guest, sink, checksum_every=1_000_000, **args).run()
        t = time.monotonic()
        rep = replay_records(sink.records[0], sink.records[1:], counter=counter, guest=guest)
        rep_s = time.monotonic() - t
        assert rep.state_hash == rec.state_hash, name
        out[name] = {"counter": counter, "instructions": count, "events": rec.events,
                     "record_over_plain": round(plain.seconds / rec.seconds, 3),
                     "replay_over_record": round(rec.seconds / rep_s, 3)}
    return out


def bench_core(quick: bool) -> dict:
    n = 300_000 if quick else 1_500_000
    n_step = n // 3
    bootargs = "timer_hz=100"
    guest = load_guest("ticks")
    counter, why = best_counter()
    out = {"machine": platform.node(), "guest": "ticks", "bootargs": bootargs,
           "counter_calibration": why, "instructions": n, "instructions_step": n_step,
           "note": "ring-0 guest code runs under KVM's instruction emulator on this host"}

    def record(mode, count):
        sink = MemorySink()
        r = RecordSession(guest, sink, counter=mode, vm_id="bench", bootargs=bootargs,
                          max_instructions=count, checksum_every=1_000_000).run()
        return r, sink

    plain = RecordSession(guest, MemorySink(), counter=counter, vm_id="bench",
                          bootargs=bootargs, max_instructions=n, mode="run").run()
    rec_fast, sink_fast = record("fast", n)
    rec_step, sink_step = record("step", n_step)
    t = time.monotonic()
    rep_fast = replay_records(sink_fast.records[0], sink_fast.records[1:], counter="fast")
    rep_fast_s = time.monotonic() - t
    t = time.monotonic()
    rep_step = replay_records(sink_step.records[0], sink_step.records[1:], counter="step")
    rep_step_s = time.monotonic() - t
    assert rep_fast.state_hash == rec_fast.state_hash
    assert rep_step.state_hash == rec_step.state_hash
    rates = {
        "plain_run": per_second(plain.instructions, plain.seconds),
        "record_fast": per_second(rec_fast.instructions, rec_fast.seconds),
        "record_step": per_second(rec_step.instructions, rec_step.seconds),
        "replay_fast": per_second(rep_fast.icount, rep_fast_s),
        "replay_step": per_second(rep_step.icount, rep_step_s),
    }
    out["instructions_per_second"] = rates
    # how the fast replay reached its exact stops: single-steps, breakpoint stops, kicks
    out["replay_fast_exits"] = {k: rep_fast.stats.get(k) for k in ("exits", "kicks", "steps",
                                                                     "breakpoints")}
    out["ratios"] = {
        "record_fast_over_plain": round(rates["record_fast"] / rates["plain_run"], 3),
        "replay_fast_over_record_fast": round(rates["replay_fast"] / rates["record_fast"], 3),
        "replay_step_over_record_step": round(rates["replay_step"] / rates["record_step"], 3),
    }
    # three trials (the machine is shared): each its own record and replay
    trials = [ticks_1khz(guest, n) for _ in range(1 if quick else 3)]
    out["ticks_1khz"] = {"trials": trials, "replay_over_record_wall_median": statistics.median(
        t["replay_over_record_wall"] for t in trials)}
    out["torture_1khz"] = torture_ratios(n // 5)
    events = rec_fast.events
    out["log"] = {"events": events, "events_by_kind": rec_fast.events_by_kind,
                  "encoded_batch_bytes": sink_fast.encoded_bytes,
                  "bytes_per_event": round(sink_fast.encoded_bytes / max(events, 1), 2)}
    # interrupt events alone, as a batch of the log's own Interrupts
    ints = [e for r in sink_fast.records if r["kind"] == "EventBatch" for e in r["events"]
            if e["kind"] == "Interrupt"]
    if ints:
        value, _ = encode_message({"kind": "EventBatch", "first_seq": 0, "events": ints})
        out["log"]["bytes_per_interrupt_event"] = round(len(value) / len(ints), 2)
    m = Machine(guest.elf, mode="run", counter=counter, bootargs=bootargs)
    m.run(stop_icount=100_000)
    t = time.monotonic()
    blob = m.snapshot()
    save_s = time.monotonic() - t
    t = time.monotonic()
    m.restore(blob)
    restore_s = time.monotonic() - t
    out["snapshot"] = {"bytes": len(blob), "save_ms": round(save_s * 1e3, 2),
                       "restore_ms": round(restore_s * 1e3, 2)}
    data = bytes(64 << 20)
    t = time.monotonic()
    hash64(data)
    out["state_hash_mb_per_s"] = round(64 / (time.monotonic() - t))
    out["floors"] = {
        "record_fast_over_plain>=0.8": out["ratios"]["record_fast_over_plain"] >= 0.8,
        "replay_fast_over_record_fast>=0.5": out["ratios"]["replay_fast_over_record_fast"] >= 0.5,
        "bytes_per_interrupt<=16": out["log"].get("bytes_per_interrupt_event", 99) <= 16,
        "ticks_1khz_replay_over_record>=0.8":
            out["ticks_1khz"]["replay_over_record_wall_median"] >= 0.8,
    }
    return out


