"""Seeded random faults, round after round (issue 12): each round starts a fresh primary,
two backups and the gateway on a broker of this module's own, puts a client load on them,
and at a random moment does one of

- kill:   SIGKILL the primary;
- stop:   SIGSTOP it until a backup has taken over, then SIGCONT it (a zombie: it must
          stop itself, exit 3, and whatever it wrote after the seal counts for nothing);
- cut:    cut it off from Kafka (tests/netcut.py) until a backup has taken over, then
          let it back;
- broker: SIGKILL the broker for a random while, then restart it on its data.

Every round ends with the same checks as every FT test (FtCluster.finish): nothing lost,
nothing twice, the store as acknowledged, and every survivor's state equal to an offline
replay of the whole log.  The rounds run with security on (issue 14): the module's broker
is secure (TLS, SASL/SCRAM, ACLs) and every round's VM is provisioned on it, its records
MACed; KVMRR_FAULT_ROUNDS_PLAIN=1 runs them on a plain broker instead.  The faults come in seeded shuffles of all four, so rounds 0-3,
4-7, ... have one of each.  `make test` runs ROUNDS_QUICK of them; `make fault-rounds` runs
ROUNDS (marker fault_rounds, left out of the default run: 4 min 20 s plain on a quiet
moment of this shared machine; secure, 8 min 33 s at a loadavg of 10-14 on 2 cores).
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import time
from uuid import uuid4

import pytest

from brokers import kafkactl
from ftchecks import assert_secure, assert_verified
from harness import localkafka
from harness.ftcluster import FtCluster, wait_for

pytestmark = pytest.mark.kafka
RATE = 60.0
SEED = 12
ROUNDS = 20
ROUNDS_QUICK = 3
FAULTS = ("kill", "stop", "cut", "broker")


@pytest.fixture(scope="module")
def own_broker(kafka_jars, tmp_path_factory):
    """(name, bootstrap, secrets folder or None): a single node of the module's own (the
    broker fault kills and restarts it), secure unless KVMRR_FAULT_ROUNDS_PLAIN=1."""
    name = f"pytest-rounds-{uuid4().hex[:6]}"
    secrets = None
    if os.environ.get("KVMRR_FAULT_ROUNDS_PLAIN") != "1":
        secrets = localkafka.make_secrets(tmp_path_factory.mktemp("secrets"), [])
    try:
        boot, _ = localkafka.start(1, name, secrets)
    except localkafka.LocalKafkaError as exc:
        kafkactl("stop", "--name", name, check=False)
        pytest.fail(str(exc))
    try:
        yield name, boot, secrets
    finally:
        kafkactl("stop", "--name", name, check=False)


def schedule(rounds: int, seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    faults: list[str] = []
    while len(faults) < rounds:
        faults += rng.sample(FAULTS, len(FAULTS))
    return faults[:rounds]


def one_round(name: str, boot: str, secrets, workdir, i: int, fault: str) -> dict:
    import netcut
    rng = random.Random(SEED * 1000 + i)
    port = int(boot.rsplit(":", 1)[1])
    workdir.mkdir(parents=True, exist_ok=True)
    bridge = netcut.Bridge(workdir / "kafka.sock", port).start() if fault == "cut" else None
    ft = FtCluster(boot, workdir, secrets=secrets)
    try:
        primary = ft.start_primary(
            wrap=(lambda cmd: netcut.wrap(cmd, port, bridge.path)) if bridge else None)
        ft.start_backup("b1")
        ft.start_backup("b2")
        ft.start_gateway()
        ft.wait_backups_reading()
        client = ft.client(seed=i)
        client.run(RATE, rng.uniform(0.3, 3.0))
        if fault == "kill":
            primary.kill()
        elif fault in ("stop", "cut"):
            primary.signal(signal.SIGSTOP) if fault == "stop" else bridge.cut()
            client.run(RATE, rng.uniform(0.2, 1.0))
            wait_for(lambda: ft.live_backup() is not None, 90, "a backup to take over")
            client.run(RATE, rng.uniform(0.0, 1.5))
            primary.signal(signal.SIGCONT) if fault == "stop" else bridge.restore()
        elif fault == "broker":
            kafkactl("kill-node", "--name", name, "--node", "0")
            time.sleep(rng.uniform(0.2, 3.0))
            kafkactl("start-node", "--name", name, "--node", "0")
        client.run(RATE, rng.uniform(1.0, 3.0))
        if fault in ("stop", "cut"):
            rc = primary.wait(120)
            assert rc == 3, "".join(primary.text)[-2000:]
        res = ft.finish(client, drain_s=60)
    finally:
        ft.stop()
        if bridge:
            bridge.close()
    took = len(res["took_over"])
    assert took == 1 if fault != "broker" else took <= 1, (fault, res["ends"], res["stopped"])
    assert_verified(res, survivors=2 if took else 3)
    if secrets:
        assert_secure(ft)
    return {"fault": fault, "took_over": res["took_over"], "requests": res["requests"],
            "answered": res["answered"]}


def run_rounds(own_broker, tmp_path, rounds: int) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1): the network cut needs a namespace of its own")
    name, boot, secrets = own_broker
    for i, fault in enumerate(schedule(rounds)):
        got = one_round(name, boot, secrets, tmp_path / f"round{i}", i, fault)
        print(f"round {i}: {got}")


def test_fault_rounds_quick(own_broker, tmp_path):
    run_rounds(own_broker, tmp_path, ROUNDS_QUICK)


@pytest.mark.slow
@pytest.mark.fault_rounds
def test_fault_rounds(own_broker, tmp_path):
    run_rounds(own_broker, tmp_path, ROUNDS)
