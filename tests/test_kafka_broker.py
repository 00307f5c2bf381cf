"""The real Kafka broker provisioned by compose/kafka/kafkactl (docs/ARCHITECTURE.md §9).

Starts a single combined broker+controller and a 3-node KRaft cluster on free
loopback ports through the script's command line, and checks the broker's
transactions (read_committed, fencing by transactional.id: the log's first design,
kept as a check of the broker; the log itself now uses epochs, issue 12) and what
the log of docs/ARCHITECTURE.md §4 needs: acks=all producing that survives the loss of one of
three brokers.
"""

from __future__ import annotations

import struct
import time
import uuid

import pytest

ck = pytest.importorskip("confluent_kafka")
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer  # noqa: E402
from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402

pytestmark = pytest.mark.kafka

from brokers import KAFKA_NAME, kafkactl  # noqa: E402


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


def test_single_node_transactions(kafka):
    boot = kafka
    assert kafkactl("status", "--name", KAFKA_NAME).returncode == 0
    topic = "kvmrr.test.log"
    create_topic(boot, topic, rf=1)

    txid = "kvmrr.test"  # one transactional.id per VM (docs/ARCHITECTURE.md §4.5)
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


def _partition_info(boot: str, topic: str, timeout: float = 30.0):
    """Partition 0's metadata; asked again while a broker just lost reports the topic
    without its partitions (a KeyError here once)."""
    deadline = time.monotonic() + timeout
    while True:
        md = AdminClient({"bootstrap.servers": boot}).list_topics(topic, timeout=10)
        parts = md.topics[topic].partitions
        if 0 in parts or time.monotonic() > deadline:
            return parts[0]
        time.sleep(0.5)


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
def test_cluster_survives_one_broker(kafka_cluster):
    name, boot = kafka_cluster
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
