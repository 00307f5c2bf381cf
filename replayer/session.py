"""The backup side: replay a log from one of its snapshots and verify it as it goes.

ReplaySession is the mirror of recorder.session.RecordSession.  It takes the log as an
iterable of record dicts (from an archive or Kafka), applies each event at its icount
through the core (which checks kind, icount and RIP and every Checksum), and at the End
record compares the final state hash and the outputs with the recorder's.  It never runs
the guest past the last event it was given: a gap, a cut or a bad record stops it there.
"""
from __future__ import annotations

import hashlib
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from libkvmrr import GuestError, Machine, cpu_model
from kvmrr_log.guest_images import GuestImage, carried_image, guest_from_bytes, load_guest
from kvmrr_log.verify import ICOUNT_SEMANTICS, OutputDigest
from replayer.errors import DivergenceError, ReplayError
from replayer.report import format_divergence
from schemas import FORMAT_VERSION


@dataclass
class ReplayResult:
    counter: str
    start_icount: int
    icount: int
    events: int
    events_by_kind: dict[str, int]
    seconds: float
    state_hash: str
    outputs_sha256: str
    outputs: int
    finished: bool            # reached the log's End and matched it
    stopped_at_until: bool
    regs: dict[str, int] = field(default_factory=dict)
    verified_outputs: bool = False
    stats: dict = field(default_factory=dict)


def check_header(header: dict, guest: GuestImage | None) -> GuestImage:
    """The image to replay with, or a clear refusal."""
    if header.get("kind") != "LogHeader":
        raise ReplayError("the log does not start with a LogHeader")
    if header["format_version"] != FORMAT_VERSION:
        raise ReplayError(f"log format version {header['format_version']}, this kvmrr "
                          f"reads {FORMAT_VERSION}")
    if header["icount_semantics"] != ICOUNT_SEMANTICS:
        raise ReplayError("the log counts instructions as "
                          f"\"{header['icount_semantics']}\", which this host cannot "
                          "reproduce")
    # CPUID is guest-visible: a host whose guests get other answers cannot replay.  (A log
    # from before the model was stated says nothing, and is replayed as before.)
    if header.get("cpu_model") and header["cpu_model"] != cpu_model():
        raise ReplayError(f"the log was recorded on CPU model {header['cpu_model']}, but a "
                          f"guest here sees {cpu_model()}: this host cannot give the same "
                          "CPUID answers")
    # The log carries its image (logs from before it did name a built-in one).
    carried = carried_image(header)
    if carried and hashlib.sha256(carried).hexdigest() != header["guest_sha256"]:
        raise ReplayError("the guest image the log carries does not match the log's "
                          "guest_sha256: the log is corrupt")
    if guest is not None:
        image = guest
    elif carried:
        image = guest_from_bytes(header["guest_name"], carried, "in the log",
                                 machine=header.get("machine", "kvmrr"))
    else:
        image = load_guest(header["guest_name"])
    if image.sha256 != header["guest_sha256"]:
        raise ReplayError(f"the log was recorded with guest image sha256 "
                          f"{header['guest_sha256'][:16]}…, but {image.path} has "
                          f"{image.sha256[:16]}…: refusing to replay another guest")
    return image


