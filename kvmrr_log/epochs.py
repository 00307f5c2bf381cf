"""The epoch rule (docs/ARCHITECTURE.md §5-6): the one place it lives, shared by every reader of a VM's
log (backups, `replay`, `archive`, the gateway, the primary watching for its successor,
the harness's figures).

Every record a primary writes carries its epoch: 0 for the first primary, and a takeover
appends an `Epoch` record with the next number before it writes anything else.  Read in
log order:

- an `Epoch` record of a higher number than the current one is accepted: from its offset
  on, the epoch is its number;
- an `Epoch` record of the current number or lower is void (a sealer that lost the race:
  the first record of a number wins);
- any other record of the current epoch is history; of an older epoch it is void (an old
  primary, paused or cut off, wrote it after it was sealed out); of a newer epoch than the
  last accepted `Epoch` record it cannot be (its writer seals first): the log is refused.

Records outside the log point into it: a response released on .out names the log offset of
the record that carries it, a snapshot the log offset where the events after it start.
They are valid iff that offset precedes the next epoch's `Epoch` record (`EpochBounds`).
The .out topic has `Epoch` records of its own (a new primary writes one before it releases
anything), and the same rule applies there.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from kvmrr_log import record_mac
from kvmrr_log.kafka import TAIL_FETCH_WAIT_MS, KafkaLogError, client_conf
from schemas import LogFormatError, decode_message, message_kind


SHORT_FETCH_WAIT_MS = 5    # a reader that asks for the end, or needs its EOF soon


class EpochRule:
    """The rule, applied record by record in log order from a point whose epoch is known
    (0 at the log's start, a snapshot's epoch at its log offset)."""

    def __init__(self, epoch: int = 0, topic: str = "the log"):
        self.epoch = epoch
        self.topic = topic
        self.void = 0           # records ignored so far

    def admit(self, record: dict, offset: int) -> bool:
        """Whether the record at offset is part of the history (an accepted Epoch record
        is); False: void, every reader ignores it."""
        if record["kind"] == "Epoch":
            if record["epoch"] > self.epoch:
                self.epoch = record["epoch"]
                return True
            self.void += 1
            return False
        epoch = record.get("epoch", 0)
        if epoch == self.epoch:
            return True
        if epoch < self.epoch:
            self.void += 1
            return False
        raise KafkaLogError(f"{self.topic} offset {offset}: a {record['kind']} of epoch "
                            f"{epoch} where the epoch is {self.epoch} (no Epoch record of "
                            f"{epoch} before it): refusing the log")


@dataclass
class EpochBounds:
    """Where each accepted epoch of the log begins, as far as the log has been read."""
    starts: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0)])  # (epoch, offset)
    read_to: int = 0        # every offset below this one has been read

    @property
    def epoch(self) -> int:
        return self.starts[-1][0]

    def add(self, epoch: int, offset: int) -> bool:
        """An Epoch record read at offset; whether it was accepted."""
        if epoch <= self.epoch:
            return False
        self.starts.append((epoch, offset))
        return True

    def next_start(self, epoch: int) -> int | None:
        """Offset of the first accepted Epoch record of a later epoch (None: none yet)."""
        for e, offset in self.starts:
            if e > epoch:
                return offset
        return None

    def precedes_next_epoch(self, epoch: int, log_offset: int) -> bool | None:
        """Whether the log record of `epoch` at log_offset precedes the next epoch's Epoch
        record: True valid, False void, None not known yet (not read that far)."""
        if epoch not in {e for e, _ in self.starts}:
            return None if epoch > self.epoch else False
        nxt = self.next_start(epoch)
        if nxt is not None:
            return log_offset < nxt
        return True if log_offset < self.read_to else None

    def snapshot_valid(self, snap: dict) -> bool:
        """A snapshot is a valid starting point iff the events after it (from its
        log_offset) start no later than the next epoch's Epoch record: its state is made
        of history only.  (An old primary that snapshots after it was sealed out is not.)"""
        epoch, offset = snap.get("epoch", 0), snap.get("log_offset", -1)
        if epoch not in {e for e, _ in self.starts}:
            return False
        nxt = self.next_start(epoch)
        return nxt is None or (0 <= offset <= nxt)


class EpochTail:
    """Reads a topic's Epoch records (skipping every other record without decoding it) and
    keeps its EpochBounds.  poll() reads what has come; the caller's thread drives it."""

    def __init__(self, bootstrap: str, topic: str, start: int = 0,
                 bounds: EpochBounds | None = None, fetch_wait_ms: int = TAIL_FETCH_WAIT_MS):
        """fetch_wait_ms: a tail that only polls waits long (a record comes at once
        anyway); one that asks for the end (read_to_end) short, as the broker answers a
        connection's requests in order, the ask after a waiting fetch."""
        self.topic = topic
        self.bounds = bounds or EpochBounds(read_to=start)
        self.consumer = Consumer(dict(client_conf(bootstrap), **{
            "group.id": f"kvmrr-epochs-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
            "enable.partition.eof": True, "fetch.wait.max.ms": fetch_wait_ms,
            "auto.offset.reset": "earliest"}))
        self.consumer.assign([TopicPartition(topic, 0, start)])
        self.at_end = False
        self.refused = 0      # Epoch records without this VM's valid MAC (record_mac)

    def poll(self, timeout: float = 0.0, max_messages: int = 500) -> list[tuple[int, int]]:
        """Read what is there; the Epoch records accepted by it, as (epoch, offset)."""
        accepted = []
        try:
            msgs = self.consumer.consume(max_messages, timeout)
        except KafkaException as exc:
            raise KafkaLogError(f"{self.topic}: {exc.args[0].str()}") from None
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self.at_end = True
                    self.bounds.read_to = max(self.bounds.read_to, msg.offset())
                continue
            self.at_end = False
            offset = msg.offset()
            try:
                if message_kind(msg.headers() or []) == "Epoch" and record_mac.problem(msg):
                    self.refused += 1     # a forged Epoch record fences nobody
                elif message_kind(msg.headers() or []) == "Epoch":
                    record = decode_message(msg.value() or b"", msg.headers() or [])
                    if self.bounds.add(record["epoch"], offset):
                        accepted.append((record["epoch"], offset))
            except LogFormatError:
                pass     # not an Epoch record; whoever reads it in full refuses it
            self.bounds.read_to = max(self.bounds.read_to, offset + 1)
        return accepted

    def read_to_end(self, timeout: float = 15.0) -> EpochBounds:
        """Read up to the topic's end as its leader says it now."""
        deadline = time.monotonic() + timeout
        try:
            end = self.consumer.get_watermark_offsets(TopicPartition(self.topic, 0),
                                                      timeout=timeout, cached=False)[1]
        except KafkaException as exc:
            raise KafkaLogError(f"cannot read the end of {self.topic}: "
                                f"{exc.args[0].str()}") from None
        while self.bounds.read_to < end:
            if time.monotonic() > deadline:
                raise KafkaLogError(f"{self.topic}: the broker sent neither records nor the "
                                    f"end within {timeout:.0f} s")
            self.poll(0.005, 5000)   # consume() waits its whole timeout for fewer messages
        return self.bounds

    def close(self) -> None:
        self.consumer.close()


