"""make bench-log -> bench/log.json: the log on Kafka, on a single node and a 3-node
loopback cluster: one replicated write (the floor under a commit), the recorder's commit
latency (output commit: the slices that carry output; all slices), follower lag.  Each
cluster is warmed up first (30 s of the served workload); the recorder runs kvstore at
the sweep's load (bench/sweep.json), then flat out (kvstore at 2000/s offered, ticks at
1 kHz), where the commit's tail is the CPUs' queue."""

from __future__ import annotations

import bisect
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections import Counter

import structlog

from kvmrr_log import events
from libkvmrr import best_counter
from kvmrr_log.guest_images import load_guest
from harness.localkafka import LocalKafka, LocalKafkaError, kafkactl
from recorder.session import RecordSession
from bench.core import per_second
from bench.sweep import sweep_load_hz
from kvmrr_log.paths import REPO
from kvmrr_log.percentiles import percentile_ms

LOG = structlog.get_logger(bench="log")     # lazy: configured at the start of main
COMMIT_P99_FLOOR_MS = 20.0
COMMIT_P50_FLOOR_MS = 5.0


class BenchError(RuntimeError):
    pass


def cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) a live process has used so far; None once gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Brokers(LocalKafka):
    """A kafkactl cluster of its own (unique name, free ports), stopped on exit."""

    def __init__(self, nodes: int, tag: str):
        super().__init__(nodes, f"bench-{os.getpid()}-{tag}")

    def cpu_seconds(self) -> float:
        """CPU time its broker processes have used so far (found by the name in their
        command line: kafkactl puts their folders under it)."""
        total = 0.0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if b"kafka.Kafka" in cmd and f"/{self.name}/".encode() in cmd:
                total += cpu_s(int(pid)) or 0.0
        return total

    def __enter__(self) -> "Brokers":
        try:
            return super().__enter__()
        except LocalKafkaError as exc:
            raise BenchError(str(exc)) from None


def _dist_ms(values: list[float]) -> dict:
    return {"n": len(values), "p50_ms": percentile_ms(values, 0.5),
            "p90_ms": percentile_ms(values, 0.9), "p99_ms": percentile_ms(values, 0.99),
            "max_ms": percentile_ms(values, 1.0)}


def _instrumented_sink():
    """A KafkaSink that also times what its publisher does (the bench's profile)."""
    from recorder.kafka_sink import KafkaSink

    class InstrumentedSink(KafkaSink):
        def __init__(self, bootstrap: str, vm: str, **kw):
            self.topic_bytes: Counter[str] = Counter()
            self.handed: list[float] = []             # when each slice was handed over
            self.output: dict[float, bool] = {}       # slice (handed) -> it had output
            self.produced: dict[float, float] = {}    # slice (handed) -> its records produced
            self.committed: list[tuple[float, float]] = []   # (handed, committed), in order
            # (handed to the publisher, the publisher goes on): since the snapshot thread
            # waits for the log (recorder/kafka_sink.py), only a wait for a free slot
            self.snapshots: list[tuple[float, float]] = []
            self.stop_at: float | None = None         # wall budget: end the record here
            self.session = None
            self.primary: list[tuple[float, int]] = []   # (t, icount) at every slice
            self.producer_stats: list[dict] = []      # librdkafka's, per broker and window
            super().__init__(bootstrap, vm, **kw)

        def log_producer_extra(self) -> dict:
            def stats(text: str) -> None:
                for b in json.loads(text).get("brokers", {}).values():
                    if b.get("nodeid", -1) >= 0 and b["rtt"].get("cnt"):
                        self.producer_stats.append({"rtt": b["rtt"],
                                                    "queue": b["int_latency"]})
            return {"statistics.interval.ms": 500, "stats_cb": stats}

        def commit(self) -> None:
            if self._slice:
                self.handed.append(time.monotonic())
            super().commit()
            s = self.session
            if s is not None:
                self.primary.append((time.monotonic(), s.machine.icount))
            if self.stop_at is not None and s is not None and time.monotonic() >= self.stop_at:
                s.max_instructions = s.machine.icount + 1   # the vCPU thread: safe
                self.stop_at = None

        def _produce(self, topic, record, key, on_delivery, producer=None) -> None:
            before = self.bytes_published
            super()._produce(topic, record, key, on_delivery, producer)
            self.topic_bytes[topic] += self.bytes_published - before

        def _publish_units(self, units) -> None:
            super()._publish_units(units)
            now = time.monotonic()
            for handed, _, _, has_output in units:
                self.produced[handed] = now
                self.output[handed] = has_output

        def _committed(self, handed: float) -> None:
            super()._committed(handed)
            self.committed.append((handed, time.monotonic()))

        def _write_snapshot(self, rec) -> None:
            t = time.monotonic()
            super()._write_snapshot(rec)
            self.snapshots.append((t, time.monotonic()))

    return InstrumentedSink


