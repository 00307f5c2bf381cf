"""The time-travel session: one replaying VM that can be moved to any icount of a
finished log, forwards by replaying and backwards by restoring a snapshot and replaying
deterministically from there (docs/debugging.md).

The whole log is held in memory (its events; the guest's memory only in snapshots).
Snapshots are taken automatically whenever the replay passes a multiple of
`snapshot_every` instructions, so every icount the session has reached lies at most
`snapshot_every` instructions after one.  A snapshot remembers how many of the log's
events had been applied (fed minus still pending), so that restoring it feeds exactly
the rest again.
"""
from __future__ import annotations

import time
from bisect import bisect_right
from dataclasses import dataclass
from typing import Callable

from libkvmrr import GuestError, Machine
from kvmrr_log.guest_images import GuestImage
from replayer.errors import DivergenceError, ReplayError
from replayer.session import check_header

DEFAULT_SNAPSHOT_EVERY = 10_000    # chosen by make bench-gdb (bench/gdb.json, docs/debugging.md)
DEFAULT_FOR_BYTES = 8 << 20        # ... for kvstore's 8 MiB of guest memory
FEED_CHUNK = 2048
PAGE = 4096
SLICE_NS = 100_000_000             # how often a long run looks for an interrupt


@dataclass(frozen=True)
class Stop:
    """Where a motion ended and why: 'icount' (reached its target), 'break', 'watch'
    (address: the watched address), 'begin' / 'end' of the log, 'interrupted'."""
    why: str
    icount: int
    address: int = 0


