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

import structlog

from libkvmrr import best_counter
from kvmrr import demo
from harness.containers import wait_healthy
from harness.localkafka import kafka_version, make_secrets
from kvmrr_log import kafka_config
from kvmrr_log.kafka_acls import provision
from kvmrr_log.paths import REPO

ENV_FILE = REPO / "compose" / ".env"
COMPOSE = ["docker-compose", "-f", str(REPO / "compose" / "docker-compose.yml")]
NODES = ["primary", "backup1", "backup2", "gateway"]


def _fresh_nodes(vm: str) -> None:
    """The kvmrr containers created again for VM `vm`; the brokers stay as they are.  The
    new VM's principals and record key are made first (the compose cluster is secure; its
    provision service runs with the first `up` only)."""
    env = dict(os.environ, KVMRR_VM=vm, KAFKA_VERSION=kafka_version())
    secrets = demo.compose_secrets(ENV_FILE, demo.read_env(ENV_FILE))
    if secrets:
        make_secrets(secrets, [vm])
        boot = ",".join(f"127.0.0.1:{demo.read_env(ENV_FILE)[f'KAFKA{i}_HOST_PORT']}"
                        for i in (1, 2, 3))
        with kafka_config.using(secrets / "admin.conf"):
            provision(boot, vm)
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
        structlog.get_logger().info("trial", bench="cluster", trial=i + 1, vm=vm)
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
