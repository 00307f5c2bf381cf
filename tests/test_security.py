"""A secure Kafka (docs/operating.md §6), on a real broker started here on loopback: every
listener SASL_SSL, SCRAM users made by `kafkactl secrets`, the KRaft authorizer denying
by default, ACLs per VM (kvmrr provision), and record MACs that readers check.

Two VMs, A and B, are provisioned on the session's secure single node (conftest
secure_kafka), the broker the fault-tolerance tests run on (tests/test_ft.py and others:
every FT scenario with security on).  What must fail fails with
the broker's own refusal (an authorization error code), never a timeout taken for one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, Producer

from harness import localkafka
from kvmrr_log import kafka_config, record_mac
from kvmrr_log.epochs import EpochTail
from kvmrr_log.kafka import (WRITER_HEADER, KafkaLogError, client_conf, scan_topic, topics,
                             writer_id)
from kvmrr_log.kafka_acls import gateway_principal, vm_principal
from kvmrr_log.paths import REPO
from kvmrr_log.topic_reader import LogTopicReader
from recorder.service import AckWatch, KafkaInputs
from schemas import encode_message

pytestmark = pytest.mark.kafka
AUTH_ERRORS = {"TOPIC_AUTHORIZATION_FAILED", "GROUP_AUTHORIZATION_FAILED",
               "CLUSTER_AUTHORIZATION_FAILED"}


@pytest.fixture(scope="module")
def secure(secure_kafka):
    """(bootstrap, secrets folder, vm A, vm B): the session's secure single node
    (conftest), both VMs provisioned."""
    boot, secrets = secure_kafka
    tag = uuid.uuid4().hex[:6]
    a, b = f"sa{tag}", f"sb{tag}"
    for vm in (a, b):
        localkafka.provision_vm(boot, secrets, vm)
    return boot, secrets, a, b


def conf_of(secrets, principal: str | None) -> dict:
    """The client settings of a principal (None: no credentials at all)."""
    if principal is None:
        return {}
    return kafka_config.load(secrets / f"{principal}.conf").settings


def produce(boot, settings: dict, topic: str, value: bytes = b"x", headers=None,
            key: bytes = b"k", client_errors: list | None = None) -> KafkaError | None:
    """One idempotent acks=all write; its delivery error, or None.  client_errors gets
    the client's own errors (a refused sign-in is one; the write then times out)."""
    p = Producer(dict(client_conf(boot, "kvmrr.test.sec"), **settings, **{
        "enable.idempotence": True, "acks": "all", "message.timeout.ms": 8000},
        **({"error_cb": client_errors.append} if client_errors is not None else {})))
    got = []
    p.produce(topic, value, key, headers=headers or [], on_delivery=lambda e, m: got.append(e))
    p.flush(15)
    assert got, "no delivery report within 15 s"
    return got[0]


def consume_error(boot, settings: dict, topic: str, group: str | None = None) -> str | None:
    """The first error a consumer subscribed to topic gets (its name), or None if it reads
    or reaches the end.  (Subscribed: an assigned consumer of a topic it may not describe
    only waits for a partition it never sees.)"""
    c = Consumer(dict(client_conf(boot, "kvmrr.test.sec"), **settings, **{
        "group.id": group or f"kvmrr-test-{uuid.uuid4().hex[:6]}",
        "enable.partition.eof": True, "auto.offset.reset": "earliest",
        "enable.auto.commit": False}))
    try:
        c.subscribe([topic])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is None:
                continue
            if msg.error() is None or msg.error().code() == KafkaError._PARTITION_EOF:
                return None
            return msg.error().name()
        return "TIMED_OUT"
    finally:
        c.close()


def record_keys(secrets, *vms: str) -> list[bytes]:
    """The record keys of the VMs' principals."""
    return [kafka_config.load(secrets / f"{vm_principal(v)}.conf").record_key for v in vms]


