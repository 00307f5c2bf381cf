"""`make bench`: the overhead sweep (issue 6).  Reads bench/sweep.json, measures every
point `repeats` times next to its plain-run baseline, writes bench/results.json, and
bench.sweep_report turns that into bench/report.md with its plots.

Sections (each a list of rows, one per point and repeat):
- counter_timer: counting backend x guest timer frequency, no Kafka: record and replay
  instructions/s against a plain run of the same guest, and log bytes per second.
- txn_interval: the recorder's slice interval (--txn-ms; one write per group of slices
  since the epochs, the name is older), served kvstore with one backup:
  output commit latency, log throughput, requests/s against a plain run.
- commit_policy: policy x number of backups: requests/s and output commit latency.
- snapshot_interval: the primary's instructions/s against a run without periodic
  snapshots, and how long a late backup takes from the latest snapshot to the end.
- bandwidth: log Mbit/s per workload.

Progress goes to stderr as structured events (kvmrr.logsetup): after each measured point,
`sweep_point` with which point of how many, the time elapsed and an estimate of the time
left (bench.progress), and that point's figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import structlog

from bench.progress import Progress
from libkvmrr import best_counter
from kvmrr_log.guest_images import load_guest
from harness.localkafka import LocalKafka
from kvmrr_log.paths import REPO
from kvmrr_log.percentiles import percentile_ms

CONFIG = REPO / "bench" / "sweep.json"
LOG = structlog.get_logger(bench="sweep")     # lazy: configured at the start of main()


def load_config(path: Path, quick: bool) -> dict:
    cfg = json.loads(Path(path).read_text())
    quick_cfg = cfg.pop("quick", {})
    cfg.pop("_doc", None)
    if quick:
        cfg.update(quick_cfg)
    return cfg


def sweep_load_hz() -> float:
    """The offered load of the sweep's served rows (commit_policy): the load other
    benches name "the sweep's load"."""
    return float(load_config(CONFIG, quick=False)["commit_policy"]["rate_hz"])


def _cli(*args: str, timeout: float = 900) -> dict:
    proc = subprocess.run([sys.executable, "-m", "kvmrr.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"kvmrr {' '.join(args[:2])} failed: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- counting backend x timer frequency ------------------------------------------------
def _policy_points(cfg: dict) -> list[tuple[str, int]]:
    """(policy, backups) pairs measured: a policy needing more backups than run is not."""
    return [(p, n) for p in cfg["policies"] for n in cfg["backups"]
            if (int(p.split(":")[1]) if ":" in p else 0) <= n]


def plan(cfg: dict) -> dict[str, int]:
    """Points per section of this config, in the order they run (the plain-run baselines
    of the served sections count as points: they take as long as one)."""
    r = cfg["repeats"]
    counts = {
        "counter_timer": lambda c: len(c["timer_hz"]) * len(c["counters"]),
        "txn_interval": lambda c: 1 + len(c["txn_ms"]),
        "commit_policy": lambda c: 1 + len(_policy_points(c)),
        "snapshot_interval": lambda c: len(c["snapshot_every"]),
        "bandwidth": lambda c: len(c["workloads"]),
    }
    return {name: r * count(cfg[name]) for name, count in counts.items() if name in cfg}


def counter_timer(cfg: dict, repeats: int, progress: Progress) -> list[dict]:
    from bench.core import MemorySink
    from recorder.session import RecordSession
    from replayer.session import replay_records
    guest = load_guest("ticks")
    rows = []
    for rep in range(repeats):
        for hz in cfg["timer_hz"]:
            bootargs = f"timer_hz={hz}"
            for counter in cfg["counters"]:
                n = cfg["instructions"][counter]
                plain = RecordSession(guest, MemorySink(), counter="fast", vm_id="sweep",
                                      bootargs=bootargs, max_instructions=n, mode="run").run()
                sink = MemorySink()
                rec = RecordSession(guest, sink, counter=counter, vm_id="sweep",
                                    bootargs=bootargs, max_instructions=n).run()
                t = time.monotonic()
                rep_ = replay_records(sink.records[0], sink.records[1:], counter=counter)
                replay_s = time.monotonic() - t
                if rep_.state_hash != rec.state_hash:
                    raise RuntimeError(f"replay of {counter} at {hz} Hz ended at another state")
                row = {"counter": counter, "timer_hz": hz, "repeat": rep, "instructions": n,
                       "plain_ips": n / plain.seconds, "record_ips": n / rec.seconds,
                       "replay_ips": n / replay_s,
                       "log_bytes_per_s": sink.encoded_bytes / rec.seconds,
                       "events": rec.events}
                row["record_over_plain"] = row["record_ips"] / row["plain_ips"]
                row["replay_over_record"] = row["replay_ips"] / row["record_ips"]
                rows.append(row)
                progress.point("counter_timer", counter=counter, timer_hz=hz,
                               record_over_plain=round(row["record_over_plain"], 2),
                               replay_over_record=round(row["replay_over_record"], 2))
    return rows


# ---- served kvstore ----------------------------------------------------------------------
def plain_requests_per_s(rate_hz: float, seconds: float) -> float:
    r = _cli("run", "kvstore", "--load", str(rate_hz), "--seconds", str(seconds),
             "--json", "--quiet")
    return (r["outputs"] - 1) / r["seconds"]      # minus the console's "ready" line


def served(bootstrap: str, work: Path, *, commit: str, backups: int, txn_ms: float,
           rate_hz: float, seconds: float, counter: str, secrets: Path | None = None) -> dict:
    """secrets: on a secure Kafka (FtCluster(secrets=...), bench/security.py)."""
    from harness.ftcluster import FtCluster
    from harness.logstats import log_bytes
    ft = FtCluster(bootstrap, work, counter=counter, commit=commit, txn_ms=txn_ms,
                   secrets=secrets)
    try:
        ft.start_primary()
        for i in range(backups):
            ft.start_backup(f"b{i + 1}")
        ft.start_gateway()
        ft.wait_backups_reading()
        client = ft.client()
        ready = ft.until_serving(client)
        t0 = time.monotonic()
        client.run(rate_hz, seconds)
        drained = client.drain(60)
        times = [(s, a) for s, a in client.answer_times().values() if s >= t0]
        last = max((a for _, a in times), default=time.monotonic())
        report = client.report()
        latencies = client.latencies_between(sent_from=t0)
        client.request("QUIT", timeout=60)
        summary = ft.primary.result() if ft.primary.wait(120) == 0 else {}
        with ft.as_replica():
            nbytes = log_bytes(bootstrap, ft.vm)
    finally:
        ft.stop()
    return {"requests_per_s": len(times) / (last - t0), "drained": drained,
            "lost": report.lost, "duplicated": report.duplicated,
            **ready,
            "output_commit_p50_ms": summary.get("output_commit_p50_ms"),
            "output_commit_p99_ms": summary.get("output_commit_p99_ms"),
            "client_latency_p50_ms": percentile_ms(latencies, 0.5),
            "client_latency_p99_ms": percentile_ms(latencies, 0.99),
            "log_bytes_per_s": nbytes / max(summary.get("seconds") or seconds, 1e-9)}


def txn_interval(bootstrap: str, work: Path, cfg: dict, repeats: int, counter: str,
                 progress: Progress) -> list[dict]:
    rows = []
    for rep in range(repeats):
        plain = plain_requests_per_s(cfg["rate_hz"], cfg["seconds"])
        progress.point("txn_interval", plain_requests_per_s=round(plain))
        for ms in cfg["txn_ms"]:
            row = served(bootstrap, work / f"txn{ms}-{rep}", commit="log", backups=1,
                         txn_ms=ms, rate_hz=cfg["rate_hz"], seconds=cfg["seconds"],
                         counter=counter)
            row.update(txn_ms=ms, repeat=rep, plain_requests_per_s=plain,
                       over_plain=row["requests_per_s"] / plain)
            rows.append(row)
            progress.point("txn_interval", txn_ms=ms, requests_per_s=round(row["requests_per_s"]),
                           over_plain=round(row["over_plain"], 2),
                           output_commit_p99_ms=row["output_commit_p99_ms"])
    return rows


def commit_policy(bootstrap: str, work: Path, cfg: dict, repeats: int, counter: str,
                  progress: Progress) -> list[dict]:
    rows = []
    for rep in range(repeats):
        plain = plain_requests_per_s(cfg["rate_hz"], cfg["seconds"])
        progress.point("commit_policy", plain_requests_per_s=round(plain))
        for policy, n in _policy_points(cfg):     # none that could never release anything
            row = served(bootstrap, work / f"{policy.replace(':', '')}-{n}-{rep}",
                         commit=policy, backups=n, txn_ms=10.0, rate_hz=cfg["rate_hz"],
                         seconds=cfg["seconds"], counter=counter)
            row.update(policy=policy, backups=n, repeat=rep, plain_requests_per_s=plain,
                       over_plain=row["requests_per_s"] / plain)
            rows.append(row)
            progress.point("commit_policy", policy=policy, backups=n,
                           requests_per_s=round(row["requests_per_s"]),
                           output_commit_p99_ms=row["output_commit_p99_ms"])
    return rows


# ---- snapshots ------------------------------------------------------------------------------
def snapshot_interval(bootstrap: str, work: Path, cfg: dict, repeats: int, counter: str,
                      progress: Progress) -> list[dict]:
    rows = []
    for rep in range(repeats):
        # a different end each repeat: the distance from the last snapshot varies
        n = cfg["instructions"] + rep * 137_731
        for every in cfg["snapshot_every"]:
            vm = f"snap{every}r{rep}{os.getpid()}"
            url = f"kafka://{bootstrap}/{vm}"
            rec = _cli("record", cfg["guest"], "--log", url, "--bootargs", cfg["bootargs"],
                       "--mode", counter, "--max-instructions", str(n),
                       "--snapshot-every", str(every), "--json", "--quiet")
            t = time.monotonic()
            late = _cli("replay", "--log", url, "--start", "latest", "--mode", counter,
                        "--json", "--quiet")
            rows.append({"snapshot_every": every, "repeat": rep, "instructions": n,
                         "record_ips": rec["instructions_per_second"],
                         "snapshots": rec["snapshots"],
                         "catch_up_s": time.monotonic() - t,
                         "catch_up_instructions": n - late["start_icount"]})
            progress.point("snapshot_interval", snapshot_every=every,
                           instructions_per_second=rec["instructions_per_second"],
                           late_backup_s=round(rows[-1]["catch_up_s"], 1))
        base = [r for r in rows if r["repeat"] == rep and r["snapshot_every"] == 0]
        for r in rows:
            if r["repeat"] == rep and base:
                r["record_over_no_periodic"] = r["record_ips"] / base[0]["record_ips"]
    return rows


# ---- log bandwidth ----------------------------------------------------------------------------
def bandwidth(bootstrap: str, work: Path, cfg: dict, repeats: int, counter: str,
              progress: Progress) -> list[dict]:
    from harness.logstats import log_bytes
    rows = []
    for rep in range(repeats):
        for name, w in cfg["workloads"].items():
            vm = f"bw{name}r{rep}{os.getpid()}"
            rec = _cli("record", w["guest"], "--log", f"kafka://{bootstrap}/{vm}",
                       "--bootargs", w["bootargs"], "--load", str(w["load"]), "--mode",
                       counter, "--seconds", str(cfg["seconds"]), "--json", "--quiet")
            nbytes = log_bytes(bootstrap, vm)
            rows.append({"workload": name, "repeat": rep, "log_bytes": nbytes,
                         "seconds": rec["seconds"],
                         "mbit_per_s": nbytes * 8 / rec["seconds"] / 1e6})
            progress.point("bandwidth", workload=name,
                           mbit_per_s=round(rows[-1]["mbit_per_s"], 3))
    return rows


KAFKA_SECTIONS = {"txn_interval": txn_interval, "commit_policy": commit_policy,
                  "snapshot_interval": snapshot_interval, "bandwidth": bandwidth}


def run(config: Path, quick: bool, out_dir: Path) -> dict:
    cfg = load_config(config, quick)
    repeats = cfg["repeats"]
    counter, why = best_counter()
    t_start = time.monotonic()
    results = {"machine": {"host": platform.node(), "cpus": os.cpu_count(),
                           "platform": platform.platform(), "counter": counter,
                           "counter_why": why,
                           "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]},
               "quick": quick, "config": cfg, "sections": {}}
    sections = results["sections"]
    progress = Progress(plan(cfg), event="sweep_point", log=LOG)
    LOG.info("sweep_started", points=progress.total, sections=progress.plan, quick=quick)
    if "counter_timer" in cfg:
        sections["counter_timer"] = counter_timer(cfg["counter_timer"], repeats, progress)
    on_kafka = [name for name in KAFKA_SECTIONS if name in cfg]   # a section left out of
    if on_kafka:                                                   # the config is skipped
        with tempfile.TemporaryDirectory(prefix="kvmrr-sweep-") as tmp, \
                LocalKafka(1, f"sweep-{os.getpid()}") as kafka:
            progress.between_points()          # the broker's start-up is no point's time
            for name in on_kafka:
                sections[name] = KAFKA_SECTIONS[name](kafka.bootstrap, Path(tmp), cfg[name],
                                                      repeats, counter, progress)
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = round(time.monotonic() - t_start, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    from bench.sweep_report import write_report
    write_report(results, out_dir)
    LOG.info("sweep_done", seconds=results["seconds"], points=progress.points_done,
             report=str(out_dir / "report.md"))
    return results


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvmrr sweep")
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--out", default=str(REPO / "bench"), help="folder for the report")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    # a SIGTERM unwinds like ^C, so the sweep's broker and processes are stopped
    signal.signal(signal.SIGTERM, _interrupted)
    from kvmrr.logsetup import configure
    configure()          # progress as structured events on stderr
    run(Path(args.config), args.quick, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
