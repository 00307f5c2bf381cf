"""Fault tolerance (issue 4) on the single-node Kafka: the service boundary, output commit,
takeover with exactly one winner, fencing of an old primary, and backups lost and replaced.

They run with security on (issue 14): the session's secure broker (conftest secure_kafka:
TLS, SASL/SCRAM, ACLs), every process signed in as its VM's principal and every record
MACed with the VM's key (FtCluster(secrets=...)).  One scenario also runs on the plain
broker (test_primary_killed_on_a_plain_kafka), so that the plain path stays tested.

Every scenario ends with FtCluster.finish(): the client's requests all answered once, the
store holding every acknowledged write, and every survivor's final state equal to an
offline replay of the whole log from icount 0.
"""
from __future__ import annotations

import random
import re
import signal
import socket
import time
import urllib.request

import pytest

from ftchecks import assert_secure, assert_verified
from harness.ftcluster import FtCluster, wait_for
from kvmrr_log.client_ids import declared_scope, scoped_request_id
from kvmrr_log import events
from kvmrr_log.kafka import scan_topic, topics
from kvmrr_log.requests import request_fields
from harness.logstats import released_outputs, released_seqs, void_outputs
from schemas import decode_message

pytestmark = pytest.mark.kafka
RATE = 60.0          # requests/s: well within what the emulated guest serves


@pytest.fixture
def cluster(secure_kafka, tmp_path, request):
    """make(**FtCluster options) -> an FtCluster on the secure broker; plain=True: on the
    session's plain broker."""
    made = []

    def make(plain: bool = False, **kw) -> FtCluster:
        if plain:
            ft = FtCluster(request.getfixturevalue("kafka").split(",")[0], tmp_path, **kw)
        else:
            boot, secrets = secure_kafka
            ft = FtCluster(boot, tmp_path, secrets=secrets, **kw)
        made.append(ft)
        return ft
    yield make
    for ft in made:
        ft.stop()
    for ft in made:      # every scenario here ran keyed, not just the ones that say so
        if ft.secrets:
            assert_secure(ft)


@pytest.mark.parametrize("seed", range(10))
def test_primary_killed_at_a_seeded_point(cluster, seed):
    """SIGKILL at a seeded random moment of a client load: exactly one of two backups
    takes over, the client loses nothing and sees nothing twice."""
    killed_at_a_seeded_point(cluster(), seed)


def test_primary_killed_on_a_plain_kafka(cluster):
    """The same on the plain broker (no TLS, no SASL, no MACs): `make kafka`'s default."""
    ft = cluster(plain=True)
    assert ft.secrets is None
    killed_at_a_seeded_point(ft, 0)


def killed_at_a_seeded_point(ft: FtCluster, seed: int) -> None:
    rng = random.Random(seed)
    primary = ft.start_primary()
    ft.start_backup("b1")
    ft.start_backup("b2")
    ft.start_gateway()
    ft.wait_backups_reading()
    client = ft.client(seed=seed)
    client.run(RATE, rng.uniform(0.2, 4.0))
    primary.kill()
    client.run(RATE, rng.uniform(2.0, 4.0))
    res = ft.finish(client)
    assert len(res["took_over"]) == 1, res["ends"]
    assert res["takeover_attempts"] == 1, "more than one backup started a takeover"
    assert_verified(res, survivors=2)


def test_stopped_primary_is_fenced_and_stops_itself(cluster):
    """SIGSTOP the primary until a backup has taken over; after SIGCONT its next commit is
    fenced, it stops with a clear line, and it releases nothing more."""
    ft = cluster()
    primary = ft.start_primary()
    ft.start_backup("b1")
    ft.start_gateway()
    ft.wait_backups_reading()
    client = ft.client()
    client.run(RATE, 2.0)
    primary.signal(signal.SIGSTOP)
    client.run(RATE, 1.0)
    wait_for(lambda: ft.live_backup() is not None, 60, "a backup to take over")
    client.run(RATE, 1.0)
    primary.signal(signal.SIGCONT)
    rc = primary.wait(60)
    err = "".join(primary.text)
    assert rc == 3, err[-2000:]
    assert "fenced: a newer primary of VM" in err and "releases nothing more" in err
    assert primary.last(events.FENCED), "no structured fenced event"
    client.run(RATE, 1.0)
    res = ft.finish(client)
    assert res["took_over"] == ["b1"]
    assert_verified(res, survivors=1)


