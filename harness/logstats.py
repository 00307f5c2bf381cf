"""Figures about a VM's topics, read back from Kafka: what was released, how big the log is."""
from __future__ import annotations

from kvmrr_log.epochs import valid_releases
from kvmrr_log.kafka import client_id, scan_topic, topics
from schemas import decode_message, message_kind


def released_outputs(bootstrap: str, vm: str) -> list[dict]:
    """Every response validly released on .out, in order (the epoch rule: what the gateway
    passes on)."""
    return valid_releases(bootstrap, vm)


def void_outputs(bootstrap: str, vm: str) -> list[dict]:
    """Responses on .out that the epoch rule voids (an old primary's, after its
    successor's seal): nobody passes them on."""
    valid = {(o["seq"], o["epoch"], o["log_offset"]) for o in released_outputs(bootstrap, vm)}
    outs = [decode_message(m.value(), m.headers())
            for m in scan_topic(bootstrap, topics(vm).outputs,
                                     client_id=client_id(vm, "harness"))
            if message_kind(m.headers() or []) == "Output"]
    return [o for o in outs if (o["seq"], o["epoch"], o["log_offset"]) not in valid]


def released_seqs(bootstrap: str, vm: str) -> list[int]:
    """The seq of every valid release, in order (a seq twice = released twice)."""
    return [o["seq"] for o in released_outputs(bootstrap, vm)]


def log_bytes(bootstrap: str, vm: str) -> int:
    """Bytes of committed log messages (values and keys; snapshots not included)."""
    return sum(len(m.value() or b"") + len(m.key() or b"")
               for m in scan_topic(bootstrap, topics(vm).log,
                                   client_id=client_id(vm, "harness")))
