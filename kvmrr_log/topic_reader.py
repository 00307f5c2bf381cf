"""Reading the log on Kafka: the header, the snapshots, and the events from an offset.

Every consumer reads what is committed (replicated: below the high watermark).  Every
record must carry the VM's writer header; anything else (a stranger's record, an
undecodable value, an unknown schema) stops the reader with an error that names the topic
and the offset, before the record reaches the replay.  On the log, the epoch rule
(kvmrr_log.epochs) decides which records are history: void ones never leave the reader,
and only valid snapshots are offered as starting points.
"""
from __future__ import annotations

import copy
import time
import uuid
from typing import Callable, Iterator

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from kvmrr_log import kafka_config, record_mac
from kvmrr_log.epochs import SHORT_FETCH_WAIT_MS, EpochRule, EpochTail
from kvmrr_log.kafka import (CONNECT_TIMEOUT_S, WRITER_HEADER, KafkaLogError, absolute_start,
                             admin_client, client_conf, client_id, cluster_size, topics,
                             watermarks, writer_id)
from schemas import LogFormatError, decode_message, join_snapshot


FETCH_TIMEOUT_S = 15.0


class EndOfLog(Exception):
    """The reader reached the end of what is committed so far."""


class LogTopicReader:
    """One partition of one topic, read in order from an offset.  On the VM's log it
    applies the epoch rule from `epoch`, the epoch at that offset (0 at the start, a
    snapshot's own): next() returns history only, accepted Epoch records included."""

    def __init__(self, bootstrap: str, vm: str, topic: str, offset: int = OFFSET_BEGINNING,
                 epoch: int = 0, role: str = "reader"):
        """role: who reads, for the client.id (kvmrr_log.kafka.client_id)."""
        self.topic = topic
        self.writer = writer_id(vm).encode()
        self.rule = EpochRule(epoch, topic) if topic == topics(vm).log else None
        conf = dict(client_conf(bootstrap, client_id(vm, role)), **{
            "group.id": f"kvmrr-reader-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
            "isolation.level": "read_committed", "enable.partition.eof": True,
            "auto.offset.reset": "earliest", "fetch.wait.max.ms": 20,
        })
        self.consumer = Consumer(conf)
        self.consumer.assign([TopicPartition(topic, 0, absolute_start(offset))])
        self.offset = offset
        self.at_end = False     # the last poll found the committed end, nothing since
        self._end = -1
        self._end_moved = time.monotonic()

    def silence(self) -> float:
        """Seconds since the end of the partition last moved, as the consumer's fetches
        see it (the high watermark: replicated records only): how long the writer has been silent,
        however far behind the reading is."""
        try:
            _, end = self.consumer.get_watermark_offsets(TopicPartition(self.topic, 0),
                                                         cached=True)
        except KafkaException:
            end = self._end
        now = time.monotonic()
        if end != self._end:
            self._end, self._end_moved = end, now
        return now - self._end_moved

    def ask_end(self, timeout: float) -> int:
        """The partition's end as its leader says it now (a round trip); KafkaLogError if
        the leader does not answer within timeout."""
        try:
            return self.consumer.get_watermark_offsets(TopicPartition(self.topic, 0),
                                                       timeout=timeout, cached=False)[1]
        except KafkaException as exc:
            raise KafkaLogError(f"cannot read the end of {self.topic}: "
                                f"{exc.args[0].str()}") from None

    def close(self) -> None:
        self.consumer.close()

    def next(self, timeout: float) -> tuple[dict, int] | None:
        """(record, offset), None on timeout; raises EndOfLog at the committed end."""
        msg = self.consumer.poll(timeout)
        if msg is None:
            return None
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                self.at_end = True
                raise EndOfLog()
            raise KafkaLogError(f"{self.topic}: {err.str()}")
        self.at_end = False
        offset = msg.offset()
        headers = dict(msg.headers() or [])
        if headers.get(WRITER_HEADER) != self.writer:
            raise KafkaLogError(f"{self.topic} offset {offset}: record not written by this "
                                f"VM's recorder (no {WRITER_HEADER} header of "
                                f"{self.writer.decode()}): refusing it")
        forged = record_mac.problem(msg)
        if forged:
            raise KafkaLogError(f"{self.topic} offset {offset}: {forged}: refusing it")
        try:
            record = decode_message(msg.value() or b"", msg.headers() or [])
        except LogFormatError as exc:
            raise KafkaLogError(f"{self.topic} offset {offset}: {exc}") from None
        self.offset = offset + 1
        if self.rule is not None and not self.rule.admit(record, offset):
            return None      # void: an older epoch's writer after the seal, a lost sealer
        return record, offset

    @property
    def epoch(self) -> int:
        """The epoch at the reading position (the log only)."""
        return self.rule.epoch if self.rule is not None else 0

    def records(self, idle_timeout: float | None,
                stop_when: Callable[[], bool] | None = None, poll_s: float = 0.05
                ) -> Iterator[tuple[dict, int]]:
        """Records in order.  idle_timeout 0: up to the committed end (the broker must say
        where that is within FETCH_TIMEOUT_S); S > 0: until S seconds pass without a new
        record; None: forever.  stop_when(), asked every poll_s s while nothing comes, may
        end it earlier."""
        idle_since = time.monotonic()
        to_end = idle_timeout is not None and idle_timeout <= 0
        while True:
            try:
                got = self.next(poll_s)   # also how often stop_when is asked
            except EndOfLog:
                if to_end:
                    return
                got = None
            if got is None:
                quiet = time.monotonic() - idle_since
                if to_end and quiet > FETCH_TIMEOUT_S:
                    raise KafkaLogError(f"{self.topic} offset {self.offset}: the broker sent "
                                        f"neither records nor the end within "
                                        f"{FETCH_TIMEOUT_S:.0f} s")
                if not to_end and idle_timeout is not None and quiet > idle_timeout:
                    return
                if stop_when is not None and stop_when():
                    return
                continue
            idle_since = time.monotonic()
            yield got