def epoch_bounds(bootstrap: str, topic: str, timeout: float = 15.0) -> EpochBounds:
    """Every accepted epoch of a topic up to its current end."""
    tail = EpochTail(bootstrap, topic, fetch_wait_ms=SHORT_FETCH_WAIT_MS)
    try:
        return tail.read_to_end(timeout)
    finally:
        tail.close()


class ReleaseFilter:
    """Responses on .out as a reader may pass them on, in .out order: the rule on .out
    itself, and each one's log record before the next epoch's Epoch record in the log
    (read by its own EpochTail; a release waits until the tail has read that far)."""

    def __init__(self, bootstrap: str, vm: str, fetch_wait_ms: int = TAIL_FETCH_WAIT_MS):
        from kvmrr_log.kafka import topics
        t = topics(vm)
        self.rule = EpochRule(topic=t.outputs)
        self.log = EpochTail(bootstrap, t.log, fetch_wait_ms=fetch_wait_ms)
        self._waiting: deque[dict] = deque()
        self.void = 0        # releases nobody may pass on

    def add(self, record: dict, offset: int) -> None:
        """The decoded .out record at offset."""
        if not self.rule.admit(record, offset):
            self.void += 1
        elif record["kind"] == "Output":
            self._waiting.append(record)

    @property
    def waiting(self) -> bool:
        return bool(self._waiting)

    def ready(self, timeout: float = 0.0) -> list[dict]:
        """The valid releases decided so far (reading the log's tail if one must wait)."""
        out = []
        while self._waiting:
            rec = self._waiting[0]
            valid = self.log.bounds.precedes_next_epoch(rec["epoch"], rec["log_offset"])
            if valid is None:
                self.log.poll(timeout)
                valid = self.log.bounds.precedes_next_epoch(rec["epoch"], rec["log_offset"])
                if valid is None:
                    break
            self._waiting.popleft()
            if valid:
                out.append(rec)
            else:
                self.void += 1
        return out

    def close(self) -> None:
        self.log.close()


