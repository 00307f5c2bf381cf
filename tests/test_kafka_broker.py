"""The real Kafka broker provisioned by compose/kafka/kafkactl (DESIGN §9).

Starts a single combined broker+controller and a 3-node KRaft cluster on free
loopback ports through the script's command line, and checks what the log of
DESIGN §4 needs: transactional writes read back with read_committed, fencing of
an old producer by a new one with the same transactional.id, and acks=all
producing that survives the loss of one of three brokers.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ck = pytest.importorskip("confluent_kafka")
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer  # noqa: E402
from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[1]
KAFKACTL = REPO / "compose" / "kafka" / "kafkactl"
CONTROLLER_OFFSET = 100  # kafkactl puts node i's controller on port + 100 + i

if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("java is not installed: no Kafka broker can run", allow_module_level=True)


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


@pytest.fixture(scope="module")
def fetched():
    t0 = time.monotonic()
    kafkactl("fetch", timeout=900)
    return time.monotonic() - t0


@pytest.fixture
def single_node(fetched):
    name = f"pytest-{os.getpid()}-single"
    try:
        yield start_cluster(1, name)
    finally:
        kafkactl("stop", "--name", name, check=False)


@pytest.fixture
def cluster3(fetched):
    name = f"pytest-{os.getpid()}-cluster"
    try:
        yield name, start_cluster(3, name)
    finally:
        kafkactl("stop", "--name", name, check=False)


def create_topic(boot: str, topic: str, rf: int, **config: str) -> None:
    admin = AdminClient({"bootstrap.servers": boot})
    futs = admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=rf,
                                         config=config)], operation_timeout=30)
    futs[topic].result(timeout=60)


def consume_all(boot: str, topic: str, expect: int, timeout: float = 30.0) -> list:
    """Read the topic from the start with read_committed until its end."""
    c = Consumer({
        "bootstrap.servers": boot,
        "group.id": f"g-{uuid.uuid4().hex}",
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
    })
    msgs = []
    try:
        c.subscribe([topic])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    if len(msgs) >= expect:
                        break
                    continue
                raise KafkaException(m.error())
            msgs.append(m)
    finally:
        c.close()
    return msgs


def test_single_node_transactions(single_node):
    boot = single_node
    assert kafkactl("status", "--name", f"pytest-{os.getpid()}-single").returncode == 0
    topic = "kvmrr.test.log"
    create_topic(boot, topic, rf=1)

    txid = "kvmrr.test"  # one transactional.id per VM (DESIGN §4)
    p = Producer({"bootstrap.servers": boot, "transactional.id": txid,
                  "enable.idempotence": True})
    p.init_transactions(30)

    def key(icount: int) -> bytes:
        return struct.pack(">Q", icount)

    p.begin_transaction()
    p.produce(topic, key=key(100), value=b"committed-1")
    p.commit_transaction(30)

    p.begin_transaction()
    p.produce(topic, key=key(150), value=b"aborted")
    p.flush(30)
    p.abort_transaction(30)

    p.begin_transaction()
    p.produce(topic, key=key(200), value=b"committed-2")
    p.commit_transaction(30)

    # a new primary with the same transactional.id fences the old one
    p2 = Producer({"bootstrap.servers": boot, "transactional.id": txid,
                   "enable.idempotence": True})
    p2.init_transactions(30)
    with pytest.raises(KafkaException) as exc:
        p.begin_transaction()
        p.produce(topic, key=key(300), value=b"zombie")
        p.commit_transaction(30)
    p.purge()  # the fenced producer keeps its zombie record queued: drop it and
    p.flush(5)  # serve its (failed) delivery report
    assert exc.value.args[0].code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED,
                                        KafkaError.INVALID_PRODUCER_EPOCH), exc.value
    p2.begin_transaction()
    p2.produce(topic, key=key(300), value=b"committed-3")
    p2.commit_transaction(30)

    msgs = consume_all(boot, topic, expect=3)
    assert [m.value() for m in msgs] == [b"committed-1", b"committed-2", b"committed-3"]
    assert [struct.unpack(">Q", m.key())[0] for m in msgs] == [100, 200, 300]
    del exc, p, p2  # destroy the clients now, not after the broker has gone


def _partition_info(boot: str, topic: str):
    md = AdminClient({"bootstrap.servers": boot}).list_topics(topic, timeout=10)
    return md.topics[topic].partitions[0]


def _wait_isr(boot: str, topic: str, size: int, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    part = None
    while time.monotonic() < deadline:
        try:
            part = _partition_info(boot, topic)
            if len(part.isrs) == size and part.leader >= 0:
                return part
        except KafkaException:
            pass
        time.sleep(0.5)
    pytest.fail(f"ISR of {topic} never reached {size} (last: {part and part.isrs})")


def _produce_acks_all(boot: str, topic: str, values: list[bytes]) -> None:
    p = Producer({"bootstrap.servers": boot, "acks": "all", "enable.idempotence": True,
                  "message.timeout.ms": 45000})
    errors = []
    for v in values:
        p.produce(topic, value=v, on_delivery=lambda err, msg: err and errors.append(err))
    assert p.flush(60) == 0, "messages still in flight"
    assert errors == []


@pytest.mark.cluster
@pytest.mark.slow
def test_cluster_survives_one_broker(cluster3):
    name, boot = cluster3
    assert len(boot.split(",")) == 3
    topic = "kvmrr.test3.log"
    create_topic(boot, topic, rf=3)
    part = _wait_isr(boot, topic, 3)
    assert sorted(part.replicas) == [0, 1, 2]

    _produce_acks_all(boot, topic, [b"before"])

    victim = part.leader  # the hard case: the partition leader dies
    kafkactl("kill-node", "--name", name, "--node", str(victim))
    st = kafkactl("status", "--name", name, check=False)
    assert st.returncode == 3 and "down" in st.stdout

    # with min.insync.replicas=2 the two survivors still take acks=all writes
    _produce_acks_all(boot, topic, [b"during-1", b"during-2"])
    part = _partition_info(boot, topic)
    assert part.leader != victim and victim not in part.isrs

    out = kafkactl("start-node", "--name", name, "--node", str(victim)).stdout.strip()
    assert out == boot
    _wait_isr(boot, topic, 3)
    assert kafkactl("status", "--name", name).returncode == 0

    _produce_acks_all(boot, topic, [b"after"])
    msgs = consume_all(boot, topic, expect=4)
    assert [m.value() for m in msgs] == [b"before", b"during-1", b"during-2", b"after"]
