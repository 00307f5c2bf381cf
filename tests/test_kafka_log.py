"""Issue 3: the log on real Apache Kafka (docs/ARCHITECTURE.md §4).

Recorder -> Kafka -> replay, archive and live backups; the backups' acks and lag; a
broker that is not there, restarted, or lost from a 3-node cluster; and a follower that
meets a record it must not replay.
"""
from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
import time
import urllib.request
from uuid import uuid4

import pytest

from brokers import kafkactl, start_cluster
from conftest import REPO, kvmrr, kvmrr_json

ck = pytest.importorskip("confluent_kafka")
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient  # noqa: E402

from kvmrr_log.kafka import WRITER_HEADER, topics, writer_id  # noqa: E402
from recorder.kafka_sink import KafkaSink  # noqa: E402
from kvmrr_log.topic_reader import read_snapshots  # noqa: E402
from schemas import CATALOG, SCHEMA_HEADER, decode_message, encode_message, icount_key  # noqa: E402
from schemas import read_archive  # noqa: E402

pytestmark = pytest.mark.kafka

_quiet = logging.getLogger("kvmrr.kafka")   # librdkafka's own lines: silent (kvmrr_log.kafka)

TICKS = 600_000         # 0.25-1 s recorded (0.6-2.5 M instructions/s)
KVSTORE = 400_000       # ~2.5 s: the guest idles between the built-in client's requests
KVSTORE_LONG = 1_500_000   # ~9 s: long enough to lose a broker in the middle
HZ = "timer_hz=100"     # fewer interrupts: each costs the replay an exact stop


def new_vm() -> str:
    return f"t{uuid4().hex[:8]}"


def url(boot: str, vm: str) -> str:
    return f"kafka://{boot}/{vm}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_run(rep: dict, rec: dict, *, outputs: bool = True) -> None:
    assert rep["verified"], rep
    assert rep["instructions"] == rec["instructions"]
    assert rep["state_hash"] == rec["state_hash"]
    if outputs:
        assert rep["outputs_verified"]
        assert rep["outputs_sha256"] == rec["outputs_sha256"]


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The last stderr line, which must be the one `kvmrr: error:` line."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("kvmrr: error: "), proc.stderr[-2000:]
    assert sum(ln.startswith("kvmrr:") for ln in lines) == 1, proc.stderr[-2000:]
    return lines[-1]


