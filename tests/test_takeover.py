"""Takeover on the Kafka log (the core of issue 4): a backup that hears nothing from the
primary for the failover timeout seals the log with the next epoch and continues it, and the whole log
(old primary's part, then the new one's) replays from icount 0 to the new primary's state.

On the session's secure broker (conftest secure_kafka; issue 14): every process here signs
in as the VM's replicas (KVMRR_KAFKA_CONFIG) and its records carry the VM's MAC."""
import json
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import REPO, kvmrr_json
from harness.linux_takeover import event_names
from kvmrr_log import events

pytestmark = pytest.mark.kafka
BUDGET = 8_000_000


def _spawn(*args):
    return subprocess.Popen([sys.executable, "-m", "kvmrr.cli", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def secure_vm(secure_kafka, monkeypatch):
    """(bootstrap, vm): a VM provisioned on the secure broker, this test and its child
    processes signed in as its replicas."""
    from harness.localkafka import provision_vm
    from kvmrr_log import kafka_config
    boot, secrets = secure_kafka
    vm = f"to{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(kafka_config.ENV, str(provision_vm(boot, secrets, vm)))
    return boot, vm


def _log_messages(bootstrap, vm):
    """How many offsets the VM's log topic holds so far (0 before it exists)."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    from kvmrr_log.kafka import client_conf, topics
    c = Consumer(dict(client_conf(bootstrap), **{"group.id": f"kvmrr-{uuid.uuid4().hex}"}))
    try:
        return c.get_watermark_offsets(TopicPartition(topics(vm).log, 0), timeout=5)[1]
    except KafkaException:
        return 0
    finally:
        c.close()


def _record_then_kill(kafka, vm, url):
    """Record `ticks` into the VM's log for a while, then SIGKILL the recorder."""
    primary = _spawn("record", "ticks", "--log", url, "--max-instructions", BUDGET,
                     "--json", "--quiet")
    try:
        # let the primary publish part of its log: at most ~2.5 M instructions/s here
        # (ticks, 2026-12-02), so 2 s after its first events it is short of its budget
        started = time.monotonic()
        while _log_messages(kafka, vm) < 5:
            assert primary.poll() is None, primary.stderr.read()
            assert time.monotonic() - started < 60, "the primary never published"
            time.sleep(0.2)
        time.sleep(2)
    finally:
        primary.send_signal(signal.SIGKILL)
        primary.wait(10)


def _follow_args(url):
    return ["follow", "--log", url, "--backup-id", "b1", "--json", "--quiet",
            "--failover-timeout", "1", "--max-instructions", str(BUDGET), "--idle-timeout", "60"]


def test_backup_takes_over_a_killed_primary(secure_vm):
    kafka, vm = secure_vm
    url = f"kafka://{kafka.split(',')[0]}/{vm}"
    backup = _spawn(*_follow_args(url))
    try:
        _record_then_kill(kafka, vm, url)
        out, err = backup.communicate(timeout=180)
    finally:
        if backup.poll() is None:
            backup.kill()
    assert backup.returncode == 0, err[-2000:]
    took = json.loads(out.strip().splitlines()[-1])
    assert "took_over" in took, f"the backup did not take over: {out[-500:]} {err[-3000:]}"
    assert took["took_over"] and took["instructions"] == BUDGET
    assert 0 < took["takeover_icount"] < BUDGET
    assert event_names(err).count(events.TAKEOVER) == 1, err[-3000:]
    # the whole log, old primary's part and the new primary's, replays exactly
    rep = kvmrr_json("replay", "--log", url, "--mode", "fast", "--start", "first")
    assert rep["verified"] and rep["outputs_verified"]
    assert rep["state_hash"] == took["state_hash"]
    assert rep["outputs_sha256"] == took["outputs_sha256"]


def test_takeover_that_kafka_cannot_seal_is_retried(secure_vm, monkeypatch, capsys):
    """The seal fails (as while a dead broker's partitions move): the backup does not die;
    it follows again and takes over at the next silent timeout.  In-process, with the
    first Epoch record made to fail; everything else is the real CLI on the real broker."""
    from kvmrr import cli
    from kvmrr_log.kafka import KafkaLogError
    from recorder import kafka_sink

    real, seals = kafka_sink.KafkaSink.seal, []

    def seal_fails_once(self, epoch, sealer):
        seals.append(time.monotonic())
        if len(seals) == 1:
            raise KafkaLogError("cannot write the Epoch record: injected, the partition's "
                                "leader is moving")
        return real(self, epoch, sealer)
    monkeypatch.setattr(kafka_sink.KafkaSink, "seal", seal_fails_once)
    kafka, vm = secure_vm
    url = f"kafka://{kafka}/{vm}"
    _record_then_kill(kafka, vm, url)
    assert cli.main(_follow_args(url)) == 0
    out, err = capsys.readouterr()
    took = json.loads(out.strip().splitlines()[-1])
    assert len(seals) == 2 and seals[1] - seals[0] >= 1.0, seals
    assert event_names(err).count(events.TAKEOVER_ABORTED) == 1, err[-3000:]
    assert event_names(err).count(events.TAKEOVER) == 2, err[-3000:]
    assert took["took_over"] and took["instructions"] == BUDGET
    rep = kvmrr_json("replay", "--log", url, "--mode", "fast", "--start", "first")
    assert rep["verified"] and rep["state_hash"] == took["state_hash"]


def test_a_step_log_refuses_a_fast_backup_that_may_take_over(secure_vm):
    """A `step` record may hold RDTSC, which a `fast` new primary would run unlogged: the
    backup says so at its start (exit 2, one line) rather than diverging after a takeover.
    The same log followed with --mode step, or replayed with fast, is fine."""
    kafka, vm = secure_vm
    url = f"kafka://{kafka}/{vm}"
    rec = kvmrr_json("record", "ticks", "--log", url, "--mode", "step",
                     "--max-instructions", 200_000)
    fast = subprocess.run([sys.executable, "-m", "kvmrr.cli", *_follow_args(url)[:-2],
                           "--idle-timeout", "5", "--mode", "fast"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert fast.returncode == 2, fast.stderr[-2000:]
    lines = [ln for ln in fast.stderr.splitlines() if "--mode step" in ln]
    assert len(lines) == 1 and "Traceback" not in fast.stderr, fast.stderr[-2000:]
    rep = kvmrr_json("replay", "--log", url, "--mode", "fast")
    assert rep["verified"] and rep["state_hash"] == rec["state_hash"]
