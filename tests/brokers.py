"""Real Kafka brokers for the tests, through compose/kafka/kafkactl on free loopback ports."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from harness import localkafka

KAFKA_NAME = f"pytest-{os.getpid()}-kafka"          # the session's single node
CLUSTER_NAME = f"pytest-{os.getpid()}-cluster3"     # the session's 3-node cluster


def require_java() -> None:
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("java is not installed: no Kafka broker can run")


def kafkactl(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = localkafka.kafkactl(*args, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"kafkactl {' '.join(args)} exited {proc.returncode}:\n"
                    f"{proc.stdout}\n{proc.stderr}")
    return proc


def start_cluster(nodes: int, name: str) -> str:
    try:
        boot, port = localkafka.start(nodes, name)
    except localkafka.LocalKafkaError as exc:
        pytest.fail(str(exc))
    assert boot == ",".join(f"127.0.0.1:{port + i}" for i in range(nodes))
    return boot


