"""A RecordSession sink that publishes the log to Kafka (docs/ARCHITECTURE.md §4-6).

The vCPU loop never waits for the broker: write() collects a slice's records and commit()
hands them to a publisher thread.  Commit is an idempotent acks=all write: a record is
readable only once it is replicated, so a delivered record is committed.  No transactions:
the log is its own arbiter.  Every record carries this primary's epoch, and the epoch rule
(kvmrr_log.epochs) voids what an old primary writes after a newer epoch's Epoch record.

Pipelined (docs/ARCHITECTURE.md §4.5): the publisher produces each slice as it comes and
does not wait for the previous one's acks; the idempotent producer keeps the order (and
no duplicates), with one request in flight per broker (WRITER_SETTINGS): what is produced
meanwhile goes in the next one.  A delivery thread serves the producer's delivery
reports: each log record is committed when ITS report comes, and the responses it carries
are released then.  A slice with output (it ends at its first response) is produced at
once; idle slices wait up to IDLE_BATCH_S to go together.

A Snapshot is written (chunked, on its own topic, by a producer of its own so that its
megabytes never queue ahead of a log write on the same broker connection) once every log
record before it is delivered, and carries the log offset where the events after it
start, and its epoch.  A snapshot thread waits for those deliveries and encodes it: the
publisher goes on with the slices after it (a periodic snapshot of 8 MiB used to stall
the log's writes, and every response behind them, for tens of ms; docs/ARCHITECTURE.md
§4.5).  At most SNAPSHOTS_PENDING wait at once; then the publisher waits too.

Serving (docs/ARCHITECTURE.md §5), responses leave through kvmrr.<vm>.out, each carrying
this epoch and the log offset of the record that holds it; the gateway passes one on only
if that record precedes the next epoch's Epoch record.  The policy decides when: `log` once
its record is delivered, `backups:N` once N backups' acks cover its icount.  Releases have
a producer of their own, so that they never wait behind a log write, nor it behind them.

A thread watches the log's tail for Epoch records: one newer than this primary's epoch
means it was sealed out; it releases nothing more and the next commit() raises FencedError
(exit 3).  A fatal producer error, or the broker unreachable past the timeout, is raised
by the next commit() too.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from typing import Callable

from confluent_kafka import KafkaException, Producer

from kvmrr_log import record_mac
from kvmrr_log.epochs import EpochBounds, EpochTail, ReleaseTail, valid_releases
from kvmrr_log.kafka import (LOG_MESSAGE_BYTES, SNAPSHOT_CHUNK_BYTES, WRITER_HEADER,
                             FencedError, KafkaLogError, client_conf, client_id, ensure_topics,
                             topics, watermarks, writer_id)
from kvmrr_log.reservoir import DEFAULT_SIZE, Reservoir
from recorder import metrics
from recorder.service import AckWatch, CommitPolicy
from schemas import encode_message, icount_key, split_snapshot

DELIVERY_TIMEOUT_S = 30.0  # a write not acknowledged by then ends the recording
SEAL_TIMEOUT_S = 5.0       # a takeover's Epoch record; Kafka moving: follow again instead
CONNECT_WARM_S = 5.0
RELEASE_POLL_S = 0.005     # backups:N: how often held responses look at the acks
DELIVERY_POLL_S = 0.05     # the delivery thread wakes at once for a report; this bounds
                           # how long it takes to notice close()
IDLE_BATCH_S = 0.03        # slices without output wait this long at most to go together
SNAPSHOTS_PENDING = 2      # snapshots handed over and not yet produced (their memory)
FENCE_WATCH_S = 0.02       # how often the log's tail is asked for a newer epoch
# For the tests: a primary that learns of a newer epoch this many seconds late (as one
# whose reads of the log's tail lag), so it keeps writing and releasing after the seal:
# what it writes then must be void for every reader.
WATCH_LAG_S = float(os.environ.get("KVMRR_TEST_EPOCH_WATCH_LAG_S", "0") or 0)
NIC = 1                    # the output channel of responses
# The primary's producers (log, .out, snapshots): kept apart from client_conf (the
# connection and security settings every client shares).  One request in flight per broker:
# a broker reads the next request of a connection only once it has answered the one before
# (an acks=all produce: once the followers have it), so more in flight only wait in its
# socket, one slice each; with one, the slices that come meanwhile go together in the next
# request (group commit), and the brokers spend about half the CPU per slice (measured,
# docs/ARCHITECTURE.md §4.5).  No Nagle delay on the small log writes.
WRITER_SETTINGS = {
    "enable.idempotence": True, "acks": "all", "linger.ms": 0,
    "max.in.flight.requests.per.connection": 1,
    "socket.nagle.disable": True,
    "message.max.bytes": LOG_MESSAGE_BYTES,
    "delivery.timeout.ms": int(DELIVERY_TIMEOUT_S * 1000),
    "compression.type": "lz4",   # snapshots are mostly zero pages
}
MAX_HELD = 10_000          # responses held for release before the inputs wait


class KafkaSink:
    def __init__(self, bootstrap: str, vm: str, *, max_pending: int = 2000,
                 serve: bool = False, policy: CommitPolicy = CommitPolicy(),
                 epoch: int = 0, takeover: bool = False,
                 latency_samples: int | None = DEFAULT_SIZE):
        """epoch: this primary's (0 for `kvmrr record`; a takeover's is set by seal(),
        before anything else is written).  takeover: the log exists, skip the topic check
        (every millisecond here is failover time).  latency_samples: the commit and
        release latencies are a bounded uniform sample of this many (kvmrr_log.reservoir);
        None keeps every one, in order (benchmarks of a bounded run)."""
        self.bootstrap = bootstrap
        self.vm = vm
        self.epoch = epoch
        self.topics = topics(vm) if takeover else ensure_topics(bootstrap, vm)
        self.writer = writer_id(vm)
        self.producer = Producer(dict(client_conf(bootstrap, client_id(vm, "recorder")),
                                      **WRITER_SETTINGS, **self.log_producer_extra()))
        self._snap_producer: Producer | None = None     # made when going live
        # releases go on a producer of their own: on the log's (one request in flight) a
        # .out write and the next slice's log write waited for each other, about 4 ms a
        # response at 100 requests/s, so a short hiccup took a second to drain
        self._out_producer = Producer(dict(
            client_conf(bootstrap, client_id(vm, "recorder")), **WRITER_SETTINGS)) \
            if serve else None
        self._out_reports: threading.Thread | None = None
        self._stop_out_reports = threading.Event()
        self.serving = serve
        self.policy = policy
        self.start_ms: dict[str, float] = {}
        self._held: list[tuple[float, dict]] = []   # (slice began, Output + log_offset):
        # at most about MAX_HELD, as the inputs wait while held_back() (KafkaInputs)
        self.released_seq = -1
        self.acks = AckWatch(bootstrap, vm) if serve and policy.backups else None
        def latencies():
            return [] if latency_samples is None else Reservoir(latency_samples)
        self.output_latencies = latencies()     # s, its slice began -> released
        self._slice_began = time.monotonic()
        self.outputs_released = 0
        self._slice: list[dict] = []
        self._slice_has_output = False
        self._units: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: Exception | None = None
        self.fenced: FencedError | None = None
        self.next_log_offset = -1    # where the events after the last delivered record start
        self.commit_latencies = latencies()   # seconds, slice handed over -> committed
        self.bytes_published = 0
        self.messages = 0
        self._thread: threading.Thread | None = None
        self._deliveries: threading.Thread | None = None
        self._stop_deliveries = threading.Event()
        self._in_flight = 0            # log records produced, not yet reported
        self._reported = 0             # log records reported (delivered or failed)
        # snapshots waiting for the log records before them: (reports due, the record)
        self._snaps_due: list[tuple[int, dict]] = []
        self._snap_slots = threading.Semaphore(SNAPSHOTS_PENDING)
        self._snap_queue: queue.Queue = queue.Queue()     # ready to produce; None: stop
        self._snapshotter: threading.Thread | None = None
        self._delivered = threading.Condition()     # ... and its changes
        self._watch: threading.Thread | None = None
        self._first_delivered = threading.Event()  # a log record of this sink (or an error)
        self._handed_any = False
        self._closing = threading.Event()
        self.sealed_at: int | None = None
        # a designated successor's view of .out, kept current while it followed: going
        # live then reads only the last few releases (None: read .out from its start)
        self.release_tail: ReleaseTail | None = None
        if not takeover:
            self.go_live()

    def log_producer_extra(self) -> dict:
        """More settings for the log's producer (a benchmark's statistics callback)."""
        return {}

    # -- a takeover's steps (replayer.takeover), then go_live -------------------------
    def warm_up(self) -> None:
        """Connect now and get the producer's id, so that a takeover's seal() is one write:
        a backup does this when it becomes the designated successor."""
        self.producer.list_topics(self.topics.log, timeout=CONNECT_WARM_S)
        if self._out_producer is not None:
            self._out_producer.list_topics(self.topics.outputs, timeout=CONNECT_WARM_S)

    def seal(self, epoch: int, sealer: str) -> int:
        """Become the primary of `epoch` and append its Epoch record to the log; its
        offset.  KafkaLogError if Kafka does not take it within SEAL_TIMEOUT_S (its fate
        unknown: if it lands later, it is an epoch nobody writes, and the next takeover
        seals the one after it)."""
        self.epoch = epoch
        t0 = time.monotonic()
        offset = self._write_now(self.topics.log, {"kind": "Epoch", "epoch": self.epoch,
                                                   "writer": sealer, "wall_ns": time.time_ns()},
                                 icount_key(0), SEAL_TIMEOUT_S)
        self.start_ms["seal"] = _ms_since(t0)
        self.sealed_at = offset
        return offset

    def go_live(self, unreleased: Callable[[int], list[dict]] | None = None) -> None:
        """Start publishing.  A serving takeover first seals .out too and learns what is
        validly released there: from its Epoch record on, nothing an old primary puts on
        .out counts, so that figure is final (docs/ARCHITECTURE.md §6).
        unreleased(released_seq): the responses in the history that were not validly
        released (a takeover's), held before the threads start so that the first
        delivery-thread round releases them."""
        t0 = time.monotonic()
        out_sealed_at = -1
        if self.serving and self.epoch > 0:
            out_sealed_at = self._write_now(
                self.topics.outputs, {"kind": "Epoch", "epoch": self.epoch,
                                      "writer": self.writer, "wall_ns": time.time_ns()},
                b"epoch", SEAL_TIMEOUT_S)
        t1 = time.monotonic()
        tail, self.release_tail = self.release_tail, None
        try:
            if self.serving and tail is not None and out_sealed_at >= 0 \
                    and self.sealed_at is not None:
                self.released_seq = tail.released_through(out_sealed_at, self.sealed_at,
                                                          SEAL_TIMEOUT_S)
            elif self.serving and (self.epoch > 0 or watermarks(self.bootstrap,
                                                               self.topics.outputs)[1] > 0):
                self.released_seq = max((o["seq"] for o in valid_releases(self.bootstrap,
                                                                          self.vm)),
                                        default=-1)
        finally:
            if tail is not None:
                tail.close()
        t2 = time.monotonic()
        # a takeover's events start after its Epoch record (an old primary's records in
        # between are void to a reader starting there); a first primary asks the log
        log_end = self.sealed_at + 1 if self.sealed_at is not None else \
            max(watermarks(self.bootstrap, self.topics.log)[1], 0)
        self.next_log_offset = log_end
        self.start_ms.update(seal_out=round((t1 - t0) * 1000, 1),
                             released_seq=round((t2 - t1) * 1000, 1),
                             log_end=_ms_since(t2))
        start = self.sealed_at if self.sealed_at is not None else log_end
        self._tail = EpochTail(self.bootstrap, self.topics.log, start,
                               EpochBounds(starts=[(self.epoch, start)], read_to=start))
        self._snap_producer = Producer(dict(
            client_conf(self.bootstrap, client_id(self.vm, "recorder")), **WRITER_SETTINGS))
        if unreleased is not None:
            self.hold(unreleased(self.released_seq))
        self._slice_began = time.monotonic()   # (a successor's writer is made long before)
        self._watch = threading.Thread(target=self._watch_epochs, name="kvmrr-epoch-watch",
                                       daemon=True)
        self._watch.start()
        self._deliveries = threading.Thread(target=self._delivery_loop,
                                            name="kvmrr-deliveries", daemon=True)
        self._deliveries.start()
        self._snapshotter = threading.Thread(target=self._snapshot_loop,
                                             name="kvmrr-snapshots", daemon=True)
        self._snapshotter.start()
        if self._out_producer is not None:
            self._out_reports = threading.Thread(target=self._out_report_loop,
                                                 name="kvmrr-release-reports", daemon=True)
            self._out_reports.start()
        self._thread = threading.Thread(target=self._publish_loop, name="kvmrr-publisher",
                                        daemon=True)
        self._thread.start()

    def held_back(self) -> bool:
        """Too many responses wait for their release (backups:N without enough backups
        acking): the service's inputs should wait, so that they stop growing."""
        return len(self._held) >= MAX_HELD

    def _write_now(self, topic: str, record: dict, key: bytes, timeout: float) -> int:
        """One record, written and acknowledged before this returns; its offset."""
        got: dict = {}

        def delivered(err, msg):
            got["err"], got["offset"] = err, (msg.offset() if err is None else -1)
        self._produce(topic, record, key, delivered)
        self.producer.flush(timeout)
        if got.get("err") is not None or "offset" not in got:
            why = got["err"].str() if got.get("err") else f"no answer within {timeout:.0f} s"
            raise KafkaLogError(f"cannot write the {record['kind']} record of epoch "
                                f"{self.epoch} to {topic}: {why}")
        return got["offset"]

    # -- vCPU thread ------------------------------------------------------------------
    def write(self, record: dict) -> None:
        if record["kind"] == "EventBatch" and any(ev["kind"] == "Output"
                                                  for ev in record["events"]):
            self._slice_has_output = True
        self._slice.append(record)

    def hold(self, outputs: list[dict]) -> None:
        """Responses in the log's history but not validly released (a takeover found them
        while catching up; each carries its log_offset): they leave under this sink's
        policy, before any new one."""
        now = time.monotonic()
        self._held.extend((now, dict(o, kind="Output")) for o in outputs
                          if o["channel"] == NIC and o["seq"] > self.released_seq)

    def commit(self) -> None:
        if self.fenced:
            raise self.fenced
        if self.error:
            raise self.error
        # slices are back to back: this commit ends one and starts the next, so a response
        # in this slice was produced after `began` (its commit latency counts from there:
        # at most one slice more than its true age)
        now = time.monotonic()
        began, self._slice_began = self._slice_began, now
        if self._slice:
            self._units.put((now, self._slice, began, self._slice_has_output))
            self._slice, self._slice_has_output = [], False
            if not self._handed_any and self.sealed_at is None:
                self._handed_any = True
                self._wait_first_write()

    def _wait_first_write(self) -> None:
        """A first primary's guest starts once its log takes writes: its first record (the
        LogHeader, committed before the guest runs: RecordSession.run) delivered.  A new cluster's producer waits for its producer id (the
        brokers answer COORDINATOR_LOAD_IN_PROGRESS at first, and librdkafka retries after
        a pause), up to a second here; the slices of a guest already running would all
        wait behind it.  (A takeover's writer was made, and sealed, long before.)"""
        if not self._first_delivered.wait(DELIVERY_TIMEOUT_S):
            raise KafkaLogError(f"the recorder of VM {self.vm} cannot write "
                                f"{self.topics.log}: no answer within "
                                f"{DELIVERY_TIMEOUT_S:.0f} s")
        if self.error:
            raise self.error

    def close(self) -> None:
        if self._thread is not None:
            try:
                self.commit()
            finally:
                self._units.put(None)
                self._thread.join()
                self._stop_deliveries.set()
                self._deliveries.join()
                self._stop_out_reports.set()
                if self._out_reports is not None:
                    self._out_reports.join()
            if not self.error:      # what is still in flight, its releases, then the held
                try:
                    self._finish()
                except (KafkaLogError, KafkaException) as exc:
                    self.error = _as_log_error(exc)
        self._stop_snapshots()
        self._closing.set()
        if self.release_tail is not None:      # a takeover that did not go live
            self.release_tail.close()
            self.release_tail = None
        if self._watch is not None:
            self._watch.join()
            self._tail.close()
        if self.acks:
            self.acks.close()
        self.producer.flush(5)
        for producer in (self._snap_producer, self._out_producer):
            if producer is not None:
                producer.flush(5)
        if self.fenced:
            raise self.fenced
        if self.error:
            raise self.error

    def _finish(self) -> None:
        """The recording ended (the publisher and delivery threads are done): every record
        delivered, the responses released; under backups:N the held ones wait for their
        acks, for a while."""
        self._flush(self.producer, "the log")     # its reports hand the last snapshots over
        self._stop_snapshots()
        if self._snap_producer is not None:
            self._flush(self._snap_producer, self.topics.snapshots)
        if self.error:
            return
        deadline = time.monotonic() + DELIVERY_TIMEOUT_S
        while self.serving and not self.fenced and not self.error:
            self._release()
            self._flush(self._out_producer, self.topics.outputs)
            if not self._held or self.acks is None:
                return
            if time.monotonic() > deadline:
                raise KafkaLogError(f"{len(self._held)} responses never released: fewer than "
                                    f"{self.policy.backups} backups acked their log within "
                                    f"{DELIVERY_TIMEOUT_S:.0f} s")
            time.sleep(RELEASE_POLL_S)

    def _flush(self, producer: Producer, what: str) -> None:
        left = producer.flush(DELIVERY_TIMEOUT_S)
        if left:
            raise KafkaLogError(f"the recorder of VM {self.vm} cannot write {what}: {left} "
                                f"records unacknowledged after {DELIVERY_TIMEOUT_S:.0f} s")

    # -- the epoch watch thread -------------------------------------------------------
    def _watch_epochs(self) -> None:
        while not self._closing.is_set():
            try:
                newer = [(e, o) for e, o in self._tail.poll(FENCE_WATCH_S) if e > self.epoch]
            except KafkaLogError:
                time.sleep(FENCE_WATCH_S)      # Kafka moving: the publisher says if it is fatal
                continue
            if newer:
                epoch, offset = newer[0]
                self._closing.wait(WATCH_LAG_S)
                self.fenced = FencedError(
                    f"fenced: a newer primary of VM {self.vm} took over (epoch {epoch} "
                    f"sealed at log offset {offset}; this recorder's epoch {self.epoch}); "
                    "this recorder stops and releases nothing more")
                return

    # -- publisher thread ---------------------------------------------------------------
    def _produce(self, topic: str, record: dict, key: bytes, on_delivery,
                 producer: Producer | None = None) -> None:
        value, headers = encode_message(record)
        headers.append((WRITER_HEADER, self.writer.encode()))
        headers = record_mac.sign(topic, key, value, headers)   # docs/operating.md §6.3
        self.bytes_published += len(value)
        self.messages += 1
        while True:
            try:
                (producer or self.producer).produce(topic, value, key, headers=headers,
                                                    on_delivery=on_delivery)
                return
            except BufferError:      # the delivery thread frees the queue
                time.sleep(0.005)

    def _fail(self, err, what: str) -> None:
        if self.error is None:
            self.error = KafkaLogError(f"the recorder of VM {self.vm} cannot write {what}: "
                                       f"{err.str()}")
        self._first_delivered.set()

    def _produce_log(self, rec: dict, began: float, handed: float | None) -> None:
        """One log record, in flight: when its delivery report comes (the delivery thread),
        it is committed, the events after it start at the next offset, and the responses
        in it are held for release.  handed: the slice's, on its last record (the slice is
        committed when that one is)."""
        batch = dict(rec, epoch=self.epoch)

        def delivered(err, msg):
            if err is not None:
                self._fail(err, self.topics.log)
            else:
                self._log_delivered(batch, msg.offset(), began, handed)
            with self._delivered:
                self._in_flight -= 1
                self._reported += 1
                self._hand_snapshots()
                self._delivered.notify_all()
        with self._delivered:
            self._in_flight += 1
        try:
            self._produce(self.topics.log, batch,
                          icount_key(batch["events"][0]["icount"] if batch.get("events") else 0),
                          delivered)
        except BaseException:
            with self._delivered:
                self._in_flight -= 1
            raise

    def _log_delivered(self, batch: dict, offset: int, began: float,
                       handed: float | None) -> None:
        """(delivery thread) a log record is committed."""
        self.next_log_offset = offset + 1
        self._first_delivered.set()
        if handed is not None:
            self._committed(handed)
        if self.serving and batch["kind"] == "EventBatch":
            self._held.extend(
                (began, dict(ev, kind="Output", epoch=self.epoch, log_offset=offset))
                for ev in batch["events"]
                if ev["kind"] == "Output" and ev["channel"] == NIC
                and ev["seq"] > self.released_seq)

    def _committed(self, handed: float) -> None:
        """(delivery thread) the slice handed over at `handed` is committed."""
        self.commit_latencies.append(time.monotonic() - handed)

    def _write_snapshot(self, rec: dict) -> None:
        """(publisher) Due once every log record produced before it is reported: then
        its log_offset is where the events after it start.  Waits only while
        SNAPSHOTS_PENDING others are not yet produced."""
        while not self._snap_slots.acquire(timeout=DELIVERY_POLL_S):
            if self.error:
                return
        with self._delivered:
            self._snaps_due.append((self._reported + self._in_flight, rec))
            self._hand_snapshots()

    def _hand_snapshots(self) -> None:
        """(holding self._delivered) The snapshots whose log records are all reported, to
        the snapshot thread; after a failed write none (the recording ends)."""
        while self._snaps_due and self._snaps_due[0][0] <= self._reported:
            _, rec = self._snaps_due.pop(0)
            if self.error:
                self._snap_slots.release()
                continue
            self._snap_queue.put(dict(rec, log_offset=self.next_log_offset, epoch=self.epoch))

    def _snapshot_loop(self) -> None:
        """(snapshot thread) Encode and produce the snapshots handed over, in order."""
        def delivered(err, msg):
            if err is not None:
                self._fail(err, self.topics.snapshots)
        while True:
            snap = self._snap_queue.get()
            if snap is None:
                return
            try:
                if not self.error:
                    for chunk in split_snapshot(snap, SNAPSHOT_CHUNK_BYTES):
                        self._produce(self.topics.snapshots, chunk, icount_key(chunk["icount"]),
                                      delivered, self._snap_producer)
            except (KafkaLogError, KafkaException) as exc:
                self.error = _as_log_error(exc)
            except Exception as exc:
                self.error = exc
            finally:
                self._snap_slots.release()

    def _stop_snapshots(self) -> None:
        """Let the snapshot thread produce what it was handed, and end it (idempotent)."""
        if self._snapshotter is not None:
            self._snap_queue.put(None)
            self._snapshotter.join()
            self._snapshotter = None

    def _publish_units(self, units: list) -> None:
        for handed, recs, began, _ in units:
            logged = [r for r in recs if r["kind"] != "Snapshot"]
            last = logged[-1] if logged else None
            if not logged:
                self._first_delivered.set()     # nothing of it for the log to take
            for rec in recs:
                if rec["kind"] == "Snapshot":
                    self._write_snapshot(rec)
                else:
                    self._produce_log(rec, began, handed if rec is last else None)

    def _next_units(self) -> list:
        """The slices waiting; if none has output, wait up to IDLE_BATCH_S for more."""
        units = [self._units.get()]
        until = time.monotonic() + IDLE_BATCH_S
        while True:
            try:
                units.append(self._units.get_nowait())
                continue
            except queue.Empty:
                pass
            if units[-1] is None or any(u[3] for u in units):
                return units
            left = until - time.monotonic()
            if left <= 0:
                return units
            try:
                units.append(self._units.get(timeout=left))
            except queue.Empty:
                pass

    def _publish_loop(self) -> None:
        """Produce the slices as they come: no waiting for the acks of the previous ones
        (the delivery thread gets those)."""
        done = False
        while not done:
            units = self._next_units()
            if units and units[-1] is None:
                done = True
                units.pop()
            if self.error or not units:
                continue
            try:
                self._publish_units(units)
            except (KafkaLogError, KafkaException) as exc:   # surfaced by commit()
                self.error = _as_log_error(exc)
            except Exception as exc:
                self.error = exc
            if self.error:
                self._first_delivered.set()

    # -- delivery thread ----------------------------------------------------------------
    def _delivery_loop(self) -> None:
        """Serve the delivery reports as they come (each log record committed, its
        responses held), and release what the policy lets go."""
        while not self._stop_deliveries.is_set():
            waiting = bool(self._held)     # (under `log`: held only until this round)
            try:
                self.producer.poll(RELEASE_POLL_S if waiting else DELIVERY_POLL_S)
                if self._snap_producer is not None:
                    self._snap_producer.poll(0)
                if self.serving and not self.error:
                    self._release()
            except (KafkaLogError, KafkaException) as exc:
                self.error = _as_log_error(exc)
            except Exception as exc:
                self.error = exc

    def _out_report_loop(self) -> None:
        """(release-report thread) The .out delivery reports as they come: a response
        counts as released (its latency) when its record is written."""
        while not self._stop_out_reports.is_set():
            try:
                self._out_producer.poll(DELIVERY_POLL_S)
            except KafkaException as exc:
                self.error = _as_log_error(exc)

    def _releasable(self) -> list[tuple[float, dict]]:
        """The held responses the policy lets go now, a prefix in seq order."""
        if not self._held or self.fenced:
            return []
        if not self.policy.backups:
            return list(self._held)    # their log records are delivered
        self.acks.poll()
        acked = self.acks.acked_icount(self.policy.backups)
        n = 0
        while n < len(self._held) and self._held[n][1]["icount"] <= acked:
            n += 1
        return self._held[:n]

    def _release(self) -> None:
        """Put the releasable responses on .out (in flight; counted when delivered)."""
        releasing = self._releasable()
        if not releasing:
            return
        del self._held[:len(releasing)]
        self.released_seq = releasing[-1][1]["seq"]
        hist = metrics.OUTPUT_COMMIT_SECONDS.labels(self.vm, str(self.policy))
        released = metrics.RESPONSES_RELEASED.labels(self.vm)
        for began, out in releasing:
            def delivered(err, msg, began=began):
                if err is not None:
                    self._fail(err, self.topics.outputs)
                    return
                seconds = time.monotonic() - began
                self.outputs_released += 1
                self.output_latencies.append(seconds)
                hist.observe(seconds)
                released.inc()
            self._produce(self.topics.outputs, dict(out, epoch=self.epoch),
                          str(out["seq"]).encode(), delivered, self._out_producer)


def _as_log_error(exc: Exception) -> KafkaLogError:
    return exc if isinstance(exc, KafkaLogError) else \
        KafkaLogError(f"the recorder's producer failed: {exc.args[0].str()}")


def _ms_since(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000, 1)
