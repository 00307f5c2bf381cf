"""The log on Kafka (docs/ARCHITECTURE.md §4.2): topic names, the cluster check, topic
creation, and the client settings the recorder and the backups share."""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from dataclasses import dataclass

from typing import Iterator

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from kvmrr_log import kafka_config

WRITER_HEADER = "kvmrr-writer"   # writer_id(vm) on every message a primary writes
CONNECT_TIMEOUT_S = 6.0
SNAPSHOT_CHUNK_BYTES = 512 * 1024
# fetch.wait.max.ms of the consumers that follow a topic's tail without needing its end
# (EOF): a fetch returns as soon as a record comes, so a long poll costs no latency, and an
# idle consumer asks the broker 10 times a second instead of 200 (on a 2-core host the
# brokers' CPU is the commit's latency).
TAIL_FETCH_WAIT_MS = 100


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
    outputs: str       # its released responses, one per output seq
                       # (docs/ARCHITECTURE.md §5)
    succession: str    # no messages: its one partition, held in a consumer group, names
                       # the backup that takes over (docs/ARCHITECTURE.md §6.2)


TOPIC_NAME_MAX = 249                       # Kafka's limit on a topic name
VM_ID_CHARS = re.compile(r"[a-zA-Z0-9._-]+")   # Kafka's legal topic characters


class VmIdError(ValueError):
    """A VM id that cannot name the VM's topics."""


def topics(vm: str) -> Topics:
    """The VM's topics, kvmrr.<vm>.*; VmIdError if the id cannot be part of a topic name."""
    t = _topic_names(vm)
    if not VM_ID_CHARS.fullmatch(vm):
        raise VmIdError(f"VM id {vm!r}: only letters, digits, '.', '_' and '-' can name "
                        f"its Kafka topics")
    longest = max(dataclasses.astuple(t), key=len)
    if len(longest) > TOPIC_NAME_MAX:
        raise VmIdError(f"VM id of {len(vm)} characters: its topic {longest[:40]}… would be "
                        f"{len(longest)} long, Kafka allows {TOPIC_NAME_MAX} (at most "
                        f"{len(vm) - len(longest) + TOPIC_NAME_MAX} for the id)")
    return t


def _topic_names(vm: str) -> Topics:
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


def client_id(vm: str, role: str) -> str:
    """What a Kafka client says it is (the brokers' logs, quotas, request metrics):
    kvmrr.<vm>.<role>, the role being recorder, backup.<id>, replay, gateway, archive..."""
    return f"kvmrr.{vm}.{role}"


def client_conf(bootstrap: str, client_id: str = "kvmrr") -> dict:
    """Every client's settings; on a secure Kafka, with how this process signs in
    (KVMRR_KAFKA_CONFIG, kvmrr_log.kafka_config: the one way credentials reach a client)."""
    return {"bootstrap.servers": bootstrap, "client.id": client_id,
            "socket.connection.setup.timeout.ms": 5000, "log_level": 3,
            "logger": CLIENT_LOG, **kafka_config.current().settings}


def admin_client(bootstrap: str, client_id: str = "kvmrr") -> AdminClient:
    return AdminClient(client_conf(bootstrap, client_id))


def cluster_size(admin: AdminClient, bootstrap: str) -> int:
    """Number of brokers, or a clear error if none answers within CONNECT_TIMEOUT_S."""
    try:
        md = admin.list_topics(timeout=CONNECT_TIMEOUT_S)
    except KafkaException as exc:
        raise KafkaLogError(f"no Kafka broker answers at {bootstrap} within "
                            f"{CONNECT_TIMEOUT_S:.0f} s ({exc.args[0].str()})") from None
    return len(md.brokers)


HOUR_MS = 3_600_000
MIB = 1 << 20
LOG_MESSAGE_BYTES = 2 * MIB        # = the recorder producer's message.max.bytes
# What Kafka keeps of each topic, and the largest record batch it takes (docs/limits.md).
# The log, its snapshots and the released responses are kept for good: a replay from icount
# 0 needs the first snapshot and every batch, and a new primary finds what was released at
# the end of .out (retention would empty it).  Trimming them is an operator's act
# (`kvmrr archive`, then delete the VM's topics).  Acks matter only while fresh, requests
# once consumed (the log records how far): they expire, in segments small enough to go.
TOPIC_SETTINGS: dict[str, dict[str, str]] = {
    "log": {"retention.ms": "-1", "retention.bytes": "-1",
            "max.message.bytes": str(LOG_MESSAGE_BYTES)},
    "snapshots": {"retention.ms": "-1", "retention.bytes": "-1",
                  "max.message.bytes": str(LOG_MESSAGE_BYTES)},  # 512 KiB chunks
    "acks": {"retention.ms": str(HOUR_MS), "retention.bytes": "-1",
             "segment.ms": str(HOUR_MS // 6), "max.message.bytes": str(MIB)},
    "inputs": {"retention.ms": str(7 * 24 * HOUR_MS), "retention.bytes": "-1",
               "segment.ms": str(HOUR_MS), "max.message.bytes": str(MIB)},
    "outputs": {"retention.ms": "-1", "retention.bytes": "-1",
                "max.message.bytes": str(MIB)},
    "succession": {"retention.ms": "-1", "retention.bytes": "-1",
                   "max.message.bytes": str(64 * 1024)},     # it holds no messages
}


def ensure_topics(bootstrap: str, vm: str) -> Topics:
    """Create the VM's topics if missing: one partition each (total order); replication 3
    and min ISR 2 on a cluster of three or more, 1 and 1 on a single node; retention and
    the largest batch per TOPIC_SETTINGS.  Topics that exist are left as they are."""
    admin = admin_client(bootstrap, client_id(vm, "admin"))
    brokers = cluster_size(admin, bootstrap)
    rf = min(3, brokers)
    min_isr = 2 if rf >= 3 else 1
    t = topics(vm)
    existing = set(admin.list_topics(timeout=CONNECT_TIMEOUT_S).topics)
    common = {"min.insync.replicas": str(min_isr), "unclean.leader.election.enable": "false"}
    wanted = [NewTopic(getattr(t, kind), 1, rf, config=dict(common, **settings))
              for kind, settings in TOPIC_SETTINGS.items()]
    missing = [nt for nt in wanted if nt.topic not in existing]
    if missing:
        for name, fut in admin.create_topics(missing, operation_timeout=20).items():
            try:
                fut.result()
            except KafkaException as exc:
                if exc.args[0].name() == "TOPIC_AUTHORIZATION_FAILED":
                    raise KafkaLogError(f"cannot create topic {name}: not authorized (on a "
                                        f"secure Kafka the admin provisions a VM first: "
                                        f"kvmrr provision)") from None
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
               committed: bool = True, timeout: float = 30.0,
               client_id: str = "kvmrr") -> Iterator:
    """Every message of a one-partition topic from start to its current end (raw
    confluent_kafka messages), or a clear error if the broker does not say where that is."""
    c = Consumer(dict(client_conf(bootstrap, client_id), **{
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


def watermarks(bootstrap: str, topic: str, timeout: float = 15.0,
               client_id: str = "kvmrr") -> tuple[int, int]:
    """(low, high) offsets of partition 0, retried while the broker is still electing its
    leader (a topic created a moment ago answers NOT_LEADER for a while)."""
    c = Consumer(dict(client_conf(bootstrap, client_id), **{"group.id": "kvmrr-watermarks"}))
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
