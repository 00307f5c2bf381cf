"""Real Kafka brokers for the tests, through compose/kafka/kafkactl on free loopback ports."""
from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KAFKACTL = REPO / "compose" / "kafka" / "kafkactl"
KAFKA_NAME = f"pytest-{os.getpid()}-kafka"          # the session's single node
CLUSTER_NAME = f"pytest-{os.getpid()}-cluster3"     # the session's 3-node cluster
CONTROLLER_OFFSET = 100  # kafkactl puts node i's controller on port + 100 + i



def require_java() -> None:
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("java is not installed: no Kafka broker can run")


def kafkactl(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(KAFKACTL), *args], capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"kafkactl {' '.join(args)} exited {proc.returncode}:\n"
                    f"{proc.stdout}\n{proc.stderr}")
    return proc


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_base_port(nodes: int) -> int:
    """A port P with P..P+nodes-1 and P+100..P+100+nodes-1 all free."""
    rnd = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        p = rnd.randrange(20000, 40000)
        ports = [p + i for i in range(nodes)] + [p + CONTROLLER_OFFSET + i for i in range(nodes)]
        if all(_free(q) for q in ports):
            return p
    raise RuntimeError("no free ports")


def start_cluster(nodes: int, name: str) -> str:
    for _ in range(3):  # a port may be grabbed between the check and the start
        port = free_base_port(nodes)
        proc = kafkactl("start", "--nodes", str(nodes), "--port", str(port), "--name", name,
                        check=False)
        if proc.returncode == 0:
            boot = proc.stdout.strip().splitlines()[-1]
            assert boot == ",".join(f"127.0.0.1:{port + i}" for i in range(nodes))
            return boot
        if "already in use" not in proc.stderr:
            break
    pytest.fail(f"kafkactl start --nodes {nodes} failed ({proc.returncode}):\n{proc.stderr}")