class ReplaySession:
    def __init__(self, header: dict, *, counter: str, guest: GuestImage | None = None,
                 until: int | None = None,
                 on_output: Callable[[dict], None] | None = None,
                 on_progress: Callable[[int], None] | None = None):
        self.header = header
        self.image = check_header(header, guest)
        self.counter = counter
        self.until = until
        self.on_output = on_output
        self.on_progress = on_progress
        self.machine: Machine | None = None
        self.expected_seq = 0
        self.start_icount = 0
        self.kinds: Counter[str] = Counter()
        self.outputs = OutputDigest()
        self.last_checksum: dict | None = None
        self.end: dict | None = None
        self.stopped_at_until = False
        self.received_icount = 0
        self.next_input_offset = -1   # a served VM: where its input stands in the log
        # (icount, primary wall ns), for lag: those the replay has not passed, and the
        # last one it passed
        self.heartbeats: deque[tuple[int, int]] = deque()
        self._started = 0.0

    # -- feeding ------------------------------------------------------------------
    def start(self, snapshot: dict) -> None:
        if snapshot["guest_sha256"] != self.image.sha256:
            raise ReplayError("the snapshot belongs to another guest image")
        if snapshot.get("chunks", 1) != 1:
            raise ReplayError("a chunked snapshot must be joined before replay")
        self.machine = Machine(self.image.elf, mode="replay", counter=self.counter,
                               bootargs=self.header["bootargs"],
                               mem_size=self.header["memory_bytes"],
                               machine=self.header.get("machine", "kvmrr"),
                               host_cpu=self.header.get("host_cpu", -1))
        # The snapshot, not the image, is what the replay runs: a first snapshot must be
        # the state this image boots into, or labels could pass off one guest's log as
        # another's.
        if snapshot["icount"] == 0 and self.machine.state_hash() != snapshot["state_hash"]:
            raise ReplayError(f"the log's initial snapshot is not the state guest image "
                              f"{self.image.name} (sha256 {self.image.sha256[:16]}…) boots "
                              "into: the image or the snapshot was replaced")
        self.machine.restore(snapshot["blob"])
        if self.machine.state_hash() != snapshot["state_hash"]:
            raise ReplayError(f"snapshot at icount {snapshot['icount']} does not restore "
                              "to its recorded state hash")
        self.expected_seq = snapshot["next_seq"]
        self.start_icount = self.received_icount = snapshot["icount"]
        if self.until is not None and self.until < self.start_icount:
            raise ReplayError(f"--until {self.until} lies before the snapshot the replay "
                              f"starts from (icount {self.start_icount})")
        self._started = time.monotonic()

    def feed_batch(self, batch: dict) -> bool:
        """Apply one EventBatch; False once the replay is finished (End or --until)."""
        if self.machine is None:
            raise ReplayError("the log has events before any snapshot")
        events = batch["events"]
        first = batch["first_seq"]
        if first + len(events) <= self.expected_seq:
            return True                      # before the snapshot we started from
        if first > self.expected_seq:
            raise ReplayError(f"gap in the log: expected event seq {self.expected_seq}, "
                              f"next batch starts at {first}")
        events = events[self.expected_seq - first:]
        if batch.get("next_input_offset", -1) >= 0:
            self.next_input_offset = batch["next_input_offset"]
        to_core = []
        horizon = None
        for ev in events:
            self.kinds[ev["kind"]] += 1
            self.received_icount = ev["icount"]
            if ev["kind"] == "Heartbeat":
                horizon = ev["icount"]
                self.heartbeats.append((ev["icount"], ev["wall_ns"]))
                continue
            if ev["kind"] == "End":
                self.end = ev
                break
            if ev["kind"] == "Checksum":
                self.last_checksum = ev
            to_core.append(ev)
        self.expected_seq += len(events)
        self.machine.feed(to_core)
        if horizon is not None:
            self.machine.set_horizon(horizon)
        self._run_until_starved()
        self._forget_heartbeats()
        if self.stopped_at_until:
            return False
        if self.end is not None:
            self._finish()
            return False
        return True

    @property
    def icount(self) -> int:
        return self.machine.icount if self.machine else 0

    def lag_seconds(self) -> float:
        """How far behind the primary's wall clock the replay is: the age of the newest
        heartbeat the replay has reached."""
        self._forget_heartbeats()
        if not self.heartbeats or self.heartbeats[0][0] > self.icount:
            return 0.0
        return max(0.0, (time.time_ns() - self.heartbeats[0][1]) / 1e9)

    def _forget_heartbeats(self) -> None:
        """Keep the last heartbeat passed and those ahead: the list stays as long as the
        replay's lag, not the log."""
        icount = self.icount
        while len(self.heartbeats) > 1 and self.heartbeats[1][0] <= icount:
            self.heartbeats.popleft()

    # -- running --------------------------------------------------------------------
    def _drain(self) -> None:
        for ev in self.machine.take_events():
            if ev["kind"] == "Output":
                self.outputs.add(ev)
                if self.on_output:
                    self.on_output(ev)

    def _run(self, stop_icount: int | None) -> str:
        m = self.machine
        while True:
            r = m.run(stop_icount=stop_icount, deadline_ns=time.monotonic_ns() + 200_000_000)
            self._drain()
            if r.stop in ("events_full", "deadline"):
                if self.on_progress:
                    self.on_progress(m.icount)
                continue
            if r.stop == "diverged":
                self._diverged()
            if r.stop == "error":
                raise GuestError(r.message)
            return r.stop

    def _run_until_starved(self) -> None:
        stop = self._run(self.until)
        if stop == "icount" and self.until is not None and self.machine.icount == self.until:
            self.stopped_at_until = True

    def _diverged(self) -> None:
        div = self.machine.divergence()
        ck = self.last_checksum
        exp = div["expected"]
        if exp and exp["kind"] == "Checksum":
            ck = exp
        regs = ck["regs"] if ck and ck["icount"] <= div["icount"] else None
        at = ck["icount"] if regs else None
        report = format_divergence(div, regs, at)
        raise DivergenceError(f"divergence at icount {div['icount']}: {div['reason']}",
                              report, div["icount"])

    def _finish(self) -> None:
        end = self.end
        if self.until is not None and self.until > end["icount"]:
            raise ReplayError(f"--until {self.until} is beyond the log, which ends at "
                              f"icount {end['icount']}")
        self.machine.set_horizon(end["icount"])
        stop = self._run(end["icount"])
        m = self.machine
        if m.icount != end["icount"] or stop not in ("icount", "exited"):
            raise DivergenceError(
                f"the replay ended at icount {m.icount}, the record at {end['icount']}",
                f"replay stop: {stop}", m.icount)
        if self.until == end["icount"]:
            self.stopped_at_until = True
        h = m.state_hash()
        if h != end["state_hash"]:
            raise DivergenceError(
                f"final state hash {h} differs from the record's {end['state_hash']}",
                "state differs at the End of the log", m.icount)
        if self._outputs_checkable() and self.outputs.hexdigest() != end["outputs_sha256"]:
            raise DivergenceError("the replay's outputs differ from the record's",
                                  "outputs_sha256 mismatch", m.icount)

    def _outputs_checkable(self) -> bool:
        return self.start_icount == 0 and bool(self.end and self.end["outputs_sha256"])

    def result(self) -> ReplayResult:
        m = self.machine
        return ReplayResult(
            counter=self.counter, start_icount=self.start_icount, icount=m.icount,
            events=sum(self.kinds.values()), events_by_kind=dict(self.kinds),
            seconds=time.monotonic() - self._started, state_hash=m.state_hash(),
            outputs_sha256=self.outputs.hexdigest(), outputs=self.outputs.count,
            finished=self.end is not None and not (self.until is not None
                                                   and self.until < self.end["icount"]),
            stopped_at_until=self.stopped_at_until, regs=m.regs(),
            verified_outputs=self.end is not None and self._outputs_checkable(),
            stats=m.stats())