class Background:
    """A kvmrr command run in the background, its output in files (no pipe to fill)."""

    def __init__(self, tmp_path, name: str, *args):
        self.name = name
        self.out = tmp_path / f"{name}.out"
        self.err = tmp_path / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "kvmrr.cli", *map(str, args)],
                                         cwd=REPO, stdout=out, stderr=err, text=True)

    def wait(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} still running after {timeout} s:\n"
                                 f"{self.err.read_text()[-3000:]}")

    def json(self, timeout: float = 180) -> dict:
        rc = self.wait(timeout)
        assert rc == 0, f"{self.name} exited {rc}:\n{self.err.read_text()[-3000:]}"
        return json.loads(self.out.read_text().strip().splitlines()[-1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def follower(tmp_path, boot, vm, backup, *extra) -> Background:
    return Background(tmp_path, backup, "follow", "--log", url(boot, vm), "--backup-id", backup,
                      "--json", "--quiet", *extra)


def recorder(tmp_path, boot, vm, guest, n, *extra) -> Background:
    return Background(tmp_path, f"record-{vm}", "record", guest, "--log", url(boot, vm),
                      "--mode", "fast", "--max-instructions", n, "--json", "--quiet", *extra)


def read_topic(boot: str, topic: str, timeout: float = 30.0) -> list:
    """Every message of partition 0 of a topic (read_committed), from the start to its end."""
    c = Consumer({"bootstrap.servers": boot, "group.id": f"t-{uuid4().hex}",
                  "enable.auto.commit": False, "enable.partition.eof": True,
                  "isolation.level": "read_committed", "logger": _quiet})
    c.assign([TopicPartition(topic, 0, 0)])
    msgs = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    return msgs
                raise AssertionError(f"{topic}: {m.error()}")
            msgs.append(m)
    finally:
        c.close()
    raise AssertionError(f"{topic}: no end of partition within {timeout} s")


def wait_recording(boot: str, vm: str, rec_proc: Background, running_s: float = 1.0):
    """Until the recorder has committed its first transaction (past its start-up, which
    needs the broker), then running_s more."""
    admin = AdminClient({"bootstrap.servers": boot, "logger": _quiet})
    deadline = time.monotonic() + 60
    while topics(vm).log not in admin.list_topics(timeout=10).topics:
        assert rec_proc.proc.poll() is None, rec_proc.err.read_text()[-2000:]
        assert time.monotonic() < deadline, "the recorder created no topics within 60 s"
        time.sleep(0.1)
    c = Consumer({"bootstrap.servers": boot, "group.id": f"t-{uuid4().hex}",
                  "enable.auto.commit": False, "isolation.level": "read_committed",
                  "logger": _quiet})
    c.assign([TopicPartition(topics(vm).log, 0, 0)])
    try:
        while True:
            assert rec_proc.proc.poll() is None, rec_proc.err.read_text()[-2000:]
            assert time.monotonic() < deadline, "the recorder committed nothing within 60 s"
            m = c.poll(0.1)
            if m is not None and not m.error():
                break
    finally:
        c.close()
    time.sleep(running_s)
    assert rec_proc.proc.poll() is None, "the recording ended before the broker died"


def acks_by_backup(boot: str, vm: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for m in read_topic(boot, topics(vm).acks):
        ack = decode_message(m.value(), m.headers())
        assert ack["kind"] == "Ack"
        assert m.key() == ack["backup_id"].encode()
        out.setdefault(ack["backup_id"], []).append(ack)
    return out



# ---- 1. record to Kafka; replay, archive ---------------------------------------------

@pytest.mark.parametrize("guest,n,step", [("ticks", TICKS, False), ("kvstore", KVSTORE, True)])
def test_record_replay_archive(kafka, tmp_path, guest, n, step):
    vm = new_vm()
    rec = kvmrr_json("record", guest, "--log", url(kafka, vm), "--mode", "fast",
                     "--max-instructions", n, "--checksum-every", 100_000,
                     "--bootargs", HZ)
    assert rec["instructions"] == n and rec["commits"] > 0
    # ticks are host time (100 Hz): how many follows the host's speed (30 in 600 k
    # instructions of ticks at 2.5 M/s, 2026-12-02), so at least half the record's
    # seconds' worth, and 10
    assert rec["events_by_kind"]["Heartbeat"] > 0
    assert rec["events_by_kind"]["Interrupt"] >= max(10, 50 * rec["seconds"]), rec
    if guest == "kvstore":
        assert rec["events_by_kind"]["Dma"] > 5 and rec["events_by_kind"]["PortIn"] > 5

    # the log on Kafka: header first, every message carries both headers
    log = read_topic(kafka, topics(vm).log)
    first = decode_message(log[0].value(), log[0].headers())
    assert first["kind"] == "LogHeader" and first["vm_id"] == vm
    assert all(dict(m.headers())[WRITER_HEADER] == writer_id(vm).encode() for m in log)
    batches = [decode_message(m.value(), m.headers()) for m in log[1:]]
    assert sum(len(b["events"]) for b in batches) == rec["events"]
    assert [m.key() for m in log[1:]] == [icount_key(b["events"][0]["icount"]) for b in batches]

    for mode in ("fast", "step") if step else ("fast",):
        rep = kvmrr_json("replay", "--log", url(kafka, vm), "--mode", mode)
        assert_same_run(rep, rec)

    archive = tmp_path / f"{vm}.avro"
    info = json.loads(kvmrr("archive", "--log", url(kafka, vm), "-o", archive,
                            "--json").stdout)
    assert info["events"] == rec["events"] and info["start_icount"] == 0
    rep = kvmrr_json("replay", "--log", f"file:{archive}", "--mode", "fast")
    assert_same_run(rep, rec)


# ---- 2. live backups, a late one from a snapshot, their acks ------------------------

def test_backups_follow_live_and_ack(kafka, tmp_path):
    vm = new_vm()
    n = 1_000_000
    early = [follower(tmp_path, kafka, vm, b, "--start", "first") for b in ("b1", "b2")]
    late = None
    rec_proc = recorder(tmp_path, kafka, vm, "kvstore", n, "--snapshot-every", 250_000,
                        "--checksum-every", 100_000, "--bootargs", HZ)
    try:
        # the third backup joins once a mid-run snapshot is committed
        deadline = time.monotonic() + 60
        while late is None and time.monotonic() < deadline:
            try:
                snaps = read_snapshots(kafka, vm, timeout=2)
            except Exception:      # the recorder has not created the topics yet
                snaps = []
            if any(s["icount"] > 0 for s in snaps):
                assert rec_proc.proc.poll() is None, "the recording ended before a snapshot"
                late = follower(tmp_path, kafka, vm, "b3")     # --start latest
            else:
                time.sleep(0.2)
        assert late is not None, "no mid-run snapshot within 60 s"
        rec = rec_proc.json()
        assert rec["snapshots"] >= 3
        results = {f.name: f.json() for f in early + [late]}
    finally:
        for p in early + [late, rec_proc]:
            if p:
                p.stop()
    for name in ("b1", "b2"):
        assert results[name]["start_icount"] == 0
        assert_same_run(results[name], rec)
    assert results["b3"]["start_icount"] > 0
    assert_same_run(results["b3"], rec, outputs=False)

    acks = acks_by_backup(kafka, vm)
    for name in ("b1", "b2"):
        replayed = [a["replayed_icount"] for a in acks[name]]
        assert len(replayed) >= 2 and max(replayed) == rec["instructions"]
        assert max(a["received_icount"] for a in acks[name]) == rec["instructions"]
        assert max(a["received_seq"] for a in acks[name]) == rec["events"]


# ---- 3. lag: metrics and log lines --------------------------------------------------

def test_follower_lag_metric_and_log_lines(kafka, tmp_path):
    vm = new_vm()
    port = free_port()
    f = follower(tmp_path, kafka, vm, "m1", "--metrics-port", port, "--start", "first")
    rec_proc = recorder(tmp_path, kafka, vm, "ticks", 1_500_000, "--bootargs", HZ)
    pattern = re.compile(r'^kvmrr_replay_lag_instructions\{([^}]*)\} (\S+)$', re.M)
    scraped = None
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and f.proc.poll() is None:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                              timeout=2).read().decode()
            except OSError:
                text = ""
            found = [m for m in pattern.finditer(text)
                     if f'vm="{vm}"' in m.group(1) and 'backup="m1"' in m.group(1)]
            if found:
                assert float(found[0].group(2)) >= 0
                scraped = text
                break
            time.sleep(0.2)
        rec = rec_proc.json()
        out = f.json()
    finally:
        f.stop()
        rec_proc.stop()
    assert scraped, "kvmrr_replay_lag_instructions{vm,backup} never showed while following"
    assert "kvmrr_replay_lag_seconds" in scraped and "kvmrr_replayed_instructions" in scraped
    assert_same_run(out, rec)
    lines = [json.loads(ln) for ln in f.err.read_text().splitlines() if ln.startswith("{")]
    lag = [ln for ln in lines if "lag_instructions" in ln]
    assert lag, f.err.read_text()[-2000:]
    for ln in lag:
        assert ln["backup"] == "m1" and ln["vm_id"] == vm
        assert isinstance(ln["lag_instructions"], int) and ln["lag_instructions"] >= 0
        assert isinstance(ln["lag_ms"], (int, float)) and ln["lag_ms"] >= 0
    # stderr is a JSON log stream: no librdkafka lines in between
    assert all(ln.startswith("{") for ln in f.err.read_text().splitlines() if ln.strip())


# ---- 4. no broker -------------------------------------------------------------------

def test_no_broker_is_a_clear_error():
    port = free_port()
    t0 = time.monotonic()
    proc = kvmrr("record", "ticks", "--log", f"kafka://127.0.0.1:{port}/x",
                 "--max-instructions", 100_000, check=False, timeout=60)
    took = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    line = one_line_error(proc)
    assert f"127.0.0.1:{port}" in line
    assert len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1, proc.stderr
    assert took < 10, f"took {took:.1f} s"


# ---- 5. the only broker restarted mid-recording -------------------------------------

@pytest.fixture
def own_broker(kafka_jars):
    name = f"pytest-own-{uuid4().hex[:6]}"
    try:
        yield name, start_cluster(1, name)
    finally:
        kafkactl("stop", "--name", name, check=False)


def test_single_broker_restart_mid_recording(own_broker, tmp_path):
    name, boot = own_broker
    vm = new_vm()
    rec_proc = recorder(tmp_path, boot, vm, "kvstore", KVSTORE_LONG, "--checksum-every", 200_000,
                        "--bootargs", HZ)
    try:
        wait_recording(boot, vm, rec_proc)
        kafkactl("kill-node", "--name", name, "--node", "0")
        time.sleep(1.5)
        kafkactl("start-node", "--name", name, "--node", "0")
        rec = rec_proc.json(timeout=240)
    finally:
        rec_proc.stop()
    assert rec["instructions"] == KVSTORE_LONG
    assert rec["commit_p99_ms"] > 1000, "the broker's outage delayed no commit: it missed"
    rep = kvmrr_json("replay", "--log", url(boot, vm), "--mode", "fast")
    assert_same_run(rep, rec)
    # nothing lost or duplicated: the committed batches are exactly the event sequence
    batches = [decode_message(m.value(), m.headers()) for m in read_topic(boot, topics(vm).log)[1:]]
    seqs = [b["first_seq"] for b in batches]
    assert seqs[0] == 0 and all(b["first_seq"] + len(b["events"]) == nxt
                                for b, nxt in zip(batches, seqs[1:]))
    assert sum(len(b["events"]) for b in batches) == rec["events"]


# ---- 6. a 3-node cluster loses a broker mid-recording -------------------------------

def _partition(boot: str, topic: str):
    md = AdminClient({"bootstrap.servers": boot, "logger": _quiet}).list_topics(topic, timeout=10)
    return md.topics[topic].partitions[0]


def _wait_isr(boot: str, topic: str, size: int, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    part = None
    while time.monotonic() < deadline:
        try:
            part = _partition(boot, topic)
            if len(part.isrs) == size and part.leader >= 0:
                return part
        except Exception:
            pass
        time.sleep(0.5)
    pytest.fail(f"ISR of {topic} never got back to {size} (last: {part and part.isrs})")


@pytest.mark.cluster
@pytest.mark.parametrize("victim", ["follower", "leader"])
def test_cluster_loses_a_broker_mid_recording(kafka_cluster, tmp_path, victim):
    name, boot = kafka_cluster
    assert len(boot.split(",")) == 3
    vm = new_vm()
    rec_proc = recorder(tmp_path, boot, vm, "kvstore", KVSTORE_LONG, "--checksum-every", 200_000,
                        "--bootargs", HZ)
    killed = None
    try:
        wait_recording(boot, vm, rec_proc)
        part = _wait_isr(boot, topics(vm).log, 3)
        assert sorted(part.replicas) == [0, 1, 2]
        killed = part.leader if victim == "leader" else next(
            r for r in part.replicas if r != part.leader)
        assert rec_proc.proc.poll() is None, "the recording ended before the broker died"
        kafkactl("kill-node", "--name", name, "--node", str(killed))
        rec = rec_proc.json(timeout=240)
        # the replay reads the log while the broker is still down
        rep = kvmrr_json("replay", "--log", url(boot, vm), "--mode", "fast")
        assert kafkactl("status", "--name", name, check=False).returncode == 3, \
            "the killed broker came back by itself"
    finally:
        rec_proc.stop()
        if killed is not None:
            kafkactl("start-node", "--name", name, "--node", str(killed))
    assert rec["instructions"] == KVSTORE_LONG
    assert_same_run(rep, rec)
    _wait_isr(boot, topics(vm).log, 3)
    assert kafkactl("status", "--name", name).returncode == 0


# ---- 7. a follower meets a record it must not replay ---------------------------------

@pytest.fixture(scope="module")
def ticks_archive(tmp_path_factory):
    """A short recorded ticks log: (header, records) with the End in the last batch."""
    path = tmp_path_factory.mktemp("errlog") / "ticks.avro"
    kvmrr_json("record", "ticks", "--log", f"file:{path}", "--mode", "fast",
               "--max-instructions", 300_000, "--bootargs", "timer_hz=1000")
    header, records = read_archive(path)
    records = list(records)
    assert records[0]["kind"] == "Snapshot" and records[-1]["events"][-1]["kind"] == "End"
    assert len(records) > 10
    return header, records


def publish(boot: str, vm: str, header: dict, records: list[dict], k: int, inject,
            skip: int = 0):
    """Publish an archive to VM's topics as the recorder does (through KafkaSink), with
    what inject(boot, vm, records, k) produces inserted before records[k], an EventBatch,
    and records[k:k+skip] left out.  Returns (offset of the injected record, icount of
    the last event before it)."""
    sink = KafkaSink(boot, vm)
    for rec in [dict(header, vm_id=vm)] + records[:k]:
        sink.write(rec)
    sink.commit()
    sink.close()
    offset = inject(boot, vm, records, k)
    rest = KafkaSink(boot, vm)            # the recorder again
    for rec in records[k + skip:]:
        rest.write(rec)
    rest.commit()
    rest.close()
    return offset, records[k - 1]["events"][-1]["icount"]


def _produce_one(boot: str, vm: str, value: bytes, headers: list, key: bytes) -> int:
    """One message on VM's log, written as the recorder writes (idempotent, acks=all);
    its offset."""
    p = Producer({"bootstrap.servers": boot, "logger": _quiet, "enable.idempotence": True,
                  "acks": "all"})
    offsets, errors = [], []

    def delivered(err, msg):
        if err is None:
            offsets.append(msg.offset())
        else:
            errors.append(err)

    p.produce(topics(vm).log, value, key, headers=headers, on_delivery=delivered)
    assert p.flush(30) == 0 and not errors, errors
    assert len(offsets) == 1
    return offsets[0]


def _writer(vm):
    return (WRITER_HEADER, writer_id(vm).encode())


def _key(batch):
    return icount_key(batch["events"][0]["icount"])


def inject_garbage(boot, vm, records, k):
    """(a) bytes that are no EventBatch, under a valid schema header and the writer's."""
    return _produce_one(boot, vm, b"\xff\xfe garbage, not Avro \x00" * 3,
                        [(SCHEMA_HEADER, CATALOG.fingerprint("EventBatch")), _writer(vm)],
                        _key(records[k]))


def inject_unknown_schema(boot, vm, records, k):
    """(b) a good batch under a schema fingerprint no kvmrr released."""
    value, _ = encode_message(records[k])
    return _produce_one(boot, vm, value, [(SCHEMA_HEADER, b"\x13\x37" * 4), _writer(vm)],
                        _key(records[k]))


def inject_backwards(boot, vm, records, k):
    """(c) batch k with every icount moved to 1000 before the previous batch's last."""
    batch, last = records[k], records[k - 1]["events"][-1]["icount"]
    assert last > 1000
    delta = batch["events"][0]["icount"] - (last - 1000)
    shifted = dict(batch, events=[dict(ev, icount=ev["icount"] - delta)
                                  for ev in batch["events"]])
    value, headers = encode_message(shifted)
    return _produce_one(boot, vm, value, headers + [_writer(vm)], _key(shifted))


def inject_gap(boot, vm, records, k):
    """(d) batch k is lost (publish skips it): batch k+1's first_seq skips."""
    nxt = records[k + 1]
    assert nxt["first_seq"] > records[k]["first_seq"]
    value, headers = encode_message(nxt)
    return _produce_one(boot, vm, value, headers + [_writer(vm)], _key(nxt))


def inject_stranger(boot, vm, records, k):
    """(f) a valid batch from a plain producer: no transaction, no writer header."""
    value, headers = encode_message(records[k])
    return _produce_one(boot, vm, value, headers, _key(records[k]))


@pytest.mark.parametrize("case,expect", [
    ("undecodable", "undecodable"),
    ("unknown-schema", "unknown writer schema"),
    ("backwards", "backwards"),
    ("gap", "gap in the log"),
    ("stranger", "not written by this VM's recorder"),
])
def test_follower_refuses_bad_record(kafka, ticks_archive, case, expect):
    header, records = ticks_archive
    vm = new_vm()
    k = len(records) // 2
    inject, skip = {
        "undecodable": (inject_garbage, 0),
        "unknown-schema": (inject_unknown_schema, 0),
        "backwards": (inject_backwards, 1),
        "gap": (inject_gap, 2),
        "stranger": (inject_stranger, 0),
    }[case]
    offset, last_good = publish(kafka, vm, header, records, k, inject, skip=skip)
    proc = kvmrr("follow", "--log", url(kafka, vm), "--backup-id", "e1", "--start", "first",
                 "--idle-timeout", 10, "--json", "--quiet", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_line_error(proc)
    assert f"{topics(vm).log} offset {offset}" in line, line
    assert expect in line, line
    # it replayed up to the last good event, and not one instruction past it
    acks = acks_by_backup(kafka, vm)["e1"]
    assert max(a["replayed_icount"] for a in acks) == last_good


def test_follower_refuses_another_guest(kafka, ticks_archive):
    header, records = ticks_archive
    vm = new_vm()
    sink = KafkaSink(kafka, vm)
    for rec in [dict(header, vm_id=vm)] + records:
        sink.write(rec)
    sink.commit()
    sink.close()
    proc = kvmrr("follow", "--log", url(kafka, vm), "--backup-id", "g1", "--guest",
                 "build/guests/hello.elf", "--idle-timeout", 5, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_line_error(proc)
    assert "another guest" in line and f"{topics(vm).log} offset 0" in line, line
    assert "g1" not in acks_by_backup(kafka, vm)
