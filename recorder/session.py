"""The primary side: run a guest in record mode and write its log to a sink.

RecordSession is the mirror of replayer.session.ReplaySession.  The sink takes plain
record dicts (LogHeader, Snapshot, EventBatch) in log order: an Avro archive here, a
Kafka producer in the log-on-Kafka code.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

from libkvmrr import DEFAULT_MEM_SIZE, GuestError, Machine, cpu_model
from kvmrr_log.guest_images import GuestImage, image_fields
from kvmrr_log.verify import ICOUNT_SEMANTICS, OutputDigest
from kvmrr_log.version import __version__
from recorder.loadgen import KvLoad
from schemas import FORMAT_VERSION

if TYPE_CHECKING:
    from recorder.service import KafkaInputs
    from recorder.pacing import BackupPacer

SLICE_NS = 10_000_000        # the vCPU comes back this often to publish what it logged: on
                             # Kafka, one slice for the publisher (group commit may merge
                             # slices); a slice also ends at its first response


class LogSink(Protocol):
    def write(self, record: dict) -> None: ...

    def commit(self) -> None:
        """The records written so far form a unit (a slice of the run): make it durable."""


@dataclass
class RecordResult:
    counter: str
    instructions: int
    events: int
    events_by_kind: dict[str, int]
    seconds: float
    state_hash: str
    outputs_sha256: str
    outputs: int
    reason: str
    exit_code: int
    snapshots: int
    stats: dict = field(default_factory=dict)


def now_ns() -> int:
    return time.monotonic_ns()


class RecordSession:
    def __init__(self, guest: GuestImage, sink: LogSink, *, counter: str, vm_id: str,
                 bootargs: str = "", max_instructions: int | None = None,
                 checksum_every: int = 1_000_000, snapshot_every: int = 0,
                 load: KvLoad | None = None, mem_size: int | None = None,
                 on_output: Callable[[dict], None] | None = None,
                 mode: str = "record", heartbeat_every_ns: int = 0,
                 continue_from: "Machine | None" = None, next_seq: int = 0,
                 outputs: OutputDigest | None = None, outputs_complete: bool = True,
                 inputs: "KafkaInputs | None" = None, max_seconds: float | None = None,
                 slice_ns: int = SLICE_NS, pacer: "BackupPacer | None" = None):
        """continue_from: a machine that replayed this log up to its end and went live
        (a takeover); the session then appends to the log from next_seq on.
        inputs: requests pushed into the NIC from outside (the service's .in topic); the
        session tells it which were delivered, and each EventBatch carries the position.
        pacer: slows the run down while the backups fall too far behind (recorder.pacing)."""
        self.guest = guest
        self.sink = sink
        self.counter = counter
        self.vm_id = vm_id
        self.bootargs = bootargs
        self.max_instructions = max_instructions
        self.checksum_every = checksum_every
        self.snapshot_every = snapshot_every
        self.load = load
        self.on_output = on_output
        self.heartbeat_every_ns = heartbeat_every_ns
        self.recording = mode == "record"
        self.continuing = continue_from is not None
        self.machine = continue_from or Machine(
            guest.elf, mode=mode, counter=counter, bootargs=bootargs,
            mem_size=mem_size if mem_size is not None else guest.mem_size,
            checksum_every=checksum_every if self.recording else 0, machine=guest.machine)
        self.next_seq = next_seq
        self.kinds: Counter[str] = Counter()
        self.outputs = outputs or OutputDigest()
        # A takeover that started from a mid-log snapshot has not seen the early outputs:
        # its End then leaves outputs_sha256 empty rather than state a partial digest.
        self.outputs_complete = outputs_complete
        self.snapshots = 0
        self.inputs = inputs
        self.max_seconds = max_seconds
        self.slice_ns = slice_ns
        self.pacer = pacer

    def header(self) -> dict:
        return {
            "kind": "LogHeader", "format_version": FORMAT_VERSION, "vm_id": self.vm_id,
            "guest_name": self.guest.name, "guest_sha256": self.guest.sha256,
            "memory_bytes": self.machine.mem_size, "bootargs": self.bootargs,
            "counter": self.counter, "icount_semantics": ICOUNT_SEMANTICS,
            "checksum_every": self.checksum_every, "created_wall_ns": time.time_ns(),
            "kvmrr_version": __version__, "cpu_model": cpu_model(),
            **image_fields(self.guest.elf), "machine": self.machine.machine,
            "host_cpu": self.machine.host_cpu,
        }

    def snapshot(self) -> None:
        blob = self.machine.snapshot()
        self.sink.write({"kind": "Snapshot", "icount": self.machine.icount,
                         "next_seq": self.next_seq, "guest_sha256": self.guest.sha256,
                         "chunk": 0, "chunks": 1, "blob": blob,
                         "state_hash": self.machine.state_hash()})
        self.snapshots += 1

    def _heartbeat(self, events: list[dict], now: int) -> None:
        """A Heartbeat at the current icount: silence means failure, and it tells backups
        the log holds nothing more before this icount."""
        if self.heartbeat_every_ns and now - self._last_heartbeat >= self.heartbeat_every_ns:
            events.append({"kind": "Heartbeat", "icount": self.machine.icount,
                           "wall_ns": time.time_ns()})
            self._last_heartbeat = now

    def _publish(self, events: list[dict]) -> None:
        for ev in events:
            if ev["kind"] == "Output":
                self.outputs.add(ev)
                if self.on_output:
                    self.on_output(ev)
        if not self.recording or not events:
            return
        self.kinds.update(ev["kind"] for ev in events)
        self.sink.write({"kind": "EventBatch", "first_seq": self.next_seq, "events": events,
                         "next_input_offset": self.inputs.next_offset if self.inputs else -1})
        self.next_seq += len(events)

    def run(self) -> RecordResult:
        m = self.machine
        if self.recording and not self.continuing:
            self.sink.write(self.header())
        if self.recording and not self.continuing:
            # (a takeover continues the same log: the old primary's snapshots stay valid
            # starting points, and the next periodic one follows)
            self.snapshot()
            # a unit of its own, before the guest runs: a sink may wait here until its log
            # takes writes (KafkaSink: a new cluster's producer id), not in a slice
            self.sink.commit()
        last_snapshot = m.icount
        self._last_heartbeat = 0
        if self.inputs:
            self.inputs.start(m)
        started = time.monotonic()
        while True:
            t = now_ns()
            deadline = t + self.slice_ns
            if self.load:
                for request in self.load.due(t):
                    m.nic_push(request)
                deadline = min(deadline, self.load.next_due_ns(t))
            # a response ends the slice: its commit starts at once (docs/ARCHITECTURE.md §4.5)
            r = m.run(stop_icount=self.max_instructions, deadline_ns=deadline,
                      stop_at_output=self.recording)
            events = m.take_events()
            if self.inputs:
                self.inputs.delivered(events)
            if self.recording and r.stop not in ("exited", "icount", "error"):
                self._heartbeat(events, now_ns())
            self._publish(events)
            if r.stop == "error":
                raise GuestError(r.message)
            if r.stop in ("exited", "icount"):
                break
            if self.max_seconds and time.monotonic() - started >= self.max_seconds:
                break
            if (self.recording and self.snapshot_every
                    and m.icount - last_snapshot >= self.snapshot_every):
                self.snapshot()
                last_snapshot = m.icount
            if self.recording:
                self.sink.commit()
            if self.pacer:
                self.pacer.pace(m.icount)
        seconds = time.monotonic() - started
        state_hash = m.state_hash()
        reason = "exited" if r.stop == "exited" else "budget"
        if self.recording:
            regs = m.regs()
            end = {"kind": "End", "icount": m.icount, "rip": regs["rip"], "reason": reason,
                   "exit_code": r.exit_code, "state_hash": state_hash,
                   "outputs_sha256": self.outputs.hexdigest() if self.outputs_complete else ""}
            self.kinds["End"] += 1
            self.sink.write({"kind": "EventBatch", "first_seq": self.next_seq,
                             "events": [end]})
            self.next_seq += 1
            self.sink.commit()
        return RecordResult(
            counter=self.counter, instructions=m.icount, events=sum(self.kinds.values()),
            events_by_kind=dict(self.kinds), seconds=seconds, state_hash=state_hash,
            outputs_sha256=self.outputs.hexdigest(), outputs=self.outputs.count,
            reason=reason, exit_code=r.exit_code, snapshots=self.snapshots,
            stats=m.stats())