def check_log_exists(bootstrap: str, vm: str) -> None:
    admin = admin_client(bootstrap, client_id(vm, "admin"))
    cluster_size(admin, bootstrap)
    if topics(vm).log not in admin.list_topics(timeout=CONNECT_TIMEOUT_S).topics:
        hidden = (" or this principal may not see it" if kafka_config.current().path
                  else "")   # a topic one may not describe is not listed (ACLs)
        raise KafkaLogError(f"no log for VM {vm!r} at {bootstrap} (topic {topics(vm).log} "
                            f"does not exist{hidden})")


def read_header(bootstrap: str, vm: str, timeout: float = 15.0, role: str = "reader") -> dict:
    check_log_exists(bootstrap, vm)
    reader = LogTopicReader(bootstrap, vm, topics(vm).log, role=role)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got = reader.next(0.5)
            except EndOfLog:
                got = None
            if got:
                record, offset = got
                if record["kind"] != "LogHeader":
                    raise KafkaLogError(f"{reader.topic} offset {offset}: the log does not "
                                        f"start with a LogHeader but a {record['kind']}")
                return record
        raise KafkaLogError(f"{reader.topic}: no committed LogHeader within {timeout:.0f} s")
    finally:
        reader.close()


def read_snapshots(bootstrap: str, vm: str, timeout: float = 15.0, *,
                   start: str | None = None, until: int | None = None,
                   role: str = "reader") -> list[dict]:
    """The complete, valid snapshots committed so far, joined, in log order (valid: its log
    offset precedes the next epoch's Epoch record, kvmrr_log.epochs): every one, or with
    start ("first" or "latest") only the one a replay from there would choose (the first,
    or the last at or before icount until), so that a long log's snapshots are not all
    held in memory at once.

    The epochs are read before the snapshots, to choose among valid ones only, and again
    after (by the same tail: only what came meanwhile): a takeover sealing meanwhile may
    void the one chosen, and then it is read anew."""
    tail = EpochTail(bootstrap, topics(vm).log, fetch_wait_ms=SHORT_FETCH_WAIT_MS)
    try:
        for _ in range(3):
            before = copy.deepcopy(tail.read_to_end(timeout))
            snaps = _read_snapshots(bootstrap, vm, timeout, start, until, role,
                                    before.snapshot_valid)
            after = tail.read_to_end(timeout)
            if all(after.snapshot_valid(s) for s in snaps):
                return snaps
    finally:
        tail.close()
    raise KafkaLogError(f"kvmrr.{vm}: the log's epochs kept changing while its snapshots "
                        "were read")


def _read_snapshots(bootstrap: str, vm: str, timeout: float, start: str | None,
                    until: int | None, role: str, valid: Callable[[dict], bool]) -> list[dict]:
    reader = LogTopicReader(bootstrap, vm, topics(vm).snapshots, role=role)
    snaps, chunks = [], []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got = reader.next(0.5)
            except EndOfLog:
                break
            if got is None:
                continue
            record, offset = got
            if record["kind"] != "Snapshot":
                raise KafkaLogError(f"{reader.topic} offset {offset}: a {record['kind']} on "
                                    "the snapshot topic")
            if record["chunk"] == 0:
                chunks = []
            chunks.append(record)
            if len(chunks) == record["chunks"]:
                try:
                    snap = join_snapshot(chunks)
                    if valid(snap) and start is None:
                        snaps.append(snap)
                    elif valid(snap) and (until is None or snap["icount"] <= until) \
                            and (start == "latest" or not snaps):
                        snaps[:] = [snap]
                except LogFormatError as exc:
                    raise KafkaLogError(f"{reader.topic} offset {offset}: {exc}") from None
                chunks = []
    except KafkaException as exc:
        raise KafkaLogError(f"{reader.topic}: {exc.args[0].str()}") from None
    finally:
        reader.close()
    return snaps


def log_has_ended(bootstrap: str, vm: str, epoch: int, tail: int = 32,
                  role: str = "reader") -> bool:
    """Whether the committed log ends with an End event of the current `epoch` or a later
    one (looking at its last few offsets): a log that fell silent because it is finished
    needs no takeover."""
    topic = topics(vm).log
    low, high = watermarks(bootstrap, topic, client_id=client_id(vm, role))
    reader = LogTopicReader(bootstrap, vm, topic, max(low, high - tail), epoch, role=role)
    last = None
    try:
        for record, _ in reader.records(0):
            if record["kind"] != "Epoch":
                last = record
    finally:
        reader.close()
    return bool(last and last["kind"] == "EventBatch" and last["events"]
                and last["events"][-1]["kind"] == "End")