def _profile(sink) -> dict:
    """Split each slice's commit latency into queueing (handed over -> its records
    produced: the idle batching, a snapshot waiting for the log) and the write in flight
    (produced -> its delivery report: the replicated write itself, pipelined)."""
    waits, in_flight = [], []
    for handed, committed in sink.committed:
        produced = sink.produced.get(handed, handed)
        waits.append(max(0.0, produced - handed))
        in_flight.append(committed - produced)
    output = sink.output

    def window_mean_ms(key: str) -> dict:
        # librdkafka's own per-broker figures over 0.5 s windows: the mean (weighted by
        # count) and the worst window's p99
        ws = [w[key] for w in sink.producer_stats]
        n = sum(w["cnt"] for w in ws)
        return {"mean_ms": round(sum(w["avg"] * w["cnt"] for w in ws) / n / 1000, 2)
                if n else None, "worst_window_p99_ms": round(max(
                    (w["p99"] for w in ws), default=0) / 1000, 2), "n": n}
    out = {"queue_wait": _dist_ms(waits), "in_flight": _dist_ms(in_flight),
           # in_flight, split by the producer: waiting in librdkafka for the request before
           # it (one in flight per broker, WRITER_SETTINGS), then its request's round trip
           # (the broker's work, the followers' fetch included)
           "producer_queue": window_mean_ms("queue"),
           "request_round_trip": window_mean_ms("rtt"),
           "snapshot_waits_for_the_log": _dist_ms([b - a for a, b in sink.snapshots])}
    # steady state: the slices handed over after the first snapshot was produced
    if sink.snapshots:
        after = sink.snapshots[0][1]
        out["output_commit_after_first_snapshot"] = _dist_ms(
            [c - h for h, c in sink.committed if h >= after and output.get(h)])
    return out


def _record(bootstrap: str, vm: str, guest_name: str, *, bootargs: str = "",
            load: float = 0.0, max_instructions: int | None = None,
            wall_s: float | None = None,
            brokers: Brokers | None = None) -> tuple[dict, object]:
    from recorder.loadgen import KvLoad
    from recorder.pacing import DEFAULT_MAX_LAG_MS, pacer_for
    guest = load_guest(guest_name)
    counter, _ = best_counter()
    sink = _instrumented_sink()(bootstrap, vm, latency_samples=None)   # every slice, in order
    pacer = pacer_for(bootstrap, vm, DEFAULT_MAX_LAG_MS)    # as `kvmrr record` does
    session = RecordSession(guest, sink, counter=counter, vm_id=vm, bootargs=bootargs,
                            max_instructions=max_instructions, checksum_every=1_000_000,
                            load=KvLoad(seed=1, rate_hz=load) if load else None,
                            heartbeat_every_ns=100_000_000, pacer=pacer)
    sink.session = session
    broker_cpu0 = brokers.cpu_seconds() if brokers else 0.0
    cpu0 = os.times()
    t0 = time.monotonic()
    if wall_s is not None:
        sink.stop_at = t0 + wall_s
    try:
        result = session.run()
    finally:
        pacer.close()
        try:
            sink.close()
        finally:
            sink.session = None               # no cycle: the producer goes with the sink
    wall = time.monotonic() - t0          # to the last write delivered
    cpu1 = os.times()
    broker_cpu = brokers.cpu_seconds() - broker_cpu0 if brokers else None
    lat = sink.commit_latencies
    output = sink.output
    out_lat = [c - h for h, c in sink.committed if output.get(h)]
    log_bytes = sink.topic_bytes[sink.topics.log]
    out = {
        "guest": guest_name, "bootargs": bootargs, "load_requests_per_s": load or None,
        "counter": counter, "instructions": result.instructions, "events": result.events,
        "events_by_kind": result.events_by_kind, "seconds": round(wall, 3),
        "record_seconds": round(result.seconds, 3),
        "instructions_per_second": per_second(result.instructions, result.seconds),
        "bytes_published": sink.bytes_published, "log_topic_bytes": log_bytes,
        "snapshot_topic_bytes": sink.topic_bytes[sink.topics.snapshots],
        "messages": sink.messages, "slices": len(lat),
        "events_per_s": per_second(result.events, wall),
        "mb_per_s": round(sink.bytes_published / wall / 1e6, 3),
        "log_mb_per_s": round(log_bytes / wall / 1e6, 4),
        "output_slices": len(out_lat),
        "commit_p50_ms": percentile_ms(out_lat, 0.5),
        "commit_p99_ms": percentile_ms(out_lat, 0.99),
        "commit_max_ms": percentile_ms(out_lat, 1.0),
        "all_slices_commit_p50_ms": percentile_ms(lat, 0.5),
        "all_slices_commit_p99_ms": percentile_ms(lat, 0.99),
        "profile": _profile(sink), "state_hash": result.state_hash,
        # what the recording cost the CPUs: the brokers' and this process's (the vCPU,
        # the publisher, librdkafka), per message produced
        "brokers_cpu_ms_per_message": round(broker_cpu * 1000 / sink.messages, 3)
        if broker_cpu is not None and sink.messages else None,
        "recorder_cpu_ms_per_message": round(
            (cpu1.user + cpu1.system - cpu0.user - cpu0.system) * 1000 / sink.messages, 3)
        if sink.messages else None,
        "paced_seconds": round(pacer.paused_s, 3),
    }
    return out, (result, sink.primary)


