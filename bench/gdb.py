"""make bench-gdb -> bench/gdb.json: time-travel latency (docs/debugging.md).

Records kvstore under the built-in load for `instructions` (10 M; --quick 1 M), then
drives the time-travel session (replayer.gdbstub.Timeline, what `replay --gdb` serves)
directly, without gdb's round trips:

- one forward pass over the whole log at the smallest snapshot interval (its rate, the
  time spent snapshotting, the memory the snapshots hold, distinct pages stored once);
- for each interval N (the larger ones keep only the snapshots at multiples of N, as a
  session with that interval would have taken): reverse-stepi latency at seeded random
  points, and reverse-continue latency to a breakpoint on clock_ns (called by every PUT)
  from the same points;
- at the chosen interval, one reverse-continue to a watched write (kvstore's entries[0]
  version) from the end of the log;
- `continue` with code breakpoints, free (hardware breakpoints, debug.c) against the
  stepping loop (KVMRR_GDB_STEP=1), in the same run: the rate with a breakpoint never
  reached, and the latency to the next clock_ns from the same points;
- with the Linux guest built (make linux-guest): a boot of LINUX_BUDGET instructions
  (recorded with step), `continue` from its start to a breakpoint on LINUX_BREAK at the
  default snapshot interval, free and stepping.
"""
from __future__ import annotations

import contextlib
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

from libkvmrr import best_counter
from kvmrr_log.paths import REPO
from replayer.gdbstub import Timeline, load_log

INTERVALS = [10_000, 25_000, 100_000]
POINTS = 5
LINUX_BUDGET = 300_000
LINUX_BREAK = "tsc_early_init"       # about 240 k instructions into the boot