def test_zombie_that_writes_after_the_takeover_is_ignored(cluster):
    """SIGSTOP the primary until a backup has taken over, then SIGCONT it while it is still
    connected: it learns of the newer epoch only seconds late (as one whose reads of the
    log's tail lag), so it keeps writing its log and releasing responses after the seal.
    Its records land in the topics and no reader uses them: the gateway passes on none of
    its releases, and the offline replay of the whole log equals the survivor."""
    ft = cluster()
    boot = ft.bootstrap
    primary = ft.start_primary(wrap=lambda cmd: ["env", "KVMRR_TEST_EPOCH_WATCH_LAG_S=4",
                                                 *cmd])
    ft.start_backup("b1")
    ft.start_gateway()
    ft.wait_backups_reading()
    client = ft.client()
    client.run(RATE, 2.0)
    primary.signal(signal.SIGSTOP)
    client.run(RATE, 1.0)
    wait_for(lambda: ft.live_backup() is not None, 60, "a backup to take over")
    client.run(RATE, 1.0)
    primary.signal(signal.SIGCONT)
    client.run(RATE, 3.0)                 # the zombie serves these too, for nothing
    rc = primary.wait(60)
    err = "".join(primary.text)
    assert rc == 3 and "fenced: a newer primary of VM" in err, err[-2000:]
    # its log records landed after the new epoch's Epoch record...
    with ft.as_replica():      # read back as the VM's replicas, whose key checks the MACs
        log = [(m.offset(), decode_message(m.value(), m.headers()))
               for m in scan_topic(boot, topics(ft.vm).log)]
        void = void_outputs(boot, ft.vm)
    sealed_at = min(o for o, r in log if r["kind"] == "Epoch" and r["epoch"] == 1)
    late = [o for o, r in log if o > sealed_at and r.get("epoch", 0) == 0]
    assert late, "the resumed primary wrote nothing after the seal"
    # ...and so did its releases, which nobody passed on: those of records after the seal,
    # and any it put on .out after the new primary's Epoch record there
    assert void and all(o["epoch"] == 0 for o in void), void
    after_seal = [o for o in void if o["log_offset"] > sealed_at]
    client.run(RATE, 1.0)
    res = ft.finish(client)
    # on .out a response carries the gateway's id for the client's (client-scoped ids);
    # what follows the id is what the client got
    with ft.as_replica():
        valid = dict(request_fields(o["data"]) for o in released_outputs(boot, ft.vm))
    scope = declared_scope(client.name)
    answers = {scoped_request_id(scope, rid.encode()): request_fields(line)[1]
               for rid, line in client.answers.items()}
    assert all(valid[key] == rest for key, rest in answers.items())
    differing = [o for o in void if request_fields(o["data"])[0] in answers
                 and request_fields(o["data"])[1] != valid.get(request_fields(o["data"])[0])]
    assert res["took_over"] == ["b1"]
    assert_verified(res, survivors=1)
    print(f"zombie: {len(late)} log records after the seal; {len(void)} void releases, "
          f"{len(after_seal)} of records after the seal, {len(differing)} different from "
          f"the valid answer; none passed on")


def test_commit_log_goes_on_when_a_backup_dies(cluster):
    """And the primary exports its output commit latency to Prometheus."""
    from harness.localkafka import free_base_port
    metrics_port = free_base_port(1)
    ft = cluster(commit="log")
    ft.start_primary(extra=("--metrics-port", str(metrics_port)))
    ft.start_backup("b1")
    b2 = ft.start_backup("b2")
    ft.start_gateway()
    ft.wait_backups_reading()
    client = ft.client()
    client.run(RATE, 1.5)
    b2.kill()
    t = time.monotonic()
    client.run(RATE, 2.0)
    first = client.first_answer_sent_after(t)
    assert first is not None and first - t < 1.5, "responses stalled without backup b2"
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                  timeout=10).read().decode()
    count = re.search(r'^kvmrr_output_commit_seconds_count\{policy="log",vm="%s"\} (\S+)$'
                      % ft.vm, text, re.M)
    assert count and float(count.group(1)) > 0, text[-1500:]
    res = ft.finish(client)
    assert res["took_over"] == []
    assert_verified(res, survivors=2)     # b1 and the primary