def _replicated_writes(bootstrap: str, n: int) -> dict:
    """One idempotent acks=all produce, every 10 ms: the cost of one write that the
    in-sync replicas must have, the floor under the recorder's commit (which is one such
    write of a group of slices, docs/ARCHITECTURE.md §4)."""
    return _dist_ms(write_latencies(
        bootstrap, _vm_name("write"), n))


def write_latencies(bootstrap: str, vm: str, n: int) -> list[float]:
    """n single 200-byte writes to vm's log topic (made if missing), each flushed alone
    (idempotent, acks=all), 10 ms apart, after 5 to warm the connection up: seconds each."""
    from confluent_kafka import Producer
    from kvmrr_log.kafka import client_conf, ensure_topics
    topic = ensure_topics(bootstrap, vm).log
    p = Producer(dict(client_conf(bootstrap, "kvmrr.bench.writes"),
                      **{"enable.idempotence": True, "acks": "all", "linger.ms": 0}))
    for _ in range(5):
        p.produce(topic, b"w" * 200, b"k")
        p.flush(30)
    lat = []
    for _ in range(n):
        t0 = time.monotonic()
        p.produce(topic, b"w" * 200, b"k")
        p.flush(30)
        lat.append(time.monotonic() - t0)
        time.sleep(0.01)
    return lat


def _vm_name(*parts: str) -> str:
    """A VM id of this bench's own, new on every call (its topics are new)."""
    return "-".join(["bench", *parts, str(os.getpid()), str(time.time_ns() % 10**9)])


def _warm_up(bootstrap: str, tag: str, seconds: float) -> None:
    """The served workload for `seconds`, figures thrown away: fresh brokers run their
    first minute interpreted or half-compiled (C1), and a 3-node cluster's first kvstore
    run at 100/s gave a commit p99 of 32-45 ms against 10-12 ms in the next two."""
    _record(bootstrap, _vm_name(tag, "warmup"), "kvstore", load=sweep_load_hz(),
            wall_s=seconds)


def _throughput(bootstrap: str, tag: str, quick: bool, brokers: Brokers | None = None) -> dict:
    budget = 1_000_000 if quick else 3_000_000
    runs = {}
    # the sweep's load first: the guest far from flat out (it does about 300 requests/s
    # here), the brokers' latency rather than the CPUs' queue
    load = sweep_load_hz()
    runs["kvstore_sweep_load"], _ = _record(bootstrap, _vm_name(tag, "sweep-load"), "kvstore",
                                            load=load, wall_s=8.0 if quick else 20.0,
                                            brokers=brokers)
    r = runs["kvstore_sweep_load"]
    LOG.info("sweep_load", cluster=tag, rate_hz=load, commit_p50_ms=r["commit_p50_ms"],
             commit_p99_ms=r["commit_p99_ms"])
    for name, guest, bootargs, load in (("kvstore_load2000", "kvstore", "", 2000.0),
                                        ("ticks_1000hz", "ticks", "timer_hz=1000", 0.0)):
        vm = _vm_name(tag, name)
        runs[name], _ = _record(bootstrap, vm, guest, bootargs=bootargs, load=load,
                                max_instructions=budget, brokers=brokers)
        r = runs[name]
        LOG.info("throughput", cluster=tag, run=name, events_per_s=r["events_per_s"],
                 mb_per_s=r["mb_per_s"], commit_p50_ms=r["commit_p50_ms"],
                 commit_p99_ms=r["commit_p99_ms"])
    return runs


