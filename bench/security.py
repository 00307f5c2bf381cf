"""make bench-security -> bench/security.json: what TLS + SASL/SCRAM + ACLs + record MACs
cost (docs/operating.md §6), side by side with the same runs on a plain broker.

Both single nodes run at once and the runs alternate between them (plain first, then
secure first in the next round), so a busy moment of this shared machine falls on both:
- one idempotent acks=all write of 200 bytes, every 10 ms (the floor under a commit);
- the recorder's output commit latency (kvstore under a 2000 requests/s load);
- the served service through the gateway (one backup, 150 requests/s): the primary's
  output commit and the client's latency, split per hop (served_hops), with the
  primary's pacing, the backup's lag and the CPU of each process and of the broker.
`python -m bench.security jit` compares secure nodes with and without the C2 compiler.
Floor (issue 14): the secure p50 of the recorder's commit at most 10% above the plain one.

Both brokers are warmed up first (WARMUP_S of writes and reads each): a fresh secure
broker's tail latency stays high until the JIT has compiled its TLS path, which on this
loaded machine took minutes (produce -> consume p90 of 460-1150 ms in its first rounds,
18-50 ms later; the plain broker's 4-40 ms).
"""
from __future__ import annotations

import os
import platform
import tempfile
import time
import uuid
from pathlib import Path

import structlog

from bench.log import cpu_s, write_latencies
from harness.localkafka import LocalKafka, kafkactl, make_secrets
from kvmrr_log import kafka_config
from kvmrr_log.kafka_acls import provision, vm_principal
from kvmrr_log.percentiles import percentile_ms

LOG = structlog.get_logger(bench="security")
P50_FLOOR = 1.10
WARMUP_S = 45.0


def _warm_up(side: "Side", seconds: float) -> None:
    """Writes and reads for `seconds` as a VM of its own, figures thrown away."""
    from confluent_kafka import Consumer, Producer, TopicPartition
    from kvmrr_log.kafka import client_conf, ensure_topics
    vm = side.new_vm()
    with side.signed_in(vm):
        topic = ensure_topics(side.kafka.bootstrap, vm).log
        p = Producer(dict(client_conf(side.kafka.bootstrap, "kvmrr.bench.warmup"),
                          **{"enable.idempotence": True, "acks": "all", "linger.ms": 1}))
        c = Consumer(dict(client_conf(side.kafka.bootstrap, "kvmrr.bench.warmup"),
                          **{"group.id": "kvmrr-warmup", "fetch.wait.max.ms": 5}))
        c.assign([TopicPartition(topic, 0, 0)])
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            p.produce(topic, b"w" * 2000, b"k")
            p.poll(0)
            c.poll(0.002)
        p.flush(30)
        c.close()


class Side:
    """One broker, plain or secure; `signed_in(vm)` runs a block as that VM's principal
    (provisioned first) on the secure one."""

    def __init__(self, kafka: LocalKafka, secrets: Path | None):
        self.kafka, self.secrets = kafka, secrets
        self.writes: list[float] = []
        self.commits: list[dict] = []
        self.served: list[dict] = []

    def new_vm(self) -> str:
        vm = f"bsec{uuid.uuid4().hex[:8]}"
        if self.secrets:
            make_secrets(self.secrets, [vm])
            with kafka_config.using(self.secrets / "admin.conf"):
                provision(self.kafka.bootstrap, vm)
        return vm

    def signed_in(self, vm: str):
        return kafka_config.using(self.secrets / f"{vm_principal(vm)}.conf"
                                  if self.secrets else None)


