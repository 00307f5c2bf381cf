"""What grows with a run is bounded (issue 14, item 4): the latency samples, the heartbeats
a replay keeps, the backups an AckWatch tracks, the pacer's trail; and the topics' retention
and batch limits are what docs/limits.md says."""
from __future__ import annotations

from collections import deque

import pytest

from kvmrr_log.percentiles import percentile
from kvmrr_log.reservoir import Reservoir


def test_reservoir_is_bounded_and_estimates_percentiles():
    r = Reservoir(1000, seed=1)
    r.extend(i / 100_000 for i in range(100_000))
    assert len(r) == 100_000 and len(list(r)) == 1000
    assert abs(percentile(r, 0.5) - 0.5) < 0.05
    assert abs(percentile(r, 0.99) - 0.99) < 0.02
    small = Reservoir(1000)
    small.extend([3.0, 1.0, 2.0])
    assert sorted(small) == [1.0, 2.0, 3.0] and len(small) == 3


def test_ackwatch_tracks_a_bounded_number_of_backups(monkeypatch):
    from recorder import service

    class Msg:
        def __init__(self, value):
            self._v = value

        def error(self):
            return None

        def value(self):
            return self._v

        def headers(self):
            return []

    acks = service.AckWatch.__new__(service.AckWatch)
    acks.received, acks.replayed = {}, {}
    batch = [Msg(i) for i in range(1, 1001)]
    acks.consumer = type("C", (), {"consume": lambda self, n, t: batch})()
    monkeypatch.setattr(service, "decode_message", lambda v, h: {
        "kind": "Ack", "backup_id": f"forged{v}", "received_icount": v,
        "replayed_icount": v, "wall_ns": v})
    acks.poll()
    assert len(acks.received) == service.MAX_BACKUPS == len(acks.replayed)
    assert "forged1000" in acks.received and "forged1" not in acks.received


def test_replay_keeps_only_heartbeats_ahead_of_it():
    from replayer.session import ReplaySession
    s = ReplaySession.__new__(ReplaySession)
    s.heartbeats = deque((i * 10, i) for i in range(1000))
    s.machine = type("M", (), {"icount": 5000})()
    s._forget_heartbeats()
    assert s.heartbeats[0] == (5000, 500) and len(s.heartbeats) == 500


def test_pacer_trail_is_bounded():
    from recorder import pacing
    p = pacing.BackupPacer.__new__(pacing.BackupPacer)
    p._trail = deque(maxlen=pacing.TRAIL_SLICES)
    p.acks = type("A", (), {"poll": lambda self: None,
                            "best_replayed": lambda self, live, exclude=None: -1})()
    p.me = None
    for i in range(pacing.TRAIL_SLICES * 2):
        p.lag(i * 1e-4, i)
    assert len(p._trail) == pacing.TRAIL_SLICES



@pytest.mark.kafka
def test_topics_get_their_retention_and_batch_limits(kafka):
    """ensure_topics sets what TOPIC_SETTINGS says, on a real broker."""
    import os

    from confluent_kafka.admin import ConfigResource

    from kvmrr_log.kafka import TOPIC_SETTINGS, admin_client, ensure_topics
    boot = kafka.split(",")[0]
    t = ensure_topics(boot, f"bounded{os.getpid()}")
    admin = admin_client(boot)
    for kind, settings in TOPIC_SETTINGS.items():
        res = ConfigResource(ConfigResource.Type.TOPIC, getattr(t, kind))
        got = admin.describe_configs([res])[res].result(20)
        for key, value in settings.items():
            assert got[key].value == value, (kind, key)



def test_inputs_wait_while_too_many_responses_are_held():
    """KafkaInputs feeds no request into the NIC while the sink holds MAX_HELD responses."""
    import threading
    import time

    from recorder import kafka_sink, service

    class Msg:
        def error(self):
            return None

        def value(self):
            return b"r1 GET k"

        def offset(self):
            return 0

        def headers(self):      # no record MAC, as on a plain broker with no key
            return []

    class Consumer:
        def __init__(self):
            self.given = False

        def poll(self, timeout):
            if self.given:
                time.sleep(timeout)
                return None
            self.given = True
            return Msg()

    pushed = []
    machine = type("M", (), {"nic_push": lambda self, p: pushed.append(p) or True})()
    sink = kafka_sink.KafkaSink.__new__(kafka_sink.KafkaSink)
    sink._held = [None] * kafka_sink.MAX_HELD
    inputs = service.KafkaInputs.__new__(service.KafkaInputs)
    inputs.consumer, inputs.held_back = Consumer(), sink.held_back
    inputs._pushed, inputs._lock, inputs._stop = deque(), threading.Lock(), threading.Event()
    inputs.consumed = inputs.forged = 0
    t = threading.Thread(target=inputs._feed, args=(machine,), daemon=True)
    t.start()
    time.sleep(0.3)
    assert pushed == []
    sink._held.pop()
    deadline = time.monotonic() + 5
    while not pushed and time.monotonic() < deadline:
        time.sleep(0.01)
    inputs._stop.set()
    t.join(5)
    assert pushed == [b"r1 GET k"]
