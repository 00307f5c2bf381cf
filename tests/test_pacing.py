"""The primary slows down while its backups fall too far behind (recorder/pacing.py), and
runs free when no backup acks.  The record runs through the real CLI on the session's
broker; a stuck backup is played by acks written to kvmrr.<vm>.acks as a backup writes
them, all saying it has replayed nothing."""
import json
import subprocess
import sys
import threading
import time
import uuid

import pytest

from conftest import REPO

pytestmark = pytest.mark.kafka
SECONDS = 6


def _record(url: str, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kvmrr.cli", "record", "ticks", "--log", url,
                             "--seconds", str(SECONDS), "--json", "--quiet", *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _stuck_backup(bootstrap: str, vm: str, stop: threading.Event) -> None:
    """Ack every 50 ms, as backup 'stuck', having received and replayed nothing."""
    from confluent_kafka import Producer

    from kvmrr_log.kafka import client_conf, topics
    from schemas import encode_message
    p = Producer(client_conf(bootstrap))
    while not stop.is_set():
        value, headers = encode_message({
            "kind": "Ack", "backup_id": "stuck", "received_icount": 0, "received_seq": 0,
            "replayed_icount": 0, "wall_ns": time.time_ns()})
        try:
            p.produce(topics(vm).acks, value, b"stuck", headers=headers)
        except Exception:     # the recorder has not created the topic yet
            pass
        p.poll(0.05)
    p.flush(5)


def _run(kafka: str, with_stuck_backup: bool) -> dict:
    vm = f"pace{uuid.uuid4().hex[:8]}"
    bootstrap = kafka.split(",")[0]
    stop = threading.Event()
    acker = threading.Thread(target=_stuck_backup, args=(bootstrap, vm, stop), daemon=True)
    rec = _record(f"kafka://{bootstrap}/{vm}", "--max-backup-lag-ms", "300")
    if with_stuck_backup:
        acker.start()
    try:
        out, err = rec.communicate(timeout=180)
    finally:
        stop.set()
        if rec.poll() is None:
            rec.kill()
    assert rec.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def test_primary_slows_down_for_a_lagging_backup_only(kafka):
    free = _run(kafka, with_stuck_backup=False)
    held = _run(kafka, with_stuck_backup=True)
    print(f"\npacing: free {free['instructions']} instructions, with a stuck backup "
          f"{held['instructions']} ({held['paced_seconds']} s paused)")
    assert free["paced_seconds"] == 0, free
    # past the 300 ms bound each 10 ms slice is followed by a 20 ms pause: about two
    # thirds of the rest of the run
    assert held["paced_seconds"] > SECONDS / 3, held
    assert held["instructions"] < 0.75 * free["instructions"], (held, free)
