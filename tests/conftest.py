import json
import time
import subprocess
import sys

import pytest
from kvmrr_log.paths import REPO



def kvmrr(*args, check=True, timeout=600):
    """Run the kvmrr CLI as a user would; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "kvmrr.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"kvmrr {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def kvmrr_json(*args, **kw):
    proc = kvmrr(*args, "--json", "--quiet", **kw)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def recordings(tmp_path_factory):
    """Recordings shared by the core tests: {(guest, counter, n): (path, summary)}."""
    return {}


@pytest.fixture(scope="session")
def kafka_jars():
    """The broker jars from Maven Central (cached); seconds it took."""
    from brokers import kafkactl, require_java
    require_java()
    t0 = time.monotonic()
    kafkactl("fetch", timeout=900)
    return time.monotonic() - t0


@pytest.fixture(scope="session")
def kafka(kafka_jars):
    """One single-node broker for the whole session: its bootstrap string."""
    from brokers import KAFKA_NAME as name
    from brokers import kafkactl, start_cluster
    try:
        yield start_cluster(1, name)
    finally:
        kafkactl("stop", "--name", name, check=False)


@pytest.fixture(scope="session")
def kafka_cluster(kafka_jars):
    """A 3-node KRaft cluster for the session: (name, bootstrap)."""
    from brokers import CLUSTER_NAME as name
    from brokers import kafkactl, start_cluster
    try:
        yield name, start_cluster(3, name)
    finally:
        kafkactl("stop", "--name", name, check=False)


@pytest.fixture(scope="session")
def secure_kafka(kafka_jars, tmp_path_factory):
    """One secure single-node broker for the session (docs/operating.md §6: every listener
    SASL_SSL with SCRAM-SHA-512, ACLs, VMs' records MACed): (bootstrap, secrets folder).
    The fault-tolerance tests run on it; VMs are added with harness.localkafka.provision_vm."""
    import os

    from harness import localkafka
    secrets = localkafka.make_secrets(tmp_path_factory.mktemp("secrets"), [])
    with localkafka.LocalKafka(1, f"pytest-{os.getpid()}-secure", secrets) as k:
        yield k.bootstrap, secrets
