"""make bench-cluster -> bench/cluster.json: failover time and output commit latency in the
docker-compose cluster (3 brokers, a primary, 2 backups, the gateway; compose/.env).

Each trial is the compose demo's scenario (kvmrr.demo): the kvmrr containers are created
afresh for a VM of their own on the running brokers, the client sends its load through the
gateway, the primary's container is killed, a backup takes over, and the end is verified.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time

from libkvmrr import best_counter
from kvmrr import demo
from harness.containers import wait_healthy
from kvmrr_log.paths import REPO

ENV_FILE = REPO / "compose" / ".env"
COMPOSE = ["docker-compose", "-f", str(REPO / "compose" / "docker-compose.yml")]
NODES = ["primary", "backup1", "backup2", "gateway"]


def _fresh_nodes(vm: str) -> None:
    """The kvmrr containers created again for VM `vm`; the brokers stay as they are."""
    env = dict(os.environ, KVMRR_VM=vm)
    subprocess.run([*COMPOSE, "rm", "-f", "-s", *NODES], env=env, check=True,
                   capture_output=True)
    subprocess.run([*COMPOSE, "up", "-d", "--no-deps", "primary"], env=env, check=True,
                   capture_output=True)
    wait_healthy(["kvmrr-primary"])
    subprocess.run([*COMPOSE, "up", "-d", "--no-deps", *NODES[1:]], env=env, check=True,
                   capture_output=True)
    wait_healthy([f"kvmrr-{n}" for n in NODES])


def bench_cluster(quick: bool) -> dict:
    counter, _ = best_counter()
    trials = []
    for i in range(1 if quick else 3):
        vm = f"bench{int(time.time())}t{i}"
        demo.say(f"bench-cluster: trial {i + 1}, VM {vm}")
        _fresh_nodes(vm)
        os.environ["KVMRR_VM"] = vm                 # read_env: the shell wins over .env
        trials.append(demo.scenario(demo.compose_cluster(
            ENV_FILE, counter, REPO / "build" / "bench-cluster" / vm), counter))
    ok = [t for t in trials if t["failover_seconds"] is not None]

    def med(key):
        vals = [t[key] for t in ok if t.get(key) is not None]
        return round(statistics.median(vals), 3) if vals else None
    return {
        "suite": "cluster", "host": platform.node(), "counter": counter,
        "cluster": "docker-compose: 3 Kafka brokers (KRaft), primary, 2 backups, gateway",
        "trials": len(trials),
        "failover_seconds": [t["failover_seconds"] for t in trials],
        "failover_seconds_median": med("failover_seconds"),
        "failover_seconds_max": max((t["failover_seconds"] for t in ok), default=None),
        "commit_before_kill_p50_ms": med("commit_before_kill_p50_ms"),
        "commit_before_kill_p99_ms": med("commit_before_kill_p99_ms"),
        "commit_after_takeover_p50_ms": med("commit_p50_ms"),
        "commit_after_takeover_p99_ms": med("commit_p99_ms"),
        "latency_p50_ms": med("latency_p50_ms"), "latency_p99_ms": med("latency_p99_ms"),
        "lost": sum(t["lost"] for t in trials),
        "duplicated": sum(t["duplicated"] for t in trials),
        "state_match": all(t["state_match"] for t in trials),
        "runs": trials,
    }