def _symbol(elf: Path, name: str) -> int:
    out = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == name:
            return int(parts[0], 16)
    raise KeyError(name)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _summary(values: list[float]) -> dict:
    v = sorted(values)
    return {"median_ms": _ms(v[len(v) // 2]), "max_ms": _ms(v[-1]),
            "all_ms": [_ms(x) for x in values]}


class _Stepping:
    """KVMRR_GDB_STEP=1 for the block: debug.c's stepping loop instead of the free run."""

    def __enter__(self):
        os.environ["KVMRR_GDB_STEP"] = "1"

    def __exit__(self, *exc):
        os.environ.pop("KVMRR_GDB_STEP", None)


def _continue_rate(tl: Timeline, never: int, n: int) -> int:
    t0 = time.monotonic()
    r = tl.machine.debug_run([never], [], stop_icount=tl.icount + n)
    assert r.why == "icount", r
    return round(r.steps / (time.monotonic() - t0))


def _bench_continue(tl: Timeline, points: list[int], clock_ns: int, never: int) -> dict:
    out = {}
    for mode in ("free", "stepping"):
        with _Stepping() if mode == "stepping" else contextlib.nullcontext():
            tl.goto(tl.end // 2)
            rate = _continue_rate(tl, never, 20_000 if mode == "stepping" else 200_000)
            lat, ahead, back_lat, back = [], [], [], []
            for p in points:
                tl.goto(p)
                t0 = time.monotonic()
                s = tl.cont([clock_ns], [])
                lat.append(time.monotonic() - t0)
                ahead.append(s.icount - p)
                tl.goto(p)
                t0 = time.monotonic()
                s = tl.reverse_cont([clock_ns], [])
                back_lat.append(time.monotonic() - t0)
                back.append(p - s.icount)
        out[mode] = {"instructions_per_second": rate,
                     "to_breakpoint": _summary(lat), "instructions_ahead": ahead,
                     "reverse_continue_breakpoint": _summary(back_lat),
                     "instructions_back": back}
    for key in ("instructions_ahead", "instructions_back"):
        assert out["free"][key] == out["stepping"][key], out
    return out


def _bench_linux() -> dict | None:
    """`continue` to LINUX_BREAK in a recorded boot, free and stepping (None: no guest)."""
    vmlinux = REPO / "build" / "guests" / "linux.vmlinux"
    if not vmlinux.exists():
        return None
    path = REPO / "build" / "bench-gdb" / f"linux-{LINUX_BUDGET}.avro"
    if not path.exists():
        tmp = path.with_suffix(".tmp.avro")
        subprocess.run([sys.executable, "-m", "kvmrr.cli", "record", "linux", "--mode", "step",
                        "--log", f"file:{tmp}", "--max-instructions", str(LINUX_BUDGET),
                        "--quiet"], cwd=REPO, check=True)
        tmp.rename(path)
    log = load_log(f"file:{path}")
    target = _symbol(vmlinux, LINUX_BREAK)
    out = {"break": LINUX_BREAK, "log_instructions": LINUX_BUDGET}
    for mode in ("free", "stepping"):
        with _Stepping() if mode == "stepping" else contextlib.nullcontext():
            tl = Timeline(log.header, log.snapshot, log.events, log.end,
                          counter=best_counter()[0])
            t0 = time.monotonic()
            s = tl.cont([target], [])
            seconds = time.monotonic() - t0
            assert s.why == "break", s
            out[mode] = {"seconds": round(seconds, 2), "stopped_at": s.icount,
                         "snapshot_every": tl.snapshot_every,
                         "snapshots": len(tl.snapshots) - 1,
                         "snapshot_seconds": round(tl.snapshot_seconds, 2)}
    assert out["free"]["stopped_at"] == out["stepping"]["stopped_at"], out
    return out


def bench_gdb(quick: bool) -> dict:
    n = 1_000_000 if quick else 10_000_000
    counter, why = best_counter()
    elf = REPO / "build" / "guests" / "kvstore.elf"
    clock_ns = _symbol(elf, "clock_ns")
    version = _symbol(elf, "entries") + 16
    # the recording is kept under build/ and reused by the next run with the same length
    path = REPO / "build" / "bench-gdb" / f"kvstore-{n}.avro"
    path.parent.mkdir(parents=True, exist_ok=True)
    record_s = None
    if not path.exists():
        t0 = time.monotonic()
        tmp = path.with_suffix(".tmp.avro")
        subprocess.run([sys.executable, "-m", "kvmrr.cli", "record", "kvstore", "--log",
                        f"file:{tmp}", "--max-instructions", str(n), "--load", "200",
                        "--quiet"], cwd=REPO, check=True, env=dict(os.environ))
        tmp.rename(path)
        record_s = round(time.monotonic() - t0, 1)
    log = load_log(f"file:{path}")
    log_bytes = path.stat().st_size

    smallest = INTERVALS[0]
    tl = Timeline(log.header, log.snapshot, log.events, log.end, counter=counter,
                  snapshot_every=smallest)
    t0 = time.monotonic()
    tl.goto(tl.end)
    forward_s = time.monotonic() - t0
    all_snaps = dict(tl._snaps)
    result = {
        "host": platform.node(), "load_average": os.getloadavg(), "counter": counter,
        "instructions": tl.end, "events": len(log.events), "log_bytes": log_bytes,
        "record_seconds": record_s, "log": str(path.relative_to(REPO)),
        "forward_pass": {
            "snapshot_every": smallest, "seconds": round(forward_s, 1),
            "instructions_per_second": round(tl.end / forward_s),
            "snapshots": len(all_snaps), "snapshot_seconds": round(tl.snapshot_seconds, 2),
            "snapshot_bytes_held": tl.snapshot_bytes(),
            "snapshot_bytes_raw_each": len(tl.machine.snapshot()),
        },
        "intervals": {},
    }
    result["forward_pass"]["instructions_per_second_without_snapshots"] = round(
        tl.end / max(forward_s - tl.snapshot_seconds, 1e-9))
    # the stepping loop's own rate (continue/reverse-continue with breakpoints)
    tl.goto(tl.end // 2)
    t0 = time.monotonic()
    stepped = tl.machine.debug_run([clock_ns], [(version, 4)],
                                   stop_icount=tl.icount + 20_000).steps
    result["stepping_instructions_per_second"] = round(stepped / (time.monotonic() - t0))
    rng = random.Random(15)
    points = sorted(rng.randrange(n // 10, tl.end) for _ in range(POINTS))
    result["points"] = points
    for every in INTERVALS:
        keep = {k: v for k, v in all_snaps.items() if k % every == 0 or k == tl.begin}
        tl._snaps = dict(keep)
        tl._snap_at = sorted(keep)
        tl.snapshot_every = every
        rstep, rcont, rcont_back = [], [], []
        for p in points:
            tl.goto(p)
            t0 = time.monotonic()
            s = tl.reverse_step()
            rstep.append(time.monotonic() - t0)
            assert s.icount == p - 1, s
            tl.goto(p)
            t0 = time.monotonic()
            s = tl.reverse_cont([clock_ns], [])
            rcont.append(time.monotonic() - t0)
            rcont_back.append(p - s.icount)
        result["intervals"][str(every)] = {
            "reverse_stepi": _summary(rstep),
            "reverse_continue_breakpoint": _summary(rcont),
            "reverse_continue_instructions_back": rcont_back,
            "snapshots": len(keep),
        }
    chosen = min(INTERVALS, key=lambda e: result["intervals"][str(e)]
                 ["reverse_continue_breakpoint"]["median_ms"])
    keep = {k: v for k, v in all_snaps.items() if k % chosen == 0 or k == tl.begin}
    tl._snaps, tl._snap_at, tl.snapshot_every = dict(keep), sorted(keep), chosen
    tl.goto(tl.end)
    t0 = time.monotonic()
    s = tl.reverse_cont([], [(version, 4)])
    result["reverse_continue_watch"] = {
        "snapshot_every": chosen, "from": tl.end, "stopped_at": s.icount, "why": s.why,
        "instructions_back": tl.end - s.icount, "ms": _ms(time.monotonic() - t0)}
    result["chosen_snapshot_every"] = chosen
    result["continue"] = _bench_continue(tl, points, clock_ns, _symbol(elf, "entries"))
    result["linux_continue"] = _bench_linux()
    result["note"] = ("reverse-continue runs from the snapshot before the current point "
                      "to it, free with code breakpoints only (at most 3; hardware "
                      "breakpoints), else one instruction at a time (debug.c); "
                      "reverse-stepi runs free from the snapshot before the target. The "
                      "machine is shared: see load_average.")
    return result
