"""The FT harness reads what a node did from its structured log events (JSON lines on
stderr, matched by their `event` field: kvmrr_log/events.py) and its --json summary on
stdout, never from message text.  Here with a fake process, no Kafka."""
import io
import json

import structlog

from harness.ftcluster import BACKUP_EVENTS, Node
from kvmrr_log import events


class FakeProc:
    """Popen-like: fixed stdout and stderr, already exited."""

    def __init__(self, stderr: list[str], stdout: list[str] = ()):
        self.stderr = io.StringIO("".join(line + "\n" for line in stderr))
        self.stdout = io.StringIO("".join(line + "\n" for line in stdout))
        self.pid, self.returncode = 4242, 0

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        return self.returncode


def _ev(name: str, **fields) -> str:
    return json.dumps({"event": name, "level": "info",
                       "timestamp": "2026-01-01T00:00:00Z", **fields})


def test_events_are_read_by_name_and_text_is_kept_apart(tmp_path):
    proc = FakeProc([
        _ev(events.READING, snapshot_icount=0, offset=3),
        "%3|1700000000.000|FAIL|rdkafka#producer-1| a librdkafka line",
        _ev(events.FOLLOWING, icount=10, lag_instructions=5, lag_ms=1.0),
        '{"not": "an event"}',
        _ev(events.TAKEOVER, silent_s=1.0, icount=99),
        _ev(events.LIVE, icount=100, next_seq=7, released_seq=5),
        "kvmrr: error: something a human reads",
    ], stdout=["guest console", json.dumps({"took_over": True, "state_hash": "ab"})])
    node = Node("b1", proc, tmp_path)
    node.wait(10)
    assert [ln["event"] for ln in node.lines] == [events.READING, events.FOLLOWING,
                                                   events.TAKEOVER, events.LIVE]
    assert node.last(events.LIVE)["released_seq"] == 5
    assert len(node.all(events.TAKEOVER)) == 1 and node.last(events.DONE) is None
    assert len(node.text) == 3 and node.text[-1].startswith("kvmrr: error:")
    assert node.result() == {"took_over": True, "state_hash": "ab"}
    assert (tmp_path / "b1.stderr").read_text().count("\n") == 7


def test_watched_events_are_narrated_with_the_node_name(tmp_path):
    proc = FakeProc([_ev(events.READING, snapshot_icount=0, offset=3, vm_id="v"),
                     _ev(events.FOLLOWING, icount=10),
                     _ev(events.LIVE, icount=100, released_seq=5)])
    with structlog.testing.capture_logs() as told:
        Node("b2", proc, tmp_path, log=structlog.get_logger(), watch=BACKUP_EVENTS).wait(10)
    assert [(t["event"], t["node"]) for t in told] == [(events.READING, "b2"),
                                                        (events.LIVE, "b2")]
    assert told[1]["released_seq"] == 5 and "vm_id" not in told[0]


def test_the_gateway_port_comes_from_its_listening_event(tmp_path, monkeypatch):
    from harness import ftcluster
    monkeypatch.setattr(ftcluster, "ensure_topics", lambda *a: None)
    monkeypatch.setattr(ftcluster, "start_process", lambda args, wrap=None, env=None: FakeProc(
        [_ev("state", sent=0, answered=0), _ev(events.LISTENING, host="127.0.0.1",
                                                port=40123)],
        ["kvmrr gateway: some human text that may change"]))
    ft = ftcluster.FtCluster("127.0.0.1:9", tmp_path, vm="vmx")
    assert ft.start_gateway() == 40123


def test_backup_events_name_what_the_replayer_logs():
    """Every event name the harness watches is one replayer/follow.py emits."""
    from kvmrr_log.paths import REPO
    src = (REPO / "replayer" / "follow.py").read_text()
    consts = {v: k for k, v in vars(events).items() if isinstance(v, str) and k.isupper()}
    for name in BACKUP_EVENTS:
        assert f"events.{consts[name]}" in src, name