def test_commit_backups2_waits_for_a_replacement_backup(cluster):
    """With --commit backups:2 and one of two backups dead, responses are held until a
    replacement backup, restored from a snapshot, acks the log behind them."""
    ft = cluster(commit="backups:2", snapshot_every=300_000)
    ft.start_primary()
    ft.start_backup("b1")
    b2 = ft.start_backup("b2")
    ft.start_gateway()
    ft.wait_backups_reading()
    client = ft.client()
    client.run(RATE, 2.0)
    wait_for(lambda: client.report().answered > 0, 60,
             "a response released with both backups alive")
    b2.kill()
    t = time.monotonic()
    client.run(RATE, 2.5)
    held_from = t + 0.5          # what was in flight at the kill may still leave
    late = client.first_answer_sent_after(held_from)
    assert late is None, f"a response left {late - held_from:.2f} s after the kill"
    b3 = ft.start_backup("b3", start="latest")
    wait_for(lambda: b3.last(events.READING), 90, "the replacement backup")
    assert b3.last(events.READING)["snapshot_icount"] > 0, "b3 did not start from a snapshot"
    assert client.drain(60), "responses still held after the replacement acked"
    res = ft.finish(client)
    assert res["commit"] == "backups:2"
    assert_verified(res, survivors=3)     # primary, b1, b3


def test_gateway_answers_a_retried_request_once(cluster):
    """A client that retries a request id, on the same or a new connection, gets the one
    answer; the request reaches the guest once."""
    ft = cluster()
    ft.start_primary()
    port = ft.start_gateway()

    def ask(line: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"HELLO x\n" + line + b"\n")     # the same client each time
            buf = b""
            while buf.count(b"\n") < 2:
                chunk = s.recv(4096)
                assert chunk, "the gateway closed the connection"
                buf += chunk
            hello, answer = buf.rstrip(b"\n").split(b"\n")
            assert hello == b"HELLO OK"
            return answer
    first = ask(b"x-1 PUT k1 hello")
    assert first.startswith(b"x-1 OK t=")
    assert ask(b"x-1 PUT k1 hello") == first          # a retry: the stored answer
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"HELLO x\nx-2 PUT k1 again\nx-2 PUT k1 again\n")   # the same id twice
        time.sleep(2)
        s.settimeout(0.5)
        got = b""
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        except TimeoutError:
            pass
    assert got.count(b"x-2 OK") == 1, got
    assert ask(b"lonely").startswith(b"lonely ERR")     # an id, no command: the guest says
    assert ask(b"x-3 GET k1").endswith(b" again")
    with ft.as_replica():
        ids = [m.value().split(b" ")[0] for m in scan_topic(ft.bootstrap, topics(ft.vm).inputs,
                                                          committed=False)]
        seqs = released_seqs(ft.bootstrap, ft.vm)
    x1, x2 = (scoped_request_id(declared_scope("x"), rid) for rid in (b"x-1", b"x-2"))
    assert ids.count(x1) == 1 and ids.count(x2) == 1, ids
    assert len(seqs) == len(set(seqs))


def test_primary_cut_off_from_kafka_is_fenced_when_it_returns(cluster, tmp_path):
    """The primary loses its connectivity to Kafka (its own network namespace, whose only
    way out the test cuts): a backup takes over; when the network comes back, the old
    primary's next commit is fenced and it stops, having released nothing more."""
    import shutil

    import netcut
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1): cannot give the primary a network namespace")
    ft = cluster()
    port = int(ft.bootstrap.rsplit(":", 1)[1])
    bridge = netcut.Bridge(tmp_path / "kafka.sock", port).start()
    try:
        primary = ft.start_primary(wrap=lambda cmd: netcut.wrap(cmd, port, bridge.path))
        ft.start_backup("b1")
        ft.start_gateway()
        ft.wait_backups_reading()
        client = ft.client()
        client.run(RATE, 2.0)
        assert client.report().answered > 0, "the namespaced primary answered nothing"
        bridge.cut()
        client.run(RATE, 1.0)
        wait_for(lambda: ft.live_backup() is not None, 60, "a backup to take over")
        client.run(RATE, 1.0)
        assert primary.proc.poll() is None, "the primary stopped before the network returned"
        bridge.restore()
        rc = primary.wait(90)
        err = "".join(primary.text)
        assert rc == 3, err[-2000:]
        assert "fenced: a newer primary of VM" in err
        client.run(RATE, 1.0)
        res = ft.finish(client)
    finally:
        bridge.close()
    assert res["took_over"] == ["b1"]
    assert_verified(res, survivors=1)
