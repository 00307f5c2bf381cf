"""The service boundary on the primary (docs/ARCHITECTURE.md §5): requests from
kvmrr.<vm>.in go into the guest's NIC; responses leave through kvmrr.<vm>.out only when
the release policy allows.

Inputs: a thread takes requests from .in and pushes them into the NIC queue as they come
(nic_push wakes the vCPU), remembering each one's offset.  The core delivers queued packets
in order, one Dma event each, so the n-th Dma event in the log is the n-th pushed offset:
after a slice, `delivered()` turns the slice's Dma events into the next undelivered offset,
which the slice's EventBatch carries (next_input_offset), in the same write.  A new
primary therefore resumes exactly after the last input in the log's history.

Outputs: the policy decides when a response in the log may be released (written to .out
with its epoch and log offset): `log` once its log record is written (replicated),
`backups:N` once N backups have acked receipt of the log up to its icount.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from kvmrr_log import record_mac
from kvmrr_log.kafka import TAIL_FETCH_WAIT_MS, absolute_start, client_conf, client_id, topics
from schemas import LogFormatError, decode_message

MAX_BACKUPS = 64        # backup ids an AckWatch keeps track of
NIC_MTU = 2048          # KVMRR_NIC_MTU: longer requests are cut to it, as the NIC would


@dataclass(frozen=True)
class CommitPolicy:
    backups: int = 0     # 0: `log`

    @classmethod
    def parse(cls, text: str) -> "CommitPolicy":
        if text == "log":
            return cls(0)
        kind, _, n = text.partition(":")
        if kind == "backups" and n.isdigit() and int(n) > 0:
            return cls(int(n))
        raise ValueError(f"unknown commit policy {text!r}: use 'log' or 'backups:N' (N >= 1)")

    def __str__(self) -> str:
        return f"backups:{self.backups}" if self.backups else "log"


class KafkaInputs:
    """The primary's consumer of .in, from start_offset: 0 for a new VM, the position in the
    log for a new primary."""

    def __init__(self, bootstrap: str, vm: str, start_offset: int = 0,
                 held_back: Callable[[], bool] | None = None):
        """held_back(): while true, no more requests go into the NIC (the responses
        already produced cannot leave yet: KafkaSink.held_back)."""
        self.topic = topics(vm).inputs
        self.held_back = held_back
        self.consumer = Consumer(dict(client_conf(bootstrap, client_id(vm, "recorder")), **{
            "group.id": f"kvmrr.{vm}.inputs", "enable.auto.commit": False,
            "isolation.level": "read_committed", "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": TAIL_FETCH_WAIT_MS}))
        self.next_offset = self.start_offset = start_offset
        self.consumer.assign([TopicPartition(self.topic, 0, start_offset)])
        self._pushed: deque[int] = deque()      # pushed into the NIC, not delivered yet
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.consumed = 0
        self.forged = 0      # requests without the gateway's valid MAC, skipped
        self.error: str | None = None

    def start(self, machine) -> None:
        self._thread = threading.Thread(target=self._feed, args=(machine,),
                                        name="kvmrr-inputs", daemon=True)
        self._thread.start()

    def _feed(self, machine) -> None:
        while not self._stop.is_set():
            msg = self.consumer.poll(0.05)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    self.error = msg.error().str()
                continue
            forged = record_mac.problem(msg)
            if forged:
                # not the gateway's (no valid MAC of this VM's key): never into the guest.
                # Skipping is deterministic, so a new primary skips it again.  Counted
                # in the serving report (inputs_forged).
                self.forged += 1
                continue
            packet = (msg.value() or b"")[:NIC_MTU]
            while self.held_back is not None and self.held_back() and \
                    not self._stop.is_set():
                time.sleep(0.01)
            while not self._stop.is_set():
                with self._lock:
                    if machine.nic_push(packet):
                        self._pushed.append(msg.offset())
                        self.consumed += 1
                        break
                time.sleep(0.002)     # the NIC queue is full: the guest is behind

    def delivered(self, events: list[dict]) -> int:
        """Account for the Dma events of a slice; the next undelivered offset."""
        with self._lock:
            for ev in events:
                if ev["kind"] == "Dma":
                    self.next_offset = self._pushed.popleft() + 1
        return self.next_offset

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.consumer.close()


class AckWatch:
    """What each backup has acked receiving, read from .acks (for `--commit backups:N`)."""

    def __init__(self, bootstrap: str, vm: str):
        self.topic = topics(vm).acks
        self.consumer = Consumer(dict(client_conf(bootstrap, client_id(vm, "recorder")), **{
            "group.id": f"kvmrr.{vm}.ackwatch", "enable.auto.commit": False,
            "fetch.wait.max.ms": TAIL_FETCH_WAIT_MS, "auto.offset.reset": "earliest"}))
        self.consumer.assign([TopicPartition(self.topic, 0, absolute_start(OFFSET_BEGINNING))])
        self.received: dict[str, int] = {}
        self.forged = 0      # acks without this VM's valid MAC (kvmrr_log.record_mac)
        self.replayed: dict[str, tuple[int, int]] = {}   # (icount, wall_ns it was sent)
        # one entry per backup id, at most MAX_BACKUPS: a new id beyond that evicts the
        # one heard from longest ago (which can only hold outputs back, never release one)

    def poll(self) -> None:
        for msg in self.consumer.consume(500, 0):
            if msg.error():
                continue
            if record_mac.problem(msg):
                self.forged += 1   # ignored and counted: a forged ack would release outputs
                continue
            try:
                ack = decode_message(msg.value() or b"", msg.headers() or [])
            except LogFormatError:
                continue      # not ours to judge: the ack only ever holds outputs back
            if ack.get("kind") == "Ack":
                b = ack["backup_id"]
                if b not in self.received and len(self.received) >= MAX_BACKUPS:
                    stale = min(self.replayed, key=lambda k: self.replayed[k][1])
                    del self.received[stale], self.replayed[stale]
                self.received[b] = max(self.received.get(b, -1), ack["received_icount"])
                before = self.replayed.get(b, (-1, 0))[0]
                self.replayed[b] = (max(before, ack["replayed_icount"]), ack["wall_ns"])

    def acked_icount(self, n: int) -> int:
        """The icount up to which at least n backups have received the log (-1: none)."""
        got = sorted(self.received.values(), reverse=True)
        return got[n - 1] if len(got) >= n else -1

    def best_replayed(self, live_s: float, exclude: str | None = None) -> int:
        """The furthest icount replayed by a backup that acked within the last live_s
        seconds (by the ack's own clock: old acks read from the topic's start are not
        news), other than `exclude`; -1: none."""
        oldest = time.time_ns() - int(live_s * 1e9)
        live = [icount for b, (icount, sent) in self.replayed.items()
                if sent >= oldest and b != exclude]
        return max(live, default=-1)

    def close(self) -> None:
        self.consumer.close()


def input_position(bootstrap: str, vm: str) -> int:
    """The next_input_offset of the last EventBatch in the log's history that has one (0
    if none): where a new primary resumes when its own replay saw no batch saying it."""
    from kvmrr_log.topic_reader import LogTopicReader
    reader = LogTopicReader(bootstrap, vm, topics(vm).log, OFFSET_BEGINNING,   # epoch rule
                            role="recorder")
    position = 0
    try:
        for record, _ in reader.records(0):
            if record["kind"] == "EventBatch" and record.get("next_input_offset", -1) >= 0:
                position = record["next_input_offset"]
    finally:
        reader.close()
    return position
