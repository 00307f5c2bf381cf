"""The cluster in containers (issue 5): the local images (make images) on a Docker network,
driven with testcontainers (no Ryuk, nothing pulled).  Three Kafka brokers for the module;
each test runs a fresh VM's primary, backups and gateway as kvmrr/node containers, breaks
something, and ends with FtCluster.finish(): nothing lost, nothing twice, every survivor's
final state equal to an offline replay of the whole log.

Skipped, with the reason, when no Docker engine can be started or the images are missing.
"""
from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from ftchecks import assert_verified
from harness.containers import ContainerProcess, docker, engine_answers, wait_healthy
from harness.ftcluster import BACKUP_EVENTS, FtCluster, wait_for
from harness.localkafka import free_base_port
from kvmrr_log.paths import REPO

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ENGINE = REPO / "compose" / "images" / "engine"
KAFKA_VERSION = "4.1.2"
IMAGES = (f"kvmrr/kafka:{KAFKA_VERSION}", "kvmrr/node:latest")
RATE = 60.0          # requests/s, as in test_ft
CLUSTER_ID = "a3ZtcnItdGVzdHMAAAAAAQ"
VOTERS = "1@kafka1:9093,2@kafka2:9093,3@kafka3:9093"

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")


@pytest.fixture(scope="module")
def engine():
    """A Docker engine that answers, with the local images; one started here is stopped."""
    started = False
    if not engine_answers():
        proc = subprocess.run([str(ENGINE), "start"], capture_output=True, text=True)
        if proc.returncode != 0:
            reason = f"no Docker engine could be started: {proc.stderr.strip()[-300:]}"
            print(f"\ntest_compose: SKIPPED: {reason}")
            pytest.skip(reason)
        started = True
    try:
        missing = [i for i in IMAGES if docker("image", "inspect", i, check=False) in ("", "[]")]
        if missing:
            reason = f"images {', '.join(missing)} are not built (make images)"
            print(f"\ntest_compose: SKIPPED: {reason}")
            pytest.skip(reason)
        yield
    finally:
        if started:
            subprocess.run([str(ENGINE), "stop"], capture_output=True)


@pytest.fixture(scope="module")
def brokers(engine):
    """Three KRaft brokers on a network of their own: (network, {node id: container},
    bootstrap for this host on their published EXTERNAL listeners)."""
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.network import Network

    tag = uuid.uuid4().hex[:6]
    base = free_base_port(3)
    network = Network().create()
    nodes = {}
    try:
        for i in (1, 2, 3):
            host_port = base + i - 1
            nodes[i] = (DockerContainer(IMAGES[0]).with_name(f"kvmrr-t{tag}-kafka{i}")
                        .with_network(network).with_network_aliases(f"kafka{i}")
                        .with_kwargs(hostname=f"kafka{i}")
                        .with_envs(KAFKA_NODE_ID=str(i), KAFKA_VOTERS=VOTERS,
                                   KAFKA_CLUSTER_ID=CLUSTER_ID,
                                   KAFKA_EXTERNAL=f"127.0.0.1:{host_port}")
                        .with_exposed_ports(9094))
            nodes[i].ports["9094"] = ("127.0.0.1", host_port)     # loopback only
            nodes[i].start()
        wait_healthy([c._name for c in nodes.values()], timeout=240)
        yield network, nodes, ",".join(f"127.0.0.1:{base + i}" for i in range(3))
    finally:
        for c in nodes.values():
            c.stop()
        network.remove()


class Nodes:
    """A VM's primary, backups and gateway as kvmrr/node containers, attached to FtCluster."""

    def __init__(self, brokers, workdir: Path, **settings):
        from testcontainers.core.container import DockerContainer
        self.network, self.kafka, bootstrap = brokers
        self.tag = uuid.uuid4().hex[:6]
        self.ft = FtCluster(bootstrap, workdir, vm=f"t{self.tag}",
                            commit=settings.get("KVMRR_COMMIT", "log"), failover_timeout=3)
        self.env = {"KVMRR_VM": self.ft.vm, "KVMRR_COMMIT": self.ft.commit,
                    "KVMRR_FAILOVER_TIMEOUT": "3", **settings}
        self.containers = {}
        self._container = DockerContainer

    def start(self, name: str, command: list[str], watch=(), ports=()) -> ContainerProcess:
        c = (self._container(IMAGES[1]).with_name(f"kvmrr-t{self.tag}-{name}")
             .with_network(self.network).with_command(command).with_envs(**self.env)
             .with_kwargs(devices=["/dev/kvm:/dev/kvm"]))
        for p in ports:
            c.ports[str(p)] = ("127.0.0.1",)          # any free port on loopback only
        c.start()
        self.containers[name] = c
        self.ft.attach(name, ContainerProcess(c._name), watch)
        return c

    def up(self, backups=("b1", "b2")) -> None:
        self.start("primary", ["primary"])
        wait_healthy([self.containers["primary"]._name])
        for b in backups:
            self.start(b, ["backup", b], watch=BACKUP_EVENTS)
        gw = self.start("gateway", ["gateway"], ports=(7070,))
        wait_healthy([c._name for c in self.containers.values()])
        self.ft.gateway_port = int(docker("port", gw._name, "7070").splitlines()[0]
                                   .rsplit(":", 1)[1])
        self.ft.wait_backups_reading()

    def name(self, node: str) -> str:
        return self.containers[node]._name

    def stop(self) -> None:
        self.ft.stop()
        for c in self.containers.values():
            c.stop()