def admin_writes(boot, admin: dict, topic: str, rkey: bytes, value: bytes, headers: list,
                 key: bytes | None) -> None:
    """A record written by a principal the broker lets through (a compromised account, a
    mistaken ACL), MACed with key if one is given."""
    if key:
        headers = record_mac.sign(topic, rkey, value, headers, key)
    assert produce(boot, admin, topic, value, headers, rkey) is None


def as_(secrets, principal: str):
    return kafka_config.using(secrets / f"{principal}.conf")


def test_secrets_are_private_and_kept(secure):
    _, secrets, a, _ = secure
    assert (os.stat(secrets).st_mode & 0o777) == 0o700
    for f in secrets.iterdir():
        assert (f.stat().st_mode & 0o777) == 0o600, f
    before = {f.name: f.read_bytes() for f in secrets.iterdir()}
    localkafka.make_secrets(secrets, [a])        # made only when missing: nothing changes
    assert {f.name: f.read_bytes() for f in secrets.iterdir()} == before


def test_a_client_without_credentials_cannot_connect(secure, tmp_path):
    boot, secrets, a, _ = secure
    # no credentials (PLAINTEXT to a SASL_SSL listener): nothing goes through
    assert produce(boot, {}, topics(a).log) is not None
    # TLS to the right CA, a known user, a wrong password: refused by SCRAM
    wrong = dict(conf_of(secrets, vm_principal(a)), **{"sasl.password": "0" * 32})
    seen: list = []
    assert produce(boot, wrong, topics(a).log, client_errors=seen) is not None
    assert any(e.code() == KafkaError._AUTHENTICATION for e in seen), seen
    # the CLI says so in one line, exit 2
    bad = tmp_path / "bad.conf"
    bad.write_text((secrets / f"{vm_principal(a)}.conf").read_text()
                   .replace("sasl.password=", "sasl.password=0") .replace(
                       "ssl.ca.location=ca.pem", f"ssl.ca.location={secrets}/ca.pem")
                   .replace(f"kvmrr.record.key.file={a}.mackey",
                            f"kvmrr.record.key.file={secrets}/{a}.mackey"))
    proc = subprocess.run([sys.executable, "-m", "kvmrr.cli", "replay", "--log",
                           f"kafka://{boot}/{a}"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=kafka_config.env_for(bad))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_vm_cannot_touch_another_vms_topics(secure):
    boot, secrets, a, b = secure
    mine = conf_of(secrets, vm_principal(a))
    assert produce(boot, mine, topics(a).outputs) is None       # its own: allowed
    tb = topics(b)
    for topic in (tb.log, tb.snapshots, tb.acks, tb.outputs, tb.inputs):
        err = produce(boot, mine, topic)
        assert err is not None and err.name() in AUTH_ERRORS, (topic, err)
        assert consume_error(boot, mine, topic) in AUTH_ERRORS, topic


def test_the_gateway_cannot_write_the_log_acks_snapshots_or_responses(secure):
    boot, secrets, a, _ = secure
    gw = conf_of(secrets, gateway_principal(a))
    t = topics(a)
    assert produce(boot, gw, t.inputs) is None                   # its one job: requests
    for topic in (t.log, t.acks, t.snapshots, t.outputs):
        err = produce(boot, gw, topic)
        assert err is not None and err.name() in AUTH_ERRORS, (topic, err)
    # it reads what it releases, but not the acks or the snapshots
    assert consume_error(boot, gw, t.outputs) is None
    assert consume_error(boot, gw, t.acks) in AUTH_ERRORS


def test_a_stranger_cannot_join_the_successors_group(secure):
    boot, secrets, a, b = secure
    t = topics(a)
    group = f"kvmrr.{a}.successors"
    for stranger in (vm_principal(b), gateway_principal(a)):
        err = consume_error(boot, conf_of(secrets, stranger), t.succession, group=group)
        assert err in AUTH_ERRORS, (stranger, err)


@pytest.fixture(scope="module")
def recorded(secure):
    """VM A's log: a short recording made as vm-A with its key."""
    boot, secrets, a, _ = secure
    proc = subprocess.run([sys.executable, "-m", "kvmrr.cli", "record", "kvstore", "--log",
                           f"kafka://{boot}/{a}", "--max-instructions", "400000",
                           "--json", "--quiet"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=kafka_config.env_for(
                              secrets / f"{vm_principal(a)}.conf"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return secure


def _last_log_record(boot, secrets, vm):
    with as_(secrets, "admin"):
        msgs = list(scan_topic(boot, topics(vm).log))
    return msgs[-1]


def test_a_keyed_log_replays_with_its_key_and_not_without(recorded):
    boot, secrets, a, _ = recorded
    url = f"kafka://{boot}/{a}"
    ok = subprocess.run([sys.executable, "-m", "kvmrr.cli", "replay", "--log", url, "--json",
                         "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=kafka_config.env_for(secrets / f"{vm_principal(a)}.conf"))
    assert ok.returncode == 0 and json.loads(ok.stdout.splitlines()[-1])["verified"], ok.stderr
    # the admin may read everything, but holds no record key: a keyed log is refused
    no_key = subprocess.run([sys.executable, "-m", "kvmrr.cli", "replay", "--log", url],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=kafka_config.env_for(secrets / "admin.conf"))
    assert no_key.returncode == 2, no_key.stderr
    line = no_key.stderr.strip().splitlines()
    assert len(line) == 1 and record_mac.MAC_HEADER in line[0], no_key.stderr


def test_forged_log_records_are_refused(recorded):
    """Written by a principal the broker lets through (the admin here: a compromised
    account, a mistaken ACL), a record without VM A's MAC is refused by the log's reader:
    no MAC, a MAC with VM B's key, a value changed under A's MAC, A's record copied to B."""
    boot, secrets, a, b = recorded
    orig = _last_log_record(boot, secrets, a)
    headers = [(n, v) for n, v in orig.headers() if n != record_mac.MAC_HEADER]
    key_a, key_b = record_keys(secrets, a, b)
    value = orig.value()
    tampered = value[:-1] + bytes([value[-1] ^ 1])
    log_a = topics(a).log
    forgeries = {
        "no MAC": (log_a, value, headers),
        "B's key": (log_a, value, record_mac.sign(log_a, orig.key(), value, headers, key_b)),
        "altered": (log_a, tampered, record_mac.sign(log_a, orig.key(), value, headers, key_a)),
    }
    admin = conf_of(secrets, "admin")
    with as_(secrets, vm_principal(a)):
        for what, (topic, val, hdrs) in forgeries.items():
            assert produce(boot, admin, topic, val, hdrs, orig.key()) is None
            at = LogTopicReader(boot, a, topic).ask_end(10) - 1
            assert_mac_refused(LogTopicReader(boot, a, topic, at))
        assert record_mac.problem(orig) is None      # the record itself: the control
    # A's record, MAC and all, copied into B's log under B's writer header fails B's reader
    log_b = topics(b).log
    moved = [(n, writer_id(b).encode() if n == WRITER_HEADER else v) for n, v in orig.headers()]
    assert produce(boot, admin, log_b, value, moved, orig.key()) is None
    with as_(secrets, vm_principal(b)):
        assert_mac_refused(LogTopicReader(boot, b, log_b, 0))


def test_forged_requests_never_reach_the_guest(recorded):
    """A request on .in without VM A's MAC (written by a principal the broker lets through:
    the admin here) is skipped by the primary's input reader and counted; the gateway's
    kind (A's key, as `kvmrr gateway` signs) goes into the NIC."""
    boot, secrets, a, b = recorded
    t = topics(a)
    admin = conf_of(secrets, "admin")
    key_a, key_b = record_keys(secrets, a, b)

    def request(rid: str, key: bytes | None):
        admin_writes(boot, admin, t.inputs, rid.encode(), f"{rid} PUT k v".encode(),
                     [("kvmrr-client", b"c1")], key)

    request("forged-none", None)
    request("forged-b", key_b)
    request("real-1", key_a)
    pushed: list[bytes] = []

    class Nic:
        def nic_push(self, packet: bytes) -> bool:
            pushed.append(packet.split(b" ")[0])
            return True

    with as_(secrets, vm_principal(a)):
        inputs = KafkaInputs(boot, a)
        inputs.start(Nic())
        deadline = time.monotonic() + 20
        while b"real-1" not in pushed and time.monotonic() < deadline:
            time.sleep(0.05)
        inputs.close()
    assert b"real-1" in pushed
    assert b"forged-none" not in pushed and b"forged-b" not in pushed, pushed
    assert inputs.forged >= 2


def assert_mac_refused(reader) -> None:
    """The reader's next record fails its MAC check (and the reader is closed)."""
    try:
        with pytest.raises(KafkaLogError, match=record_mac.MAC_HEADER):
            while reader.next(5) is None:
                pass
    finally:
        reader.close()


def test_forged_acks_and_epoch_records_are_ignored_and_counted(recorded):
    """An ack with no MAC or another VM's would release outputs under backups:N; a forged
    Epoch record would fence the primary.  Both are ignored and counted; a real one
    counts."""
    boot, secrets, a, b = recorded
    t = topics(a)
    admin = conf_of(secrets, "admin")
    key_a, key_b = record_keys(secrets, a, b)

    def ack(backup: str, key: bytes | None):
        value, headers = encode_message({
            "kind": "Ack", "backup_id": backup, "received_icount": 10**9,
            "received_seq": 10**6, "replayed_icount": 10**9, "wall_ns": time.time_ns()})
        admin_writes(boot, admin, t.acks, backup.encode(), value, headers, key)

    ack("forged-none", None)
    ack("forged-b", key_b)
    ack("real", key_a)
    with as_(secrets, vm_principal(a)):
        watch = AckWatch(boot, a)
        deadline = time.monotonic() + 20
        while "real" not in watch.received and time.monotonic() < deadline:
            watch.poll()
            time.sleep(0.05)
        watch.consumer.close()
    assert "real" in watch.received
    assert "forged-none" not in watch.received and "forged-b" not in watch.received
    assert watch.forged == 2

    value, headers = encode_message({"kind": "Epoch", "epoch": 7, "writer": "forger",
                                     "wall_ns": time.time_ns()})
    assert produce(boot, admin, t.log, value, headers) is None
    with as_(secrets, vm_principal(a)):
        tail = EpochTail(boot, t.log)
        try:
            tail.read_to_end()
        finally:
            tail.consumer.close()
    assert tail.refused == 1 and 7 not in {e for e, _ in tail.bounds.starts}


def test_the_gateway_serves_tls(tmp_path):
    """`kvmrr gateway --tls-cert`: a client that checks the certificate against the CA of
    `make secrets` gets HELLO OK and its answer; a plain TCP client gets nothing."""
    import socket
    import ssl

    from kvmrr.cli import _server_tls
    from test_gateway_limits import Running, read_line
    secrets = localkafka.make_secrets(tmp_path / "secrets", [])
    run = Running(tls=_server_tls(str(secrets / "gateway-tls.pem")))
    try:
        ctx = ssl.create_default_context(cafile=str(secrets / "ca.pem"))
        with socket.create_connection(("127.0.0.1", run.port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"HELLO c1\nc1-1 PUT k v\n")
            assert read_line(s) == b"HELLO OK"
            (key,) = run.produced_keys(1)
            run.answer(key, b" OK")
            assert read_line(s) == b"c1-1 OK"
        with socket.create_connection(("127.0.0.1", run.port), timeout=5) as s:
            s.sendall(b"HELLO c2\n")
            s.settimeout(5)
            try:
                got = s.recv(100)
            except (ConnectionError, socket.timeout):
                got = b""
            assert b"HELLO OK" not in got
    finally:
        run.stop()
    bad = subprocess.run([sys.executable, "-m", "kvmrr.cli", "gateway", "--log",
                          "kafka://127.0.0.1:1/vm1", "--tls-cert", str(tmp_path / "none.pem")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
