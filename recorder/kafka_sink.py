"""A RecordSession sink that publishes the log to Kafka (docs/ARCHITECTURE.md §4.5).

The vCPU loop never waits for the broker: write() collects a slice's records and commit()
hands them to a publisher thread, which writes each slice in one transaction of an
idempotent, transactional producer whose transactional.id comes from the VM alone (a new
recorder fences an old one).  A Snapshot goes in a transaction of its own, chunked, and
carries the log offset where the events after it start, so a late backup can seek there.
A fatal error (fenced, or the broker unreachable past the timeout) is raised by the next
commit() on the vCPU thread.

Serving (docs/ARCHITECTURE.md §5), the same transactions also carry the responses the
commit policy releases to .out (the position on .in is in the log's own batches).  A
response is therefore visible to read_committed clients exactly when the log up to it is
committed, and never from a fenced primary.
"""
from __future__ import annotations

import queue
import threading
import time
import warnings

from confluent_kafka import KafkaError, KafkaException, Producer

from kvmrr_log.kafka import (SNAPSHOT_CHUNK_BYTES, WRITER_HEADER, FencedError, KafkaLogError,
                            client_conf, ensure_topics, recorder_transactional_ids, topics,
                            transactional_id, watermarks)
from recorder import metrics
from recorder.service import AckWatch, CommitPolicy, released_seq
from schemas import encode_message, icount_key, split_snapshot

TXN_RETRY_S = 30.0
INIT_TIMEOUT_S = 10.0
FENCE_ATTEMPT_S = 0.05     # see init_transactional_producer
RELEASE_POLL_S = 0.005     # backups:N: how often held responses look at the acks
NIC = 1                    # the output channel of responses


def init_transactional_producer(conf: dict, timeout: float) -> Producer:
    """A producer for conf's transactional.id, initialised: every older producer of that
    id is fenced, and a transaction it left open is aborted.

    Aborting takes the coordinator 100-300 ms here, and meanwhile it answers
    CONCURRENT_TRANSACTIONS, which librdkafka retries only after a fixed 500 ms (its PID
    timer, not configurable).  That is most of a takeover when the dead primary was in a
    transaction, as it usually is.  So ask in short attempts, each with a fresh producer,
    and drop one that is waiting out the timer; the next one is created during the
    attempt before it, so it has already connected (that alone takes ~60 ms).  A dropped
    attempt still in flight could at worst bump the epoch once more and fence this
    producer; that costs the takeover, never safety (a fenced producer commits nothing)."""
    deadline = time.monotonic() + timeout
    attempt = FENCE_ATTEMPT_S
    producer = Producer(conf)
    while True:
        spare = Producer(conf)       # connects in the background meanwhile
        left = deadline - time.monotonic()
        try:
            producer.init_transactions(max(0.01, min(attempt, left)))
            _drop(spare)
            return producer
        except KafkaException as exc:
            if not exc.args[0].retriable() or time.monotonic() >= deadline:
                _drop(spare)
                raise
        _drop(producer)
        producer = spare
        attempt = min(attempt * 1.2, 2.0)   # a slow or moving broker needs longer ones


