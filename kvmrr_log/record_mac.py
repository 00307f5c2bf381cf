"""Records authenticated beyond the broker (docs/operating.md §6.3): an HMAC-SHA256 with
the VM's record key on every record a reader trusts (log records and Epoch records,
snapshot chunks, acks, released responses).

The MAC, in the `kvmrr-mac` header, covers the topic, the key, the value and every other
header in order (the writer header, the message kind): a record moved to another topic or
VM, or with any byte changed, fails.  The broker's ACLs already keep other principals off
a VM's topics; the MAC is what still holds when they do not (a broker or admin account
compromised, an ACL mistaken), and what lets a reader check a record read from anywhere.
It does not stop the VM's own principal from writing a stale record again: the epoch rule
and the icounts do that.

The rule for readers is one: a reader with a key requires a valid MAC on every record; a
reader without one (PLAIN, the tests' loopback broker) requires that no record carry one:
a keyed log read without its key is refused, never trusted unchecked.
"""
from __future__ import annotations

import hashlib
import hmac
import struct

from kvmrr_log import kafka_config

MAC_HEADER = "kvmrr-mac"
DOMAIN = b"kvmrr-record-mac-v1\0"


def record_key() -> bytes | None:
    """This process's VM record key (KVMRR_KAFKA_CONFIG), or None."""
    return kafka_config.current().record_key


def _field(data: bytes | None) -> bytes:
    if data is None:
        return struct.pack(">q", -1)
    return struct.pack(">q", len(data)) + data


def mac(key: bytes, topic: str, rkey: bytes | None, value: bytes | None,
        headers: list) -> bytes:
    h = hmac.new(key, DOMAIN, hashlib.sha256)
    h.update(_field(topic.encode()))
    h.update(_field(rkey))
    h.update(_field(value))
    for name, hval in headers:
        if name == MAC_HEADER:
            continue
        h.update(_field(name.encode()))
        h.update(_field(hval if isinstance(hval, bytes) or hval is None else hval.encode()))
    return h.digest()


def sign(topic: str, rkey: bytes | None, value: bytes | None, headers: list,
         key: bytes | None = None) -> list:
    """headers with the MAC appended (this process's key unless one is given); unchanged
    when there is no key."""
    key = record_key() if key is None else key
    if not key:
        return headers
    return list(headers) + [(MAC_HEADER, mac(key, topic, rkey, value, headers))]


def problem(msg, key: bytes | None = None) -> str | None:
    """Why a consumed record must not be trusted, or None: a confluent_kafka Message
    checked with this process's key (or the one given)."""
    key = record_key() if key is None else key
    headers = msg.headers() or []
    tags = [v for n, v in headers if n == MAC_HEADER]
    if not key:
        if tags:
            return (f"the record carries a {MAC_HEADER} (a keyed log) but no record key is "
                    f"configured ({kafka_config.ENV})")
        return None
    if len(tags) != 1:
        return f"no {MAC_HEADER} header: not written with this VM's record key"
    want = mac(key, msg.topic(), msg.key(), msg.value(), headers)
    if not hmac.compare_digest(want, tags[0] or b""):
        return f"bad {MAC_HEADER}: not written with this VM's record key, or altered"
    return None
