"""Figures about a VM's topics, read back from Kafka: what was released, how big the log is."""
from __future__ import annotations

from kvmrr_log.kafka import WRITER_HEADER, scan_topic, topics, transactional_id
from schemas import decode_message


def released_outputs(bootstrap: str, vm: str) -> list[dict]:
    """Every response committed to .out, in order."""
    writer = transactional_id(vm).encode()
    return [decode_message(m.value(), m.headers())
            for m in scan_topic(bootstrap, topics(vm).outputs)
            if dict(m.headers() or []).get(WRITER_HEADER) == writer]


def released_seqs(bootstrap: str, vm: str) -> list[int]:
    """The seq of every response committed to .out, in order (a seq twice = released twice)."""
    return [o["seq"] for o in released_outputs(bootstrap, vm)]


def log_bytes(bootstrap: str, vm: str) -> int:
    """Bytes of committed log messages (values and keys; snapshots not included)."""
    return sum(len(m.value() or b"") + len(m.key() or b"")
               for m in scan_topic(bootstrap, topics(vm).log))