@pytest.fixture
def cluster(brokers, tmp_path):
    made = []

    def make(**settings) -> Nodes:
        nodes = Nodes(brokers, tmp_path, **settings)
        made.append(nodes)
        return nodes
    yield make
    for nodes in made:
        nodes.stop()


def test_broker_killed_during_recording(cluster, brokers):
    """The broker leading the VM's log is killed while the primary records and serves; the
    other two carry the log (replication 3, min ISR 2) and nothing is lost."""
    from kvmrr_log.kafka import admin_client, topics
    _, kafka, bootstrap = brokers
    nodes = cluster()
    nodes.up()
    ft = nodes.ft
    client = ft.client()
    client.run(RATE, 2.0)
    log_topic = topics(ft.vm).log
    leader = admin_client(bootstrap).list_topics(log_topic, timeout=10) \
        .topics[log_topic].partitions[0].leader
    victim = kafka[leader]
    docker("kill", victim._name)
    try:
        client.run(RATE, 4.0)
        assert nodes.ft.primary.proc.poll() is None, "the primary stopped with a broker"
        res = ft.finish(client, drain_s=60)
    finally:
        docker("start", victim._name)
        wait_healthy([c._name for c in kafka.values()], timeout=240)
    # the log is silent while Kafka moves its leader (broker.session.timeout.ms, 6 s), longer
    # than the failover timeout: a backup may take over, fencing the primary; no harm done
    assert len(res["took_over"]) <= 1, res["ends"]
    print(f"\nbroker {leader} killed: takeovers {res['took_over']}")
    assert_verified(res, survivors=3 - len(res["took_over"]))


def test_primary_container_killed(cluster):
    """`docker kill` of the primary's container: exactly one backup takes over."""
    nodes = cluster()
    nodes.up()
    ft = nodes.ft
    client = ft.client()
    client.run(RATE, 2.0)
    t_kill = time.monotonic()
    ft.primary.kill()
    client.run(RATE, 4.0)
    assert client.drain(120), "requests left unanswered after the takeover"
    failover = ft.first_new_primary_answer(client, t_kill)
    res = ft.finish(client)
    print(f"\nfailover (container killed): {failover} s")
    assert failover is not None
    assert len(res["took_over"]) == 1 and res["takeover_attempts"] == 1, res["ends"]
    assert_verified(res, survivors=2)


def test_backup_container_restarted_restores_from_a_snapshot(cluster):
    """`docker restart` of a backup: it comes back from the latest snapshot, not from icount
    0, follows the log again and ends in the same state."""
    nodes = cluster(KVMRR_SNAPSHOT_EVERY="300000")
    nodes.up()
    ft = nodes.ft
    client = ft.client()
    client.run(RATE, 3.0)
    docker("restart", "-t", "1", nodes.name("b2"))
    b2 = ft.attach("b2", ContainerProcess(nodes.name("b2")), BACKUP_EVENTS)
    client.run(RATE, 2.0)
    wait_for(lambda: b2.last("reading") and b2.last("reading")["snapshot_icount"] > 0
             and sum(ln.get("event") == "reading" for ln in b2.lines) == 2,
             120, "the restarted backup to read from a snapshot")
    client.run(RATE, 2.0)
    res = ft.finish(client)
    assert res["took_over"] == []
    assert_verified(res, survivors=3)


def test_primary_disconnected_then_reconnected_is_fenced(cluster):
    """The primary's container is cut from the network: a backup takes over; when it is
    connected again its next commit is fenced, and it exits 3 with "kvmrr: fenced: ..."."""
    nodes = cluster()
    nodes.up(backups=("b1",))
    ft = nodes.ft
    client = ft.client()
    client.run(RATE, 2.0)
    primary = ft.primary
    docker("network", "disconnect", nodes.network.name, nodes.name("primary"))
    client.run(RATE, 1.0)
    wait_for(lambda: ft.live_backup() is not None, 60, "a backup to take over")
    client.run(RATE, 1.0)
    assert primary.proc.poll() is None, "the primary stopped before the network returned"
    docker("network", "connect", nodes.network.name, nodes.name("primary"))
    rc = primary.wait(120)
    err = "".join(primary.text)
    assert rc == 3, err[-2000:]
    assert "kvmrr: fenced: a newer primary of VM" in err
    client.run(RATE, 1.0)
    res = ft.finish(client)
    assert res["took_over"] == ["b1"]
    assert_verified(res, survivors=1)