def _follower_lag(bootstrap: str, tag: str, quick: bool) -> dict:
    """Record ticks at 100 Hz for a wall budget while `kvmrr follow` follows it live."""
    wall = 10.0 if quick else 60.0
    vm = _vm_name(tag, "lag")
    cmd = [sys.executable, "-m", "kvmrr.cli", "follow", "--log", f"kafka://{bootstrap}/{vm}",
           "--backup-id", "bench", "--json", "--quiet", "--idle-timeout", "30"]
    follower = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    samples: list[dict] = []
    stderr_tail: list[str] = []

    def read_stderr() -> None:
        for line in follower.stderr:
            try:
                ev = json.loads(line)
            except ValueError:
                if line.strip():
                    stderr_tail.append(line)
                continue
            if ev.get("event") == events.FOLLOWING:
                samples.append({"t": time.monotonic(), "icount": ev["icount"],
                                "lag_instructions": ev["lag_instructions"],
                                "lag_ms": ev["lag_ms"]})
            elif ev.get("level") in ("error", "warning"):
                stderr_tail.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        rec, (result, primary) = _record(bootstrap, vm, "ticks", bootargs="timer_hz=100",
                                         wall_s=wall)
        # it ends at the log's End record; a follower that fell behind gets a bounded time
        # to catch up (its lag while the primary ran is what is measured)
        catch_up_s = 8.0 if quick else 15.0
        stopped = False
        try:
            follower.wait(timeout=catch_up_s)
        except subprocess.TimeoutExpired:
            stopped = True
            follower.terminate()
            try:
                follower.wait(timeout=10)
            except subprocess.TimeoutExpired:
                follower.kill()
                follower.wait()
        out = follower.stdout.read()        # the one JSON summary (stderr: the thread)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    reader.join(5)
    summary = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    # how far the follower is behind the primary itself: the primary's icount at the same
    # moment (its last slice before the sample) minus the icount the follower replayed to
    times = [t for t, _ in primary]
    for smp in samples:
        i = bisect.bisect_right(times, smp["t"]) - 1
        if i >= 0:
            smp["behind_primary_instructions"] = max(0, primary[i][1] - smp["icount"])
    recorded_until = primary[-1][0] if primary else 0.0
    for smp in samples:
        smp["primary_running"] = smp["t"] <= recorded_until
    t0 = samples[0]["t"] if samples else 0.0
    series = [dict(s, t=round(s["t"] - t0, 2)) for s in samples]
    # the verdict looks at the samples taken while the primary ran: after its End the
    # heartbeat age only grows and the follower catches up with nothing new coming in
    live = [s for s in series if s["primary_running"]]
    third = len(live) // 3
    verdict: dict = {"samples": len(series), "samples_while_primary_ran": len(live)}
    if third >= 1:
        first = [s["lag_ms"] for s in live[:third]]
        last = [s["lag_ms"] for s in live[-third:]]
        first_i = [s["lag_instructions"] for s in live[:third]]
        last_i = [s["lag_instructions"] for s in live[-third:]]
        m_first, m_last = sum(first) / len(first), sum(last) / len(last)
        tolerance = max(50.0, 0.5 * m_first)
        xs = [s["t"] for s in live]
        ys = [s["lag_ms"] for s in live]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
        b_first = [s.get("behind_primary_instructions", 0) for s in live[:third]]
        b_last = [s.get("behind_primary_instructions", 0) for s in live[-third:]]
        verdict.update({
            "first_third_mean_behind_primary_instructions": round(sum(b_first) / len(b_first)),
            "last_third_mean_behind_primary_instructions": round(sum(b_last) / len(b_last)),
            "first_third_mean_lag_ms": round(m_first, 1),
            "last_third_mean_lag_ms": round(m_last, 1),
            "first_third_mean_lag_instructions": round(sum(first_i) / len(first_i)),
            "last_third_mean_lag_instructions": round(sum(last_i) / len(last_i)),
            "max_lag_ms": max(ys), "slope_ms_per_s": round(slope, 2),
            "tolerance_ms": round(tolerance, 1),
            "rule": "while the primary runs: the last third's mean lag_ms <= the first "
                    "third's + max(50 ms, 50% of it)",
        })
        verdict["lag_not_growing"] = m_last <= m_first + tolerance
    else:
        verdict["lag_not_growing"] = False
    return {
        "guest": "ticks", "bootargs": "timer_hz=100", "wall_budget_s": wall,
        "record": rec,
        "follower": {"command": " ".join(["kvmrr"] + cmd[3:]),
                     # null: stopped before reaching the End (no verdict either way)
                     "verified": summary.get("verified") if summary else None,
                     "finished": bool(summary),
                     "stopped_after_catch_up_s": catch_up_s if stopped else None,
                     "exit_code": follower.returncode,
                     "state_hash_matches": (summary.get("state_hash") == result.state_hash
                                            if summary else None),
                     "replayed_instructions": summary.get("instructions"),
                     "replay_instructions_per_second": summary.get("instructions_per_second"),
                     "errors": [l.strip() for l in stderr_tail[-5:]]},
        "lag_series": series, **verdict,
    }