def default_snapshot_every(memory_bytes: int) -> int:
    """A snapshot copies the whole guest memory (about 0.4 s for the Linux guest's 64 MiB
    here, 0.06 s for kvstore's 8 MiB): the default interval grows with it, so that going
    forwards spends about the same share of its time snapshotting on any guest."""
    return DEFAULT_SNAPSHOT_EVERY * max(1, memory_bytes // DEFAULT_FOR_BYTES)


class Timeline:
    def __init__(self, header: dict, snapshot: dict, events: list[dict], end: dict | None, *,
                 counter: str, guest: GuestImage | None = None,
                 snapshot_every: int | None = None):
        self.image = check_header(header, guest)
        if snapshot["guest_sha256"] != self.image.sha256:
            raise ReplayError("the snapshot belongs to another guest image")
        if snapshot_every is None:
            snapshot_every = default_snapshot_every(header["memory_bytes"])
        if snapshot_every < 1000:
            raise ReplayError("--snapshot-every must be at least 1000 instructions")
        self.snapshot_every = snapshot_every
        self.events = [e for e in events if e["kind"] not in ("Heartbeat", "End")]
        self.begin = snapshot["icount"]
        last = self.events[-1]["icount"] if self.events else self.begin
        self.end = end["icount"] if end else last
        self.machine = Machine(self.image.elf, mode="replay", counter=counter,
                               bootargs=header["bootargs"], mem_size=header["memory_bytes"],
                               machine=header.get("machine", "kvmrr"),
                               host_cpu=header.get("host_cpu", -1))
        self.machine.restore(snapshot["blob"])
        if self.machine.state_hash() != snapshot["state_hash"]:
            raise ReplayError(f"snapshot at icount {self.begin} does not restore to its "
                              "recorded state hash")
        self.fed = 0
        self._snap_at: list[int] = []             # sorted icounts
        self._snaps: dict[int, tuple[tuple[bytes, ...], int]] = {}
        self._pages: dict[bytes, bytes] = {}      # every distinct 4 KiB piece, once
        self.snapshot_seconds = 0.0
        self.exited = False
        self._save_snapshot()

    # -- state --------------------------------------------------------------------------
    @property
    def icount(self) -> int:
        return self.machine.icount

    @property
    def snapshots(self) -> list[int]:
        return list(self._snap_at)

    def snapshot_bytes(self) -> int:
        """Memory the snapshots hold: their distinct pages and the lists of them."""
        return (sum(len(p) for p in self._pages.values())
                + sum(8 * len(pieces) for pieces, _ in self._snaps.values()))

    # -- feeding and running ------------------------------------------------------------
    def _feed_more(self) -> bool:
        if self.fed >= len(self.events):
            return False
        chunk = self.events[self.fed:self.fed + FEED_CHUNK]
        self.machine.feed(chunk)
        self.fed += len(chunk)
        # One short of the next unfed event: a free run may stop at its horizon on the
        # very exit of a synchronous event (an IN) logged there.
        self.machine.set_horizon(self.events[self.fed]["icount"] - 1
                                 if self.fed < len(self.events) else self.end)
        return True

    def _save_snapshot(self) -> None:
        t0 = time.perf_counter()
        icount = self.icount
        if icount in self._snaps:
            return
        applied = self.fed - self.machine.pending
        blob = self.machine.snapshot()
        # Stored as 4 KiB pieces, each distinct piece once for all snapshots: a guest
        # changes few pages between two snapshots, and most of its memory is zero.
        pages = self._pages
        pieces = tuple(pages.setdefault(p, p) for p in
                       (blob[i:i + PAGE] for i in range(0, len(blob), PAGE)))
        self._snaps[icount] = (pieces, applied)
        self._snap_at.insert(bisect_right(self._snap_at, icount), icount)
        self.snapshot_seconds += time.perf_counter() - t0

    def _restore(self, icount: int) -> None:
        pieces, applied = self._snaps[icount]
        self.machine.restore(b"".join(pieces))
        self.fed = applied
        self.exited = False
        if self.fed < len(self.events):
            self._feed_more()
        else:
            self.machine.set_horizon(self.end)

    def _handle_run_stop(self, stop: str, message: str) -> str | None:
        """Act on a run-loop stop; None to keep going, else 'end'."""
        self.machine.take_events()    # outputs replayed: checked by the core, not shown
        if stop in ("events_full", "deadline", "icount"):
            return None
        if stop == "need_events":
            if self._feed_more():
                return None
            if self.icount >= self.end:
                return "end"
            raise ReplayError(f"the log holds no more events at icount {self.icount}, "
                              f"before its end at {self.end}")
        if stop == "exited":
            self.exited = True
            return "end"
        if stop == "diverged":
            div = self.machine.divergence()
            raise DivergenceError(f"divergence at icount {div['icount']}: {div['reason']}",
                                  div["reason"], div["icount"])
        raise GuestError(message or stop)

    def _next_boundary(self) -> int:
        n = self.snapshot_every
        return (self.icount // n + 1) * n

    def _run_exact(self, target: int, interrupted: Callable[[], bool] | None) -> str:
        """Run free (the core's fast exact stop) to target; 'icount', 'end' or
        'interrupted'."""
        m = self.machine
        while m.icount < target:
            r = m.run(stop_icount=target, deadline_ns=time.monotonic_ns() + SLICE_NS)
            if r.stop == "icount" and m.icount == target:
                m.take_events()
                break
            if self._handle_run_stop(r.stop, r.message) == "end":
                return "end"
            if interrupted and interrupted():
                return "interrupted"
        return "icount"

    def _advance(self, target: int, interrupted=None) -> str:
        """Forwards to target, snapshotting at every boundary passed."""
        target = min(target, self.end)
        while self.icount < target:
            boundary = self._next_boundary()
            why = self._run_exact(min(target, boundary), interrupted)
            if self.icount == boundary:
                self._save_snapshot()
            if why != "icount":
                return why
        return "icount"

    def _step_until(self, breaks: list[int], watches: list[tuple[int, int]], limit: int,
                    interrupted=None) -> Stop:
        """Instruction by instruction towards limit, stopping at a breakpoint or a
        watched write (after the writing instruction)."""
        m = self.machine
        limit = min(limit, self.end)
        while True:
            if self.icount >= limit:
                return Stop("end" if self.icount >= self.end else "icount", self.icount)
            boundary = self._next_boundary()
            r = m.debug_run(breaks, watches, stop_icount=min(limit, boundary),
                            deadline_ns=time.monotonic_ns() + SLICE_NS)
            if self.icount == boundary:
                self._save_snapshot()
            if r.why == "break":
                return Stop("break", r.icount, r.address)
            if r.why == "watch":
                return Stop("watch", r.icount, r.address)
            if r.why == "error":
                raise GuestError(r.message)
            if r.why == "run_stop":
                if self._handle_run_stop(r.run_stop, r.message) == "end":
                    return Stop("end", self.icount)
            else:
                m.take_events()
            if interrupted and interrupted():
                return Stop("interrupted", self.icount)

    # -- the motions gdb asks for -------------------------------------------------------
    def goto(self, target: int, interrupted=None) -> Stop:
        """To exactly target (clamped to the log): from the nearest snapshot at or before
        it, or on from here when that is nearer."""
        target = max(self.begin, min(target, self.end))
        i = bisect_right(self._snap_at, target) - 1
        snap = self._snap_at[i]
        if not (snap <= self.icount <= target):
            self._restore(snap)
        why = self._advance(target, interrupted)
        if why == "interrupted":
            return Stop("interrupted", self.icount)
        if self.icount == self.begin:
            return Stop("begin", self.icount)
        return Stop("end" if why == "end" or self.icount >= self.end else "icount",
                    self.icount)

    def step(self, breaks=(), watches=()) -> Stop:
        """One instruction forwards (a watched write in it is reported)."""
        if self.icount >= self.end or self.exited:
            return Stop("end", self.icount)
        s = self._step_until(list(breaks), list(watches), self.icount + 1)
        return Stop("icount", s.icount) if s.why == "break" else s

    def cont(self, breaks, watches, interrupted=None) -> Stop:
        if self.icount >= self.end or self.exited:
            return Stop("end", self.icount)
        if not breaks and not watches:
            return self.goto(self.end, interrupted)
        return self._step_until(list(breaks), list(watches), self.end, interrupted)

    def reverse_step(self) -> Stop:
        if self.icount <= self.begin:
            return Stop("begin", self.icount)
        s = self.goto(self.icount - 1)
        return Stop("begin", s.icount) if s.icount == self.begin else s

    def reverse_cont(self, breaks, watches, interrupted=None) -> Stop:
        """Back to the last breakpoint hit or watched write before here: a breakpoint
        stops where RIP reached it, a watched write before the instruction that wrote
        (as rr does, so gdb sees the value change going backwards)."""
        breaks, watches = list(breaks), list(watches)
        hi = self.icount
        while hi > self.begin:
            lo = self._snap_at[bisect_right(self._snap_at, hi - 1) - 1]
            self._restore(lo)
            last = None
            if breaks and self.machine.regs()["rip"] in breaks:
                last = Stop("break", lo, self.machine.regs()["rip"])
            while self.icount < hi:
                s = self._step_until(breaks, watches, hi, interrupted)
                if s.why == "break" and s.icount < hi:
                    last = s
                elif s.why == "watch":
                    last = Stop("watch", s.icount - 1, s.address)
                elif s.why == "interrupted":
                    return s
                elif s.why != "break":
                    break
            if last is not None:
                self.goto(last.icount)
                return last
            hi = lo
        self.goto(self.begin)
        return Stop("begin", self.begin)