def _med(vals) -> float | None:
    vals = sorted(v for v in vals if v is not None)
    return round(vals[len(vals) // 2], 2) if vals else None


def broker_pids(name: str) -> list[int]:
    """The pids of a kafkactl cluster's nodes (`kafkactl status`)."""
    import re
    out = kafkactl("status", "--name", name, timeout=30).stdout
    return [int(p) for p in re.findall(r"\bpid (\d+)", out)]


def served_hops(side: Side, work: Path, *, rate_hz: float, seconds: float,
                counter: str) -> dict:
    """The served service (a primary, one backup, the gateway, a client) with where its
    client latency goes, per request, medians in ms:
    - gateway_in: the client's send to the .in record's CreateTime (the gateway's produce);
    - primary: .in CreateTime to the .out release's CreateTime (the primary's consume of
      .in, the guest, the output commit, the release);
    - gateway_out: the release's CreateTime to the client's answer (the gateway's read of
      .out and its send).
    With the backups' reported lag and the primary's pacing pauses (docs/ARCHITECTURE.md
    §6.5): a lagging backup shows as paced seconds."""
    from harness.ftcluster import FtCluster
    from kvmrr_log import events
    from kvmrr_log.client_ids import declared_scope, scoped_request_id
    from kvmrr_log.kafka import scan_topic, topics
    from kvmrr_log.requests import request_id
    from schemas import decode_message, message_kind
    ft = FtCluster(side.kafka.bootstrap, work, counter=counter, commit="log", txn_ms=10.0,
                   secrets=side.secrets)
    brokers = broker_pids(side.kafka.name)
    cpu0 = sum(cpu_s(p) or 0 for p in brokers)
    try:
        ft.start_primary()
        backup = ft.start_backup("b1")
        ft.start_gateway()
        ft.wait_backups_reading()
        client = ft.client()
        t0 = time.monotonic()
        nodes0 = {n: cpu_s(node.proc.pid) or 0 for n, node in ft.nodes.items()}
        client.run(rate_hz, seconds)
        client.drain(60)
        report = client.report()
        # CPU over the load, as a share of one core: the brokers' and each node's
        span = time.monotonic() - t0
        cpu = {"broker": round((sum(cpu_s(p) or 0 for p in brokers) - cpu0) / span, 3)}
        cpu.update({n: round(((cpu_s(node.proc.pid) or 0) - nodes0[n]) / span, 3)
                    for n, node in ft.nodes.items()})
        client.request("QUIT", timeout=60)
        summary = ft.primary.result() if ft.primary.wait(120) == 0 else {}
        lags = [e.get("lag_ms") for e in backup.all(events.FOLLOWING)]
        with ft.as_replica():
            ins = {m.value().split(b" ")[0].decode("ascii", "replace"): m.timestamp()[1]
                   for m in scan_topic(ft.bootstrap, topics(ft.vm).inputs, committed=False)}
            outs = {}
            for m in scan_topic(ft.bootstrap, topics(ft.vm).outputs):
                if message_kind(m.headers() or []) == "Output":
                    rid = request_id(decode_message(m.value(), m.headers())["data"])
                    outs.setdefault(rid, m.timestamp()[1])
    finally:
        ft.stop()
    wall = time.time() - time.monotonic()      # monotonic -> wall clock, both on this host
    scope = declared_scope(client.name)
    hops = {"gateway_in": [], "primary": [], "gateway_out": []}
    for rid, (sent, answered) in client.answer_times().items():
        key = scoped_request_id(scope, rid.encode()).decode()
        if key in ins and key in outs:
            hops["gateway_in"].append(ins[key] - (sent + wall) * 1000)
            hops["primary"].append(outs[key] - ins[key])
            hops["gateway_out"].append((answered + wall) * 1000 - outs[key])
    return {"client_latency_p50_ms": report.latency_p50_ms,
            "client_latency_p99_ms": report.latency_p99_ms,
            "output_commit_p50_ms": summary.get("output_commit_p50_ms"),
            "requests_per_s": report.answered / seconds,
            "paced_seconds": summary.get("paced_seconds"),
            "backup_lag_p50_ms": _med(lags), "backup_lag_max_ms": max(lags, default=None),
            "hops_p50_ms": {k: _med(v) for k, v in hops.items()}, "hops_n": len(hops["primary"]),
            "cpu": cpu}


def _summary(side: Side) -> dict:
    def med(rows, key):
        vals = sorted(r[key] for r in rows if r.get(key) is not None)
        return vals[len(vals) // 2] if vals else None
    return {
        "replicated_write": {"n": len(side.writes),
                             "p50_ms": percentile_ms(side.writes, 0.5),
                             "p99_ms": percentile_ms(side.writes, 0.99)},
        "record_commit_p50_ms": med(side.commits, "commit_p50_ms"),
        "record_commit_p99_ms": med(side.commits, "commit_p99_ms"),
        "record_events_per_s": med(side.commits, "events_per_s"),
        "records": side.commits,
        "served_output_commit_p50_ms": med(side.served, "output_commit_p50_ms"),
        "served_client_p50_ms": med(side.served, "client_latency_p50_ms"),
        "served_requests_per_s": med(side.served, "requests_per_s"),
        "served_hops_p50_ms": {h: med([r["hops_p50_ms"] for r in side.served], h)
                               for h in ("gateway_in", "primary", "gateway_out")},
        "served_paced_seconds": med(side.served, "paced_seconds"),
        "served_backup_lag_p50_ms": med(side.served, "backup_lag_p50_ms"),
        "served": side.served,
    }


def bench_security(quick: bool) -> dict:
    from bench.log import _record
    from libkvmrr import best_counter
    proc = kafkactl("fetch", timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"kafkactl fetch failed: {proc.stderr.strip()[-2000:]}")
    rounds = 2 if quick else 4
    counter, _ = best_counter()
    out = {"machine": platform.node(), "cpus": os.cpu_count(), "quick": quick,
           "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
           "note": "two single-node brokers on loopback at once, plain and secure "
                   "(SASL_SSL, SCRAM-SHA-512, ACLs; clients with the VM's record key so "
                   "every record carries its HMAC), the runs alternating between them; "
                   "the recorder, the brokers and other work share this machine's CPUs"}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvmrr-bench-secrets-") as tmp:
        secrets = make_secrets(Path(tmp) / "secrets", [])
        with LocalKafka(1, f"bench-{os.getpid()}-plain") as plain, \
                LocalKafka(1, f"bench-{os.getpid()}-secure", secrets) as secure:
            sides = {"plain": Side(plain, None), "secure": Side(secure, secrets)}
            out["startup_s"] = {"plain": plain.started_s, "secure": secure.started_s}
            warm = 10.0 if quick else WARMUP_S
            for side in sides.values():
                _warm_up(side, warm)
            out["warmup_s"] = warm
            for r in range(rounds):
                order = ["plain", "secure"] if r % 2 == 0 else ["secure", "plain"]
                for name in order:
                    side = sides[name]
                    vm = side.new_vm()
                    with side.signed_in(vm):
                        side.writes += write_latencies(side.kafka.bootstrap, vm,
                                                        50 if quick else 100)
                    vm = side.new_vm()
                    with side.signed_in(vm):
                        rec, _ = _record(side.kafka.bootstrap, vm, "kvstore", load=2000.0,
                                         max_instructions=1_000_000 if quick else 2_000_000)
                    side.commits.append({k: rec[k] for k in (
                        "commit_p50_ms", "commit_p99_ms", "events_per_s", "output_slices")})
                    LOG.info("round", side=name, round=r, commit_p50_ms=rec["commit_p50_ms"])
                    side.served.append(served_hops(
                        side, Path(tmp) / f"{name}{r}", rate_hz=150.0,
                        seconds=4.0 if quick else 8.0, counter=counter))
                    LOG.info("served", side=name, round=r, **side.served[-1])
            for name, side in sides.items():
                out[name] = _summary(side)
    p, s = out["plain"], out["secure"]

    def ratio(a, b):
        return round(b / a, 3) if a and b else None
    out["secure_over_plain"] = {
        "replicated_write_p50": ratio(p["replicated_write"]["p50_ms"],
                                      s["replicated_write"]["p50_ms"]),
        "record_commit_p50": ratio(p["record_commit_p50_ms"], s["record_commit_p50_ms"]),
        "served_output_commit_p50": ratio(p["served_output_commit_p50_ms"],
                                          s["served_output_commit_p50_ms"]),
        "served_client_p50": ratio(p["served_client_p50_ms"], s["served_client_p50_ms"]),
        "record_events_per_s": ratio(p["record_events_per_s"], s["record_events_per_s"]),
    }
    r = out["secure_over_plain"]["record_commit_p50"]
    out["floors"] = {"secure_record_commit_p50<=1.10*plain": r is not None and r <= P50_FLOOR}
    out["seconds"] = round(time.monotonic() - t0, 1)
    out["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def jit_ab(rounds: int = 3, warm_s: float = 30.0) -> list[dict]:
    """The served runs on three brokers at once, alternating: plain, secure with C2 (how
    kafkactl started secure nodes before session 6) and secure with C1 only (kafkactl's
    default now): `python -m bench.security jit` (docs/ARCHITECTURE.md §9).  Each row
    also has the broker's CPU while no VM ran (broker_idle_cores)."""
    from libkvmrr import best_counter
    counter, _ = best_counter()
    opts = {"plain": None, "secure_c2": "-XX:+UseSerialGC",
            "secure_c1": "-XX:+UseSerialGC -XX:TieredStopAtLevel=1"}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="kvmrr-bench-jit-") as tmp:
        secrets = make_secrets(Path(tmp) / "secrets", [])
        kafkas = {}
        try:
            for name, jvm in opts.items():
                os.environ.pop("KAFKA_JVM_PERFORMANCE_OPTS", None)
                if jvm:        # read by kafkactl when it starts the node
                    os.environ["KAFKA_JVM_PERFORMANCE_OPTS"] = jvm
                kafkas[name] = LocalKafka(1, f"bench-{os.getpid()}-{name}",
                                          secrets if name != "plain" else None).__enter__()
            os.environ.pop("KAFKA_JVM_PERFORMANCE_OPTS", None)
            sides = {n: Side(k, secrets if n != "plain" else None) for n, k in kafkas.items()}
            for side in sides.values():
                _warm_up(side, warm_s)
            order = list(sides)
            for r in range(rounds):
                for name in (order if r % 2 == 0 else order[::-1]):
                    pids = broker_pids(kafkas[name].name)
                    c0 = sum(cpu_s(p) or 0 for p in pids)
                    time.sleep(5)
                    idle = (sum(cpu_s(p) or 0 for p in pids) - c0) / 5
                    row = served_hops(sides[name], Path(tmp) / f"{name}{r}", rate_hz=150.0,
                                      seconds=8.0, counter=counter)
                    row.update(side=name, round=r, broker_idle_cores=round(idle, 3))
                    LOG.info("jit_ab", **row)
                    rows.append(row)
        finally:
            os.environ.pop("KAFKA_JVM_PERFORMANCE_OPTS", None)
            for k in kafkas.values():
                k.__exit__(None, None, None)
    return rows


if __name__ == "__main__":
    import argparse
    import json
    ap = argparse.ArgumentParser(prog="python -m bench.security")
    ap.add_argument("what", choices=["jit"])
    ap.parse_args()                      # a bad argument: usage and exit 2
    print(json.dumps(jit_ab(), indent=1))
