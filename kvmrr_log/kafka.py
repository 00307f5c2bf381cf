"""The log on Kafka (DESIGN §4): topic names, the cluster check, topic creation, and the
client settings the recorder and the backups share."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from typing import Iterator

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

WRITER_HEADER = "kvmrr-writer"   # writer_id(vm) on every message a primary writes
CONNECT_TIMEOUT_S = 6.0
SNAPSHOT_CHUNK_BYTES = 512 * 1024


class KafkaLogError(Exception):
    """The log on Kafka cannot be used; one line naming topic and offset where known."""


class FencedError(KafkaLogError):
    """A newer primary of this VM took over (a newer epoch in the log): this recorder must
    release nothing more."""


@dataclass(frozen=True)
class Topics:
    log: str
    snapshots: str
    acks: str
    inputs: str        # the service's requests (from the gateway), consumed by the primary
    outputs: str       # its released responses, one per output seq (DESIGN §5)
    succession: str    # no messages: its one partition, held in a consumer group, names
                       # the backup that takes over (DESIGN §6)


def topics(vm: str) -> Topics:
    return Topics(f"kvmrr.{vm}.log", f"kvmrr.{vm}.snapshots", f"kvmrr.{vm}.acks",
                  f"kvmrr.{vm}.in", f"kvmrr.{vm}.out", f"kvmrr.{vm}.succession")


def writer_id(vm: str) -> str:
    """Every primary of the VM, in the WRITER_HEADER of what it writes (which primary, and
    whether it still counts, is the record's epoch: kvmrr_log.epochs)."""
    return f"kvmrr.{vm}.recorder"


# librdkafka's own log lines (a "Connection refused" every 50 ms while a broker is down)
# would flood stderr, which carries the one-line errors and the backups' JSON logs: they go
# to this logger instead, silent unless KVMRR_KAFKA_LOG=1 (or a handler is configured).
CLIENT_LOG = logging.getLogger("kvmrr.kafka")
if os.environ.get("KVMRR_KAFKA_LOG"):
    CLIENT_LOG.addHandler(logging.StreamHandler())
else:
    CLIENT_LOG.addHandler(logging.NullHandler())
    CLIENT_LOG.propagate = False


def client_conf(bootstrap: str) -> dict:
    return {"bootstrap.servers": bootstrap, "client.id": "kvmrr",
            "socket.connection.setup.timeout.ms": 5000, "log_level": 3,
            "logger": CLIENT_LOG}


def admin_client(bootstrap: str) -> AdminClient:
    return AdminClient(client_conf(bootstrap))


def cluster_size(admin: AdminClient, bootstrap: str) -> int:
    """Number of brokers, or a clear error if none answers within CONNECT_TIMEOUT_S."""
    try:
        md = admin.list_topics(timeout=CONNECT_TIMEOUT_S)
    except KafkaException as exc:
        raise KafkaLogError(f"no Kafka broker answers at {bootstrap} within "
                            f"{CONNECT_TIMEOUT_S:.0f} s ({exc.args[0].str()})") from None
    return len(md.brokers)


def ensure_topics(bootstrap: str, vm: str) -> Topics:
    """Create the VM's topics if missing: one partition for the log (total order);
    replication 3 and min ISR 2 on a cluster of three or more, 1 and 1 on a single node."""
    admin = admin_client(bootstrap)
    brokers = cluster_size(admin, bootstrap)
    rf = min(3, brokers)
    min_isr = 2 if rf >= 3 else 1
    t = topics(vm)
    existing = set(admin.list_topics(timeout=CONNECT_TIMEOUT_S).topics)
    common = {"min.insync.replicas": str(min_isr), "retention.ms": "-1",
              "retention.bytes": "-1", "unclean.leader.election.enable": "false"}
    wanted = [
        NewTopic(t.log, 1, rf, config=common),
        NewTopic(t.snapshots, 1, rf, config=dict(common, **{"max.message.bytes": str(2 << 20)})),
        NewTopic(t.acks, 1, rf, config=common),
        NewTopic(t.inputs, 1, rf, config=common),
        NewTopic(t.outputs, 1, rf, config=common),
        NewTopic(t.succession, 1, rf, config=common),
    ]
    missing = [nt for nt in wanted if nt.topic not in existing]
    if missing:
        for name, fut in admin.create_topics(missing, operation_timeout=20).items():
            try:
                fut.result()
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                    raise KafkaLogError(f"cannot create topic {name}: {exc.args[0].str()}") from None
    return t


def absolute_start(offset: int) -> int:
    """OFFSET_BEGINNING as offset 0 (with auto.offset.reset=earliest: the first one kept).
    A consumer assigned the logical offset gets its first record ~500 ms later than one
    assigned an absolute offset here (the logical one is resolved with a retry), and a
    takeover waits for such reads."""
    return 0 if offset == OFFSET_BEGINNING else offset


def scan_topic(bootstrap: str, topic: str, *, start: int = OFFSET_BEGINNING,
               committed: bool = True, timeout: float = 30.0) -> Iterator:
    """Every message of a one-partition topic from start to its current end (raw
    confluent_kafka messages), or a clear error if the broker does not say where that is."""
    c = Consumer(dict(client_conf(bootstrap), **{
        "group.id": "kvmrr-scan", "enable.auto.commit": False, "enable.partition.eof": True,
        "fetch.wait.max.ms": 10,   # the end is known when an empty fetch returns
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed" if committed else "read_uncommitted"}))
    c.assign([TopicPartition(topic, 0, absolute_start(start))])
    deadline = time.monotonic() + timeout
    try:
        while True:
            msg = c.poll(0.5)
            if msg is None:
                if time.monotonic() > deadline:
                    raise KafkaLogError(f"{topic}: the broker sent neither records nor the "
                                        f"end within {timeout:.0f} s")
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    return
                raise KafkaLogError(f"{topic}: {msg.error().str()}")
            deadline = time.monotonic() + timeout
            yield msg
    finally:
        c.close()


def watermarks(bootstrap: str, topic: str, timeout: float = 15.0) -> tuple[int, int]:
    """(low, high) offsets of partition 0, retried while the broker is still electing its
    leader (a topic created a moment ago answers NOT_LEADER for a while)."""
    c = Consumer(dict(client_conf(bootstrap), **{"group.id": "kvmrr-watermarks"}))
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                return c.get_watermark_offsets(TopicPartition(topic, 0), timeout=timeout)
            except KafkaException as exc:     # (NOT_LEADER is not flagged retriable)
                if time.monotonic() > deadline:
                    raise KafkaLogError(f"cannot read the end of {topic}: "
                                        f"{exc.args[0].str()}") from None
                time.sleep(0.1)
    finally:
        c.close()