def bench_log(quick: bool) -> dict:
    proc = kafkactl("fetch", timeout=900)
    if proc.returncode != 0:
        raise BenchError(f"kafkactl fetch failed: {proc.stderr.strip()[-2000:]}")
    out = {"machine": platform.node(), "quick": quick, "cpus": os.cpu_count(),
           "note": "real Apache Kafka (KRaft) on loopback, started by kafkactl on this "
                   "shared machine; the recorder, the follower and every broker share its "
                   "CPUs (loadavg_* shows how busy it was). events/s: recorded events "
                   "over the wall time to the last commit; mb_per_s: Avro bytes handed to "
                   "the producer (before lz4, the initial 8.4 MB snapshot included) over "
                   "that time, log_mb_per_s the log topic alone; commit latency (commit_*): "
                   "a slice with output handed to the publisher thread -> its log write "
                   "acknowledged by the in-sync replicas (acks=all), pipelined: a slice "
                   "does not wait for the previous one's acks; all_slices_commit_* "
                   "counts the idle slices too, which wait up to 30 ms to go together",
           "clusters": {}}
    out["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    t_start = time.monotonic()
    for nodes, tag in ((1, "single"), (3, "cluster3")):
        with Brokers(nodes, tag) as b:
            _warm_up(b.bootstrap, tag, 10.0 if quick else 30.0)
            entry = {"nodes": nodes, "bootstrap": b.bootstrap, "startup_s": b.started_s,
                     "replicated_write": _replicated_writes(b.bootstrap,
                                                            100 if quick else 200),
                     "throughput": _throughput(b.bootstrap, tag, quick, b)}
            w = entry["replicated_write"]
            LOG.info("replicated_write", cluster=tag, p50_ms=w["p50_ms"], p99_ms=w["p99_ms"])
            if nodes == 3:   # the deployment's shape (replication 3, min ISR 2)
                entry["follower_lag"] = lag = _follower_lag(b.bootstrap, tag, quick)
                LOG.info("follower_lag", cluster=tag,
                         first_third_mean_lag_ms=lag.get("first_third_mean_lag_ms"),
                         last_third_mean_lag_ms=lag.get("last_third_mean_lag_ms"),
                         not_growing=lag["lag_not_growing"])
            out["clusters"][tag] = entry
    out["seconds"] = round(time.monotonic() - t_start, 1)
    out["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    c3 = out["clusters"]["cluster3"]
    p99s = [r["commit_p99_ms"] for r in c3["throughput"].values()]
    p99s.append(c3["follower_lag"]["record"]["commit_p99_ms"])    # (ticks: no output)
    worst_p99 = max((p for p in p99s if p is not None), default=None)
    out["cluster3_worst_commit_p99_ms"] = worst_p99
    out["cluster3_commit_p99_at_sweep_load_ms"] = \
        c3["throughput"]["kvstore_sweep_load"]["commit_p99_ms"]
    lag = c3["follower_lag"]
    out["floors"] = {
        "follower_keeps_up(lag_not_growing)": bool(lag["lag_not_growing"]
                                                   and lag["follower"]["verified"] is True),
        "cluster3_commit_p99<=20ms": worst_p99 is not None and worst_p99 <= COMMIT_P99_FLOOR_MS,
        "single_commit_p50<=5ms": all(
            r["commit_p50_ms"] is not None and r["commit_p50_ms"] <= COMMIT_P50_FLOOR_MS
            for r in out["clusters"]["single"]["throughput"].values()
            if r["output_slices"]),
    }
    return out