def _init_all(confs: list[dict], bootstrap: str) -> list[Producer]:
    """init_transactional_producer for each conf at once (a takeover waits for them)."""
    results: list = [None] * len(confs)

    def init(i: int) -> None:
        try:
            results[i] = init_transactional_producer(confs[i], INIT_TIMEOUT_S)
        except KafkaException as exc:
            results[i] = exc
    threads = [threading.Thread(target=init, args=(i,)) for i in range(len(confs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [(c, r) for c, r in zip(confs, results) if isinstance(r, KafkaException)]
    if failed:
        for r in results:
            if isinstance(r, Producer):
                _drop(r)
        conf, exc = failed[0]
        raise KafkaLogError(f"cannot start the transactional producer "
                            f"{conf['transactional.id']} at {bootstrap}: "
                            f"{exc.args[0].str()}")
    return results


def _drop(producer: Producer) -> None:
    producer.close()


# a dropped fence attempt is closed mid-init_transactions, which confluent-kafka reports as
# a RuntimeWarning; expected there (and a filter, unlike catch_warnings, is thread-safe)
warnings.filterwarnings("ignore", message="Producer abort_transaction failed during close",
                        category=RuntimeWarning)


class KafkaSink:
    def __init__(self, bootstrap: str, vm: str, *, max_pending: int = 2000,
                 serve: bool = False, policy: CommitPolicy = CommitPolicy(),
                 takeover: bool = False):
        """takeover: the log exists (a backup taking over): skip the topic check, every
        millisecond here is failover time."""
        self.bootstrap = bootstrap
        self.vm = vm
        self.topics = topics(vm) if takeover else ensure_topics(bootstrap, vm)
        self.txn_id = transactional_id(vm)       # the writer, in every record's header
        conf = dict(client_conf(bootstrap), **{
            "enable.idempotence": True, "acks": "all",
            "linger.ms": 1, "transaction.timeout.ms": 60000, "message.max.bytes": 2 << 20,
            "compression.type": "lz4",   # snapshots are mostly zero pages
            "error_cb": self._client_error,
        })
        self._fatal = None          # the error that made a producer unusable
        t0 = time.monotonic()
        self._producers = _init_all([dict(conf, **{"transactional.id": t})
                                     for t in recorder_transactional_ids(vm)], bootstrap)
        self._turn = 0
        t1 = time.monotonic()
        # A takeover appends to a log that already has messages: learn where it ends.
        self.next_log_offset = self._log_end()
        t2 = time.monotonic()
        self.serving = serve
        self.policy = policy
        self._held: list[tuple[float, dict]] = []   # (slice began, Output) not released
        # after the fence above nothing more reaches .out behind our back: what is there
        # is released for good and must never be released again
        # (docs/ARCHITECTURE.md §6.6)
        self.released_seq = released_seq(bootstrap, vm) if serve else -1
        self.start_ms = {"init_transactions": round((t1 - t0) * 1000, 1),
                         "log_end": round((t2 - t1) * 1000, 1),
                         "released_seq": round((time.monotonic() - t2) * 1000, 1)}
        self.acks = AckWatch(bootstrap, vm) if serve and policy.backups else None
        self.output_latencies: list[float] = []     # s, its slice began -> released
        self._slice_began = time.monotonic()
        self.outputs_released = 0
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
        return max(watermarks(self.bootstrap, self.topics.log)[1], 0)

    # -- vCPU thread ------------------------------------------------------------------
    def write(self, record: dict) -> None:
        self._slice.append(record)

    def hold(self, outputs: list[dict]) -> None:
        """Responses already in the log but not released (a takeover found them while
        catching up): they leave under this sink's policy, before any new one."""
        now = time.monotonic()
        self._held.extend((now, o) for o in outputs
                          if o["channel"] == NIC and o["seq"] > self.released_seq)

    def commit(self) -> None:
        if self.error:
            raise self.error
        # slices are back to back: this commit ends one and starts the next, so a response
        # in this slice was produced after `began` (its commit latency counts from there:
        # at most one slice more than its true age)
        now = time.monotonic()
        began, self._slice_began = self._slice_began, now
        if self._slice:
            self._units.put((now, self._slice, began))
            self._slice = []

    def close(self) -> None:
        self.commit()
        self._units.put(None)
        self._thread.join()
        if self.acks:
            self.acks.close()
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

    def _client_error(self, err) -> None:
        if err.fatal():
            self._fatal = err

    def _fail(self, err) -> KafkaLogError:
        if err.code() == KafkaError._FATAL:
            try:
                self.producer.poll(0)   # serves error_cb, which names the fatal error
            except KafkaException as exc:   # ... or raises it
                self._fatal = exc.args[0]
        if err.code() == KafkaError._FATAL and self._fatal is not None:
            err = self._fatal       # "Local: Fatal error" from produce(): say which
        if "FENCED" in err.name() or err.code() == KafkaError.INVALID_PRODUCER_EPOCH:
            return FencedError(f"fenced: a newer primary of VM {self.vm} took over "
                               f"({self.txn_id}: {err.str()}); this recorder stops and "
                               "releases nothing more")
        return KafkaLogError(f"the recorder's producer {self.txn_id} failed: {err.str()}")

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

    @property
    def producer(self) -> Producer:
        """The producer whose turn it is (they take turns, a transaction each)."""
        return self._producers[self._turn]

    def _transaction(self, produce_all) -> None:
        """One transaction; aborted and redone when the producer says it must be, until
        TXN_RETRY_S has passed; a fatal error (fenced) ends the recording.  The next one
        starts only once this one's commit has returned, so the log's order is the
        transactions' order even though several producers take turns."""
        deadline = time.monotonic() + TXN_RETRY_S
        while True:
            try:
                self.producer.begin_transaction()
                produce_all()
                self._commit(deadline)
                if self._last_log_offset >= 0:
                    # where the next message can land at the earliest (commit markers of
                    # any producer may come first: a reader seeking there skips them)
                    self.next_log_offset = self._last_log_offset + 1
                self._turn = (self._turn + 1) % len(self._producers)
                return
            except KafkaException as exc:
                err = exc.args[0]
                if err.fatal() or time.monotonic() > deadline:
                    raise self._fail(err) from None
                if err.txn_requires_abort():
                    self.producer.abort_transaction(TXN_RETRY_S)
                    continue
                raise self._fail(err) from None

    def _releasable(self) -> list[tuple[float, dict]]:
        """The held responses the policy lets go now, a prefix in seq order."""
        if not self._held:
            return []
        if not self.policy.backups:
            return list(self._held)    # their log is in this very transaction
        self.acks.poll()
        acked = self.acks.acked_icount(self.policy.backups)
        n = 0
        while n < len(self._held) and self._held[n][1]["icount"] <= acked:
            n += 1
        return self._held[:n]

    def _release(self, releasing: list[tuple[float, dict]]) -> None:
        """Inside a transaction: the responses it releases."""
        for _, out in releasing:
            self._produce(self.topics.outputs, out, str(out["seq"]).encode())

    def _released(self, releasing: list[tuple[float, dict]]) -> None:
        """After the commit: the responses are out."""
        if releasing:
            now = time.monotonic()
            del self._held[:len(releasing)]
            self.released_seq = releasing[-1][1]["seq"]
            self.outputs_released += len(releasing)
            latencies = [now - began for began, _ in releasing]
            self.output_latencies.extend(latencies)
            hist = metrics.OUTPUT_COMMIT_SECONDS.labels(self.vm, str(self.policy))
            for seconds in latencies:
                hist.observe(seconds)
            metrics.RESPONSES_RELEASED.labels(self.vm).inc(len(releasing))

    def _publish_unit(self, units: list) -> None:
        pending: list[dict] = []
        records = [rec for _, recs, _ in units for rec in recs]
        if self.serving:
            for _, recs, began in units:
                for rec in recs:
                    if rec["kind"] == "EventBatch":
                        self._held.extend(
                            (began, dict(ev, kind="Output")) for ev in rec["events"]
                            if ev["kind"] == "Output" and ev["channel"] == NIC
                            and ev["seq"] > self.released_seq)

        def flush_log(releasing=None):
            for rec in pending:
                first = rec["events"][0]["icount"] if rec["kind"] == "EventBatch" else 0
                self._produce(self.topics.log, rec, icount_key(first))
            if releasing:
                self._release(releasing)

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
        releasing = self._releasable() if self.serving else []
        if pending or releasing:
            self._transaction(lambda: flush_log(releasing))
            self._released(releasing)

    def _release_waiting(self) -> None:
        """backups:N with no new slice: let out what the acks allow now."""
        releasing = self._releasable()
        if releasing:
            self._transaction(lambda: self._release(releasing))
            self._released(releasing)

    def _next_units(self) -> list:
        waiting = self.acks is not None and bool(self._held)
        try:
            units = [self._units.get(timeout=RELEASE_POLL_S if waiting else None)]
        except queue.Empty:
            return []
        while True:
            try:
                units.append(self._units.get_nowait())
            except queue.Empty:
                return units

    def _publish_loop(self) -> None:
        """Group commit: every slice waiting when a transaction starts goes into it, so a
        slow commit does not leave the publisher behind the vCPU."""
        done = False
        while not done:
            units = self._next_units()
            if units and units[-1] is None:
                done = True
                units.pop()
            if self.error:
                continue
            try:
                if units:
                    self._publish_unit(units)
                    now = time.monotonic()
                    self.commit_latencies.extend(now - handed for handed, _, _ in units)
                elif self.acks is not None:
                    self._release_waiting()
                if done:
                    self._drain_held()
            except Exception as exc:   # surfaced on the vCPU thread by commit()
                self.error = exc

    def _drain_held(self) -> None:
        """The recording ended: responses still held wait for their acks, for a while."""
        deadline = time.monotonic() + TXN_RETRY_S
        while self._held and self.acks is not None:
            self._release_waiting()
            if time.monotonic() > deadline:
                raise KafkaLogError(f"{len(self._held)} responses never released: fewer than "
                                    f"{self.policy.backups} backups acked their log within "
                                    f"{TXN_RETRY_S:.0f} s")
            time.sleep(RELEASE_POLL_S)
