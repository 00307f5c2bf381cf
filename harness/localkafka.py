"""Real Kafka brokers of our own on loopback (compose/kafka/kafkactl): free ports, a unique
name, stopped on exit.  Used by `make run`, the benchmarks and the tests."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import structlog

from kvmrr_log.paths import REPO

KAFKACTL = REPO / "compose" / "kafka" / "kafkactl"
CONTROLLER_OFFSET = 100       # kafkactl puts node i's controller on port + 100 + i


class LocalKafkaError(RuntimeError):
    pass


def kafkactl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(KAFKACTL), *args], capture_output=True,
                          text=True, timeout=timeout)


def kafka_version() -> str:
    """The Kafka version, written in one place: compose/kafka/pom.xml (`kafkactl version`)."""
    proc = kafkactl("version", timeout=30)
    if proc.returncode != 0:
        raise LocalKafkaError(f"kafkactl version: {proc.stderr.strip()}")
    return proc.stdout.strip()


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_base_port(nodes: int) -> int:
    """A port P with P..P+nodes-1 and P+100..P+100+nodes-1 all free on loopback."""
    rnd = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        p = rnd.randrange(20000, 40000)
        ports = [p + i for i in range(nodes)] + [p + CONTROLLER_OFFSET + i for i in range(nodes)]
        if all(port_free(q) for q in ports):
            return p
    raise LocalKafkaError("no free loopback ports for a broker")


def make_secrets(folder: Path, vms: list[str]) -> Path:
    """`kafkactl secrets`: what a secure Kafka and these VMs need, made where missing."""
    proc = kafkactl("secrets", "--dir", str(folder), *[a for vm in vms for a in ("--vm", vm)],
                    timeout=60)
    if proc.returncode != 0:
        raise LocalKafkaError(f"kafkactl secrets: {proc.stderr.strip()[-500:]}")
    return folder


def provision_vm(bootstrap: str, secrets: Path, vm: str) -> Path:
    """A VM on a secure Kafka: its principals made (if new) and provisioned as the admin
    (topics, SCRAM users, ACLs); the client config its replicas sign in with."""
    from kvmrr_log import kafka_config
    from kvmrr_log.kafka_acls import provision, vm_principal
    make_secrets(secrets, [vm])
    with kafka_config.using(secrets / "admin.conf"):
        provision(bootstrap, vm)
    return secrets / f"{vm_principal(vm)}.conf"


def start(nodes: int, name: str, secrets: Path | None = None) -> tuple[str, int]:
    """Start a kafkactl cluster, secure with a secrets folder; (bootstrap, base port)."""
    for _ in range(3):   # a port may be taken between the check and the start
        port = free_base_port(nodes)
        proc = kafkactl("start", "--nodes", str(nodes), "--port", str(port), "--name", name,
                        *(["--secrets", str(secrets)] if secrets else []))
        if proc.returncode == 0:
            return proc.stdout.strip().splitlines()[-1], port
        if "already in use" not in proc.stderr:
            break
    raise LocalKafkaError(f"kafkactl start --nodes {nodes} failed ({proc.returncode}): "
                          f"{proc.stderr.strip()[-2000:]}")


def stop(name: str) -> str | None:
    """Stop it; an error text, or None."""
    proc = kafkactl("stop", "--name", name, timeout=120)
    if proc.returncode != 0 and "not running" not in proc.stderr + proc.stdout:
        return proc.stderr.strip()
    return None


class LocalKafka:
    """with LocalKafka(3, "bench-x") as k: k.bootstrap.  Logs `kafka_started` and, if
    stopping fails, `kafka_stop_failed`.  secrets: a `kafkactl secrets` folder (make_secrets)
    makes it a secure Kafka (SASL_SSL, ACLs; docs/operating.md §6)."""

    def __init__(self, nodes: int, name: str, secrets: Path | None = None):
        self.nodes, self.name, self.secrets = nodes, name, secrets
        self.log = structlog.get_logger().bind(kafka=name)
        self.bootstrap = ""
        self.port = 0
        self.started_s: float | None = None

    def __enter__(self) -> "LocalKafka":
        t0 = time.monotonic()
        try:
            self.bootstrap, self.port = start(self.nodes, self.name, self.secrets)
        except LocalKafkaError:
            stop(self.name)
            raise
        self.started_s = round(time.monotonic() - t0, 1)
        self.log.info("kafka_started", nodes=self.nodes, bootstrap=self.bootstrap,
                      seconds=self.started_s, secure=bool(self.secrets))
        return self

    def __exit__(self, *exc) -> None:
        err = stop(self.name)
        if err:
            self.log.warning("kafka_stop_failed", error=err)
