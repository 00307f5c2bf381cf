"""A backup following the log on Kafka live (or replaying a finished one).

It starts from a committed snapshot (the latest by default, so a late backup does not
replay from icount 0), seeks the log to the offset the snapshot names, and feeds every
committed batch to a ReplaySession, which verifies as it goes.  It publishes what it has
received and replayed to kvmrr.<vm>.acks and reports its lag as log lines and metrics.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable

import structlog
from confluent_kafka import OFFSET_BEGINNING, KafkaException, Producer

from kvmrr_log import events, record_mac
from libkvmrr import KvmrrError
from kvmrr_log.guest_images import GuestImage
from kvmrr_log.kafka import KafkaLogError, client_conf, client_id, topics
from replayer import metrics
from replayer.errors import DivergenceError, ReplayError
from replayer.takeover import Event, State, next_state
from kvmrr_log.topic_reader import LogTopicReader, log_has_ended, read_header, read_snapshots
from replayer.session import ReplayResult, ReplaySession
from schemas import encode_message

ACK_EVERY_S = 0.05
LAG_LOG_EVERY_S = 1.0
LAG_SAMPLES = 3600         # one a LAG_LOG_EVERY_S: the last hour
RECENT_OUTPUTS = 100_000   # replayed responses kept, to find those a takeover must release
ASK_END_TIMEOUT_S = 5.0    # a live leader answers in milliseconds
CATCH_UP_QUIET_S = 15.0    # a takeover's own Epoch record not readable by then: Kafka moving
SILENCE_POLL_S = 0.01      # how often a backup that may take over looks at the silence
                           # (the decision comes at most this late after the timeout)


def choose_snapshot(snaps: list[dict], start: str, until: int | None) -> dict:
    usable = [s for s in snaps if until is None or s["icount"] <= until]
    if not usable:
        raise ReplayError("no committed snapshot to start from" +
                          (f" at or before icount {until}" if until is not None else ""))
    return usable[0] if start == "first" else usable[-1]


class Follower:
    def __init__(self, bootstrap: str, vm: str, *, counter: str, backup_id: str | None,
                 start: str = "latest", until: int | None = None,
                 guest: GuestImage | None = None,
                 on_output: Callable[[dict], None] | None = None, wait: float = 0.0):
        """wait: a backup may start before its primary; wait this long for the log's
        header and first snapshot to be committed."""
        self.bootstrap, self.vm, self.backup_id = bootstrap, vm, backup_id
        self.topics = topics(vm)
        # who this is to Kafka (client.id): a backup, or a replay of a finished log
        self.role = f"backup.{backup_id}" if backup_id else "replay"
        deadline = time.monotonic() + wait
        while True:
            try:
                self.header = read_header(bootstrap, vm, role=self.role)
                snapshot = choose_snapshot(read_snapshots(bootstrap, vm, start=start,
                                                          until=until, role=self.role),
                                           start, until)
                break
            except (KafkaLogError, ReplayError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)
        try:
            self.session = ReplaySession(self.header, counter=counter, guest=guest,
                                         until=until, on_output=self._on_output)
        except ReplayError as exc:
            raise ReplayError(f"{self.topics.log} offset 0: {exc}") from None
        self.session.start(snapshot)
        self.snapshot = snapshot
        self.offset = snapshot["log_offset"] if snapshot.get("log_offset", -1) >= 0 \
            else OFFSET_BEGINNING
        self.epoch = snapshot.get("epoch", 0)     # the log's epoch at self.offset
        self.epoch_read: tuple[int, int] | None = None   # the last Epoch record read
        self._batch_offset = -1
        self.log = structlog.get_logger().bind(vm_id=vm, role="backup",
                                               backup=backup_id or "-")
        self.acks = Producer(dict(client_conf(bootstrap, client_id(vm, self.role)), acks="all")
                             ) if backup_id else None
        self._last_ack = self._last_lag_log = 0.0
        self.lag_samples: deque[tuple[float, int, float]] = deque(maxlen=LAG_SAMPLES)
        #                                                  (t, lag instr, lag s), the last
        self.on_output = on_output
        self.recent_outputs: deque[dict] = deque(maxlen=RECENT_OUTPUTS)
        self._succession = None
        self._writer = None          # the designated successor's, ready for a takeover
        self._poll_s = 0.05          # how often stop_when is asked while the log is idle
        self._reader: LogTopicReader | None = None   # kept open between _follow calls

    def _on_output(self, ev: dict) -> None:
        if ev["channel"] == 1:
            self.recent_outputs.append(dict(ev, log_offset=self._batch_offset))
        if self.on_output:
            self.on_output(ev)

    def _ack(self, force: bool = False) -> None:
        if self._succession is not None:
            self._succession.poll()
        now = time.monotonic()
        s = self.session
        lag_i = max(0, s.received_icount - s.icount)
        lag_s = s.lag_seconds()
        if self.backup_id:
            labels = (self.vm, self.backup_id)
            metrics.LAG_INSTRUCTIONS.labels(*labels).set(lag_i)
            metrics.LAG_SECONDS.labels(*labels).set(lag_s)
            metrics.REPLAYED.labels(*labels).set(s.icount)
        if self.acks and (force or now - self._last_ack >= ACK_EVERY_S):
            value, headers = encode_message({
                "kind": "Ack", "backup_id": self.backup_id,
                "received_icount": s.received_icount, "received_seq": s.expected_seq,
                "replayed_icount": s.icount, "wall_ns": time.time_ns()})
            key = self.backup_id.encode()
            headers = record_mac.sign(self.topics.acks, key, value, headers)
            self.acks.produce(self.topics.acks, value, key, headers=headers)
            self.acks.poll(0)
            self._last_ack = now
        if self.backup_id and now - self._last_lag_log >= LAG_LOG_EVERY_S:
            self.lag_samples.append((now, lag_i, lag_s))
            self.log.info(events.FOLLOWING, icount=s.icount, lag_instructions=lag_i,
                          lag_ms=round(lag_s * 1000, 1))
            self._last_lag_log = now

    def _last_ack_before_stop(self) -> None:
        """A backup stopped by a bad record or a divergence still says how far it got."""
        if self.acks:
            try:
                self._ack(force=True)
                self.acks.flush(5)
            except Exception:
                pass

    def run(self, *, finished_log: bool, idle_timeout: float | None) -> ReplayResult:
        """finished_log: the log must already hold its End (replay of a finished log);
        otherwise follow it live until its End, giving up after idle_timeout s of silence."""
        try:
            followed = self._follow(finished_log, idle_timeout)
        finally:
            self._close_reader()
        if not followed:
            self._last_ack_before_stop()
            s = self.session
            what = "the log ends" if finished_log else f"no new record for {idle_timeout} s"
            raise ReplayError(f"{self.topics.log} offset {self.offset}: {what} without an "
                              f"End record (last event seq {s.expected_seq - 1}, icount "
                              f"{s.received_icount}); replayed to icount {s.icount}")
        return self._done()

    def _done(self) -> ReplayResult:
        self._ack(force=True)
        if self.acks:
            self.acks.flush(5)
        if self.backup_id:
            self.log.info(events.DONE, icount=self.session.icount)
        return self.session.result()

    def _follow(self, finished_log: bool, idle_timeout: float | None,
                stop_when: Callable[[], bool] | None = None,
                stop_at_epoch: bool = False) -> bool:
        """Feed committed batches from self.offset on; True once the End is replayed.
        stop_when(), asked between batches and while idle, may stop it early (False), and
        so does an accepted Epoch record if stop_at_epoch (self.epoch_read says which).
        The reader applies the epoch rule: void records never reach the replay."""
        reader = self._reader
        if reader is None:     # (a takeover's catch-up goes on with the reader it had)
            reader = self._reader = LogTopicReader(self.bootstrap, self.vm, self.topics.log,
                                                   self.offset, self.epoch, role=self.role)
        if self.backup_id:
            self.log.info(events.READING, snapshot_icount=self.snapshot["icount"], offset=self.offset)
        running = True
        try:
            for record, offset in reader.records(0 if finished_log else idle_timeout,
                                                 stop_when, self._poll_s):
                if record["kind"] == "LogHeader":
                    continue
                if record["kind"] == "Epoch":
                    self.epoch_read = (record["epoch"], offset)
                    self.log.info(events.EPOCH, epoch=record["epoch"], offset=offset,
                                  sealer=record["writer"])
                    if stop_at_epoch:
                        break
                    continue
                if record["kind"] != "EventBatch":
                    raise KafkaLogError(f"{self.topics.log} offset {offset}: a "
                                        f"{record['kind']} on the log topic")
                self._batch_offset = offset
                try:
                    running = self.session.feed_batch(record)
                except DivergenceError:
                    raise
                except (ReplayError, KvmrrError) as exc:
                    raise ReplayError(f"{self.topics.log} offset {offset}: {exc}") from None
                self._ack()
                if not running:
                    break
                if stop_when is not None and stop_when():
                    break
        except BaseException:
            self._last_ack_before_stop()
            self._close_reader()
            raise
        finally:
            self.offset = reader.offset
            self.epoch = reader.epoch
        if not running:
            self._close_reader()
        return not running

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def follow_or_take_over(self, *, failover_timeout: float, give_up_after: float | None,
                            serve: bool = False, policy=None, **record_opts):
        """Follow the live log; if the primary falls silent for failover_timeout s and this
        backup is the designated successor (replayer.succession), take over
        (replayer.takeover): seal the log with the next epoch, replay the history up to
        that Epoch record, and continue the same log as the new primary.  A backup that is
        not designated, or loses, keeps following whoever continues the log, and gives up
        after give_up_after s of silence.
        Returns (ReplayResult, RecordResult | None)."""
        from replayer.succession import Succession
        succession = self._succession = Succession(self.bootstrap, self.vm,
                                                   self.backup_id or "backup")
        self._poll_s = SILENCE_POLL_S
        chosen = False
        ended = False      # the log holds its End (a lagging backup has yet to replay it)

        def silence_is_not_death() -> bool:
            """The log is silent because it is finished (it holds its End), or Kafka
            cannot say: while Kafka moves the log to a new leader (the old one's broker
            died) its end cannot be read for a while, and that silence is Kafka's, not
            the primary's: keep following."""
            nonlocal ended
            if ended:
                return True
            try:
                self._reader.ask_end(ASK_END_TIMEOUT_S)
                # a backup that has read all that is committed would have replayed an End
                ended = not self._reader.at_end and log_has_ended(self.bootstrap, self.vm,
                                                                  self._reader.epoch,
                                                                  role=self.role)
                return ended
            except KafkaLogError as exc:
                self.log.warning(events.LOG_END_UNKNOWN, error=str(exc))
                return True

        def primary_gone() -> bool:
            # silence of the log itself, not of this backup's replay: a backup still
            # replaying a backlog notices a dead primary as soon as one that kept up
            nonlocal chosen
            designated = succession.designated_for()
            if designated > 0 and self._writer is None:
                self._writer = self._new_writer(serve, policy)
            self._follow_releases()
            chosen = self._reader.silence() >= failover_timeout and \
                designated >= failover_timeout and not silence_is_not_death()
            return chosen

        state = State.FOLLOWING
        try:
            while True:
                if self._follow(False, give_up_after, primary_gone):
                    return self._done(), None
                if not chosen:
                    raise ReplayError(f"{self.topics.log} offset {self.offset}: no new record "
                                      f"for {give_up_after} s and this backup was not chosen "
                                      f"to take over (replayed to icount {self.session.icount})")
                state = next_state(state, Event.PRIMARY_SILENT)
                self.log.warning(events.TAKEOVER, silent_s=failover_timeout,
                                 icount=self.session.icount, epoch=self.epoch + 1)
                state, outcome = self._take_over(state, serve, policy, dict(record_opts))
                if state is State.LIVE or outcome is not None:
                    return outcome
                chosen = False
                self._close_reader()    # a new reader: the silence is judged afresh
        finally:
            self._close_reader()
            self._leave_succession()
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    def _new_writer(self, serve: bool, policy):
        """The designated successor's writer, made and connected ahead of a takeover (the
        seal is then one write); None if Kafka cannot now (made at the takeover then)."""
        from kvmrr_log.epochs import ReleaseTail
        from recorder.kafka_sink import KafkaSink
        from recorder.service import CommitPolicy
        try:
            sink = KafkaSink(self.bootstrap, self.vm, serve=serve, takeover=True,
                             policy=policy or CommitPolicy())
            sink.warm_up()
            if serve:      # what .out validly holds, kept current while following
                sink.release_tail = ReleaseTail(self.bootstrap, self.vm)
            return sink
        except (KafkaLogError, KafkaException):
            return None

    def _follow_releases(self) -> None:
        """The designated successor reads .out as it grows (and the log's Epoch records),
        so that going live reads only the last few releases.  If Kafka fails it here, the
        takeover reads .out from its start instead."""
        tail = self._writer.release_tail if self._writer is not None else None
        if tail is None:
            return
        try:
            tail.poll(0)
        except (KafkaLogError, KafkaException):
            self._writer.release_tail = None
            tail.close()

    def _leave_succession(self) -> None:
        if self._succession is not None:
            self._succession.close()
            self._succession = None

    def _take_over(self, state: State, serve: bool, policy, record_opts: dict):
        """Designated -> Sealing -> CatchingUp -> Live (then record as the primary until
        the end), or back to Following.  (state, (ReplayResult, RecordResult | None) or
        None when following again)."""
        from recorder.kafka_sink import KafkaSink
        from recorder.primary import build_primary
        from recorder.service import CommitPolicy, input_position
        t0 = time.monotonic()
        steps: dict = {}
        epoch = self.epoch + 1
        sink = None

        def back_to_following(why: str, exc: Exception | None = None):
            nonlocal state
            state = next_state(state, Event.KAFKA_FAILED)
            self.log.warning(events.TAKEOVER_ABORTED, error=f"{why}: {exc}",
                             epoch=epoch)
            if sink is not None:
                try:
                    sink.close()
                except Exception:
                    pass
            return state, None

        sink, self._writer = self._writer, None
        try:
            if sink is None:
                sink = KafkaSink(self.bootstrap, self.vm, serve=serve, takeover=True,
                                 policy=policy or CommitPolicy())
            state = next_state(state, Event.WRITER_READY)
            sealed_at = sink.seal(epoch, self.backup_id or "backup")
        except (KafkaLogError, KafkaException) as exc:
            return back_to_following("sealing", exc)
        state = next_state(state, Event.SEALED)
        steps["seal_ms"] = _ms_since(t0)
        try:
            deadline = time.monotonic() + CATCH_UP_QUIET_S
            while True:
                self.epoch_read = None
                if self._follow(True, 0, stop_at_epoch=True):    # it had finished after all
                    next_state(state, Event.LOG_ENDED)
                    sink.close()
                    return state, (self._done(), None)
                if self.epoch_read is not None and self.epoch_read[1] == sealed_at:
                    break
                if self.epoch_read is not None or self.offset > sealed_at:
                    # another sealer's Epoch record came first: it won, ours is void
                    state = next_state(state, Event.NEWER_EPOCH_READ)
                    self.log.warning(events.SEALED_FIRST_ELSEWHERE,
                                     epoch=self.epoch, ours=sealed_at)
                    sink.close()
                    return state, None
                if time.monotonic() > deadline:      # our record is acked, so readable
                    raise KafkaLogError(f"{self.topics.log}: this backup's Epoch record at "
                                        f"offset {sealed_at} is not readable after "
                                        f"{CATCH_UP_QUIET_S:.0f} s")
        except (KafkaLogError, KafkaException) as exc:
            return back_to_following("catching up", exc)
        steps["catch_up_ms"] = _ms_since(t0) - steps["seal_ms"]
        self._close_reader()      # the history is read: the log is this backup's to write
        s = self.session
        replayed = s.result()
        position = None
        try:
            sink.go_live(self._unreleased if serve else None)
            steps["go_live_ms"] = _ms_since(t0) - steps["seal_ms"] - steps["catch_up_ms"]
            if serve:
                position = s.next_input_offset
                if position < 0:     # no batch since our snapshot: ask the log itself
                    position = input_position(self.bootstrap, self.vm)
        except (KafkaLogError, KafkaException) as exc:
            return back_to_following("going live", exc)
        state = next_state(state, Event.OWN_EPOCH_READ)
        t_build = time.monotonic()
        s.machine.go_live(record_opts.pop("checksum_every"))
        primary = build_primary(sink, s.image, counter=s.counter, input_offset=position,
                                max_backup_lag_ms=record_opts.pop("max_backup_lag_ms", 0),
                                me=self.backup_id, bootargs=self.header["bootargs"],
                                continue_from=s.machine, next_seq=s.expected_seq,
                                outputs=s.outputs, outputs_complete=s.start_icount == 0,
                                on_output=self.on_output, **record_opts)
        steps["build_ms"] = _ms_since(t_build)
        self._leave_succession()     # the next backup in line takes the role
        self.log.warning(events.LIVE, icount=s.icount, next_seq=s.expected_seq, epoch=epoch,
                         sealed_at=sealed_at, released_seq=sink.released_seq,
                         next_input_offset=position, takeover_ms=_ms_since(t0),
                         sink_ms=sink.start_ms, **steps)
        self.primary = primary.session
        self.primary_sink = sink
        result = primary.run()
        self.log.info(events.DONE_AS_PRIMARY, icount=result.instructions)
        return state, (replayed, result)

    def _unreleased(self, released_seq: int) -> list[dict]:
        """Responses the replay regenerated that were never validly released: the new
        primary releases them (under its policy); those already on .out never leave
        twice."""
        recent = self.recent_outputs
        if (len(recent) == recent.maxlen and recent[0]["seq"] > released_seq + 1):
            raise ReplayError(f"cannot take over: responses after seq {released_seq} "
                              f"were replayed too long ago to be released now")
        return [o for o in recent if o["seq"] > released_seq]


def _ms_since(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000, 1)