def replay_records(header: dict, records: Iterable[dict], *, counter: str,
                   guest: GuestImage | None = None, until: int | None = None,
                   start: str = "first",
                   on_output: Callable[[dict], None] | None = None) -> ReplayResult:
    """Replay a whole log.  start: 'first' snapshot, or 'latest' (needs the records twice,
    so they are held in memory)."""
    session = ReplaySession(header, counter=counter, guest=guest, until=until,
                            on_output=on_output)
    if start == "latest":
        records = list(records)
        snaps = [r for r in records if r["kind"] == "Snapshot"
                 and (until is None or r["icount"] <= until)]
        if not snaps:
            raise ReplayError("the log holds no snapshot to start from")
        chosen = snaps[-1]
    else:
        chosen = None
    running = True
    for rec in records:
        kind = rec["kind"]
        if kind == "Snapshot":
            if session.machine is None and (chosen is None or rec is chosen):
                session.start(rec)
            continue
        if kind == "EventBatch":
            if session.machine is None:
                if chosen is None:
                    raise ReplayError("the log has events before any snapshot")
                continue
            running = session.feed_batch(rec)
            if not running:
                break
    if session.machine is None:
        raise ReplayError("the log holds no snapshot to start from")
    if running and session.end is None and not session.stopped_at_until:
        raise ReplayError(f"the log ends without an End record after event seq "
                          f"{session.expected_seq - 1} (icount {session.machine.icount}): "
                          "it is incomplete")
    return session.result()