class ReleaseTail:
    """The highest validly released seq on .out, kept current as .out and the log grow:
    the designated successor keeps one while it follows (replayer.follow), so that at its
    takeover, once it has sealed .out, only the last records are left to read
    (docs/ARCHITECTURE.md §6.3).  The same rule as valid_releases: a ReleaseFilter over
    .out from its start."""

    def __init__(self, bootstrap: str, vm: str):
        from kvmrr_log.kafka import topics, writer_id
        t = topics(vm)
        self.topic = t.outputs
        self.writer = writer_id(vm).encode()
        self.releases = ReleaseFilter(bootstrap, vm)
        self.consumer = Consumer(dict(client_conf(bootstrap), **{
            "group.id": f"kvmrr-releases-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
            "fetch.wait.max.ms": TAIL_FETCH_WAIT_MS, "auto.offset.reset": "earliest"}))
        self.consumer.assign([TopicPartition(t.outputs, 0, 0)])
        self.read_to = 0          # every .out offset below this one has been read
        self.released_seq = -1

    def poll(self, timeout: float = 0.0) -> int:
        """Read what has come (on .out, and the log's Epoch records); the highest valid
        seq decided so far."""
        self.releases.log.poll(0)
        try:
            msg = self.consumer.poll(timeout)
        except KafkaException as exc:
            raise KafkaLogError(f"{self.topic}: {exc.args[0].str()}") from None
        while msg is not None:
            if msg.error() is None:
                self._admit(msg)
            try:
                msg = self.consumer.poll(0)
            except KafkaException as exc:
                raise KafkaLogError(f"{self.topic}: {exc.args[0].str()}") from None
        for rec in self.releases.ready():
            self.released_seq = max(self.released_seq, rec["seq"])
        return self.released_seq

    def _admit(self, msg) -> None:
        from kvmrr_log.kafka import WRITER_HEADER
        self.read_to = msg.offset() + 1
        if (dict(msg.headers() or []).get(WRITER_HEADER) != self.writer
                or record_mac.problem(msg)):
            return           # a stranger's or forged release, as in valid_releases
        try:
            record = decode_message(msg.value() or b"", msg.headers() or [])
        except LogFormatError as exc:
            raise KafkaLogError(f"{self.topic} offset {msg.offset()}: {exc}") from None
        self.releases.add(record, msg.offset())

    def released_through(self, out_offset: int, log_offset: int, timeout: float) -> int:
        """The highest valid seq once .out is read through out_offset (this primary's
        Epoch record there: what follows it from older epochs is void) and the log's
        epochs through log_offset (its Epoch record on the log: every release before it
        is decidable then)."""
        deadline = time.monotonic() + timeout
        while (self.read_to <= out_offset or self.releases.log.bounds.read_to <= log_offset
               or self.releases.waiting):
            if time.monotonic() > deadline:
                raise KafkaLogError(f"{self.topic}: not read through offset {out_offset} "
                                    f"(and the log's epochs through {log_offset}) within "
                                    f"{timeout:.0f} s")
            self.releases.log.poll(0)
            self.poll(0.002)
        return self.released_seq

    def close(self) -> None:
        self.consumer.close()
        self.releases.close()


def valid_releases(bootstrap: str, vm: str, timeout: float = 15.0) -> list[dict]:
    """The responses validly released on .out, in order (a seq twice would be a broken
    output commit)."""
    from kvmrr_log.kafka import WRITER_HEADER, scan_topic, topics, writer_id
    t = topics(vm)
    writer = writer_id(vm).encode()
    releases = ReleaseFilter(bootstrap, vm, SHORT_FETCH_WAIT_MS)
    # the log's Epoch records are read meanwhile (a takeover waits for this), then to the
    # end again, which covers every release read
    ahead = threading.Thread(target=lambda: _quietly(releases.log.read_to_end, timeout))
    ahead.start()
    try:
        for msg in scan_topic(bootstrap, t.outputs, timeout=timeout):
            if dict(msg.headers() or []).get(WRITER_HEADER) != writer or record_mac.problem(msg):
                continue     # a stranger's or forged release: never one that counts
            try:
                record = decode_message(msg.value() or b"", msg.headers() or [])
            except LogFormatError as exc:
                raise KafkaLogError(f"{t.outputs} offset {msg.offset()}: {exc}") from None
            releases.add(record, msg.offset())
        ahead.join()
        releases.log.read_to_end(timeout)
        return releases.ready()
    finally:
        ahead.join()
        releases.close()


def _quietly(read, timeout: float) -> None:
    try:
        read(timeout)
    except KafkaLogError:
        pass         # the read after it says
