"""Takeover on the Kafka log (the core of issue 4): a backup that hears nothing from the
primary for the failover timeout fences it and continues the same log, and the whole log
(old primary's part, then the new one's) replays from icount 0 to the new primary's state."""
import json
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import REPO, kvmrr_json

pytestmark = pytest.mark.kafka
BUDGET = 8_000_000


def _spawn(*args):
    return subprocess.Popen([sys.executable, "-m", "kvmrr.cli", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _acked_icount(bootstrap, vm):
    from confluent_kafka import Consumer, TopicPartition

    from kvmrr.kafkalog import topics
    from schemas import decode_message
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                  "enable.partition.eof": True})
    c.assign([TopicPartition(topics(vm).acks, 0, 0)])
    best = 0
    try:
        while True:
            m = c.poll(0.5)
            if m is None or m.error():
                return best
            best = max(best, decode_message(m.value(), m.headers())["replayed_icount"])
    finally:
        c.close()


def test_backup_takes_over_a_killed_primary(kafka):
    vm = f"to{uuid.uuid4().hex[:8]}"
    url = f"kafka://{kafka.split(',')[0]}/{vm}"
    backup = _spawn("follow", "--log", url, "--backup-id", "b1", "--json", "--quiet",
                    "--failover-timeout", 1, "--max-instructions", BUDGET,
                    "--idle-timeout", 60)
    primary = _spawn("record", "ticks", "--log", url, "--max-instructions", BUDGET,
                     "--json", "--quiet")
    try:
        # let the primary publish part of its log (it needs ~10 s for all of it) and the
        # backup start following it
        started = time.monotonic()
        while _acked_icount(kafka, vm) == 0 or time.monotonic() - started < 3:
            assert primary.poll() is None, primary.stderr.read()
            assert time.monotonic() - started < 60, "the backup never acked"
            time.sleep(0.5)
        primary.send_signal(signal.SIGKILL)
        primary.wait(10)
        out, err = backup.communicate(timeout=180)
    finally:
        for p in (primary, backup):
            if p.poll() is None:
                p.kill()
    assert backup.returncode == 0, err[-2000:]
    took = json.loads(out.strip().splitlines()[-1])
    assert "took_over" in took, f"the backup did not take over: {out[-500:]} {err[-3000:]}"
    assert took["took_over"] and took["instructions"] == BUDGET
    assert 0 < took["takeover_icount"] < BUDGET
    assert "primary silent, taking over" in err
    # the whole log, old primary's part and the new primary's, replays exactly
    rep = kvmrr_json("replay", "--log", url, "--mode", "fast", "--start", "first")
    assert rep["verified"] and rep["outputs_verified"]
    assert rep["state_hash"] == took["state_hash"]
    assert rep["outputs_sha256"] == took["outputs_sha256"]
