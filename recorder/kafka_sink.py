"""A RecordSession sink that publishes the log to Kafka (DESIGN §4).

The vCPU loop never waits for the broker: write() collects a slice's records and commit()
hands them to a publisher thread, which writes each slice in one transaction of an
idempotent, transactional producer whose transactional.id comes from the VM alone (a new
recorder fences an old one).  A Snapshot goes in a transaction of its own, chunked, and
carries the log offset where the events after it start, so a late backup can seek there.
A fatal error (fenced, or the broker unreachable past the timeout) is raised by the next
commit() on the vCPU thread.
"""
from __future__ import annotations

import queue
import threading
import time

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from kvmrr.kafkalog import (SNAPSHOT_CHUNK_BYTES, WRITER_HEADER, KafkaLogError, client_conf,
                            ensure_topics, transactional_id)
from schemas import encode_message, icount_key, split_snapshot

TXN_RETRY_S = 30.0


class KafkaSink:
    def __init__(self, bootstrap: str, vm: str, *, max_pending: int = 2000):
        self.bootstrap = bootstrap
        self.vm = vm
        self.topics = ensure_topics(bootstrap, vm)
        self.txn_id = transactional_id(vm)
        conf = dict(client_conf(bootstrap), **{
            "transactional.id": self.txn_id, "enable.idempotence": True, "acks": "all",
            "linger.ms": 1, "transaction.timeout.ms": 60000, "message.max.bytes": 2 << 20,
            "compression.type": "lz4",   # snapshots are mostly zero pages
        })
        self.producer = Producer(conf)
        try:
            self.producer.init_transactions(10)
        except KafkaException as exc:
            raise KafkaLogError(f"cannot start the transactional producer {self.txn_id} at "
                                f"{bootstrap}: {exc.args[0].str()}") from None
        # A takeover appends to a log that already has messages: learn where it ends.
        self.next_log_offset = self._log_end()
        self._slice: list[dict] = []
        self._units: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: Exception | None = None
        self._last_log_offset = -1   # where the next log message lands is known exactly
                                     # once the previous transaction has committed
        self.commit_latencies: list[float] = []   # seconds, slice handed over -> committed
        self.bytes_published = 0
        self.messages = 0
        self._thread = threading.Thread(target=self._publish_loop, name="kvmrr-publisher",
                                         daemon=True)
        self._thread.start()

    def _log_end(self) -> int:
        c = Consumer(dict(client_conf(self.bootstrap), **{"group.id": "kvmrr-recorder-probe",
                                                          "enable.auto.commit": False}))
        try:
            _, high = c.get_watermark_offsets(TopicPartition(self.topics.log, 0), timeout=10)
        except KafkaException as exc:
            raise KafkaLogError(f"cannot read the end of {self.topics.log}: "
                                f"{exc.args[0].str()}") from None
        finally:
            c.close()
        return max(high, 0)

    # -- vCPU thread ------------------------------------------------------------------
    def write(self, record: dict) -> None:
        self._slice.append(record)

    def commit(self) -> None:
        if self.error:
            raise self.error
        if self._slice:
            self._units.put((time.monotonic(), self._slice))
            self._slice = []

    def close(self) -> None:
        self.commit()
        self._units.put(None)
        self._thread.join()
        if self.error:
            raise self.error

    # -- publisher thread ---------------------------------------------------------------
    def _delivered(self, err, msg) -> None:
        if err is None and msg.topic() == self.topics.log:
            self._last_log_offset = max(self._last_log_offset, msg.offset())

    def _produce(self, topic: str, record: dict, key: bytes) -> None:
        value, headers = encode_message(record)
        headers.append((WRITER_HEADER, self.txn_id.encode()))
        self.bytes_published += len(value)
        self.messages += 1
        while True:
            try:
                self.producer.produce(topic, value, key, headers=headers,
                                      on_delivery=self._delivered)
                return
            except BufferError:
                self.producer.poll(0.05)

    def _fail(self, err) -> KafkaLogError:
        fenced = " (fenced by a newer recorder of this VM)" if "FENCED" in err.name() else ""
        return KafkaLogError(f"the recorder's producer {self.txn_id} failed: {err.str()}{fenced}")

    def _commit(self, deadline: float) -> None:
        """commit_transaction, retried as librdkafka asks: a retriable error means the
        outcome is not known yet, so the same commit is called again (never aborted)."""
        while True:
            try:
                self.producer.commit_transaction(TXN_RETRY_S)
                return
            except KafkaException as exc:
                err = exc.args[0]
                if err.retriable() and not err.txn_requires_abort() \
                        and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                raise

    def _transaction(self, produce_all) -> None:
        """One transaction; aborted and redone when the producer says it must be, until
        TXN_RETRY_S has passed; a fatal error (fenced) ends the recording."""
        deadline = time.monotonic() + TXN_RETRY_S
        while True:
            try:
                self.producer.begin_transaction()
                produce_all()
                self._commit(deadline)
                if self._last_log_offset >= 0:
                    # the commit marker follows the last message
                    self.next_log_offset = self._last_log_offset + 2
                return
            except KafkaException as exc:
                err = exc.args[0]
                if err.fatal() or time.monotonic() > deadline:
                    raise self._fail(err) from None
                if err.txn_requires_abort():
                    self.producer.abort_transaction(TXN_RETRY_S)
                    continue
                raise self._fail(err) from None

    def _publish_unit(self, records: list[dict]) -> None:
        pending: list[dict] = []

        def flush_log():
            for rec in pending:
                first = rec["events"][0]["icount"] if rec["kind"] == "EventBatch" else 0
                self._produce(self.topics.log, rec, icount_key(first))

        for rec in records:
            if rec["kind"] == "Snapshot":
                if pending:
                    self._transaction(flush_log)
                    pending = []
                snap = dict(rec, log_offset=self.next_log_offset)
                chunks = split_snapshot(snap, SNAPSHOT_CHUNK_BYTES)
                self._transaction(lambda: [self._produce(self.topics.snapshots, c,
                                                         icount_key(c["icount"]))
                                           for c in chunks])
            else:
                pending.append(rec)
        if pending:
            self._transaction(flush_log)

    def _publish_loop(self) -> None:
        """Group commit: every slice waiting when a transaction starts goes into it, so a
        slow commit does not leave the publisher behind the vCPU."""
        done = False
        while not done:
            units = [self._units.get()]
            while True:
                try:
                    units.append(self._units.get_nowait())
                except queue.Empty:
                    break
            if units[-1] is None:
                done = True
                units.pop()
            if self.error or not units:
                continue
            try:
                self._publish_unit([rec for _, records in units for rec in records])
                now = time.monotonic()
                self.commit_latencies.extend(now - handed for handed, _ in units)
            except Exception as exc:   # surfaced on the vCPU thread by commit()
                self.error = exc
