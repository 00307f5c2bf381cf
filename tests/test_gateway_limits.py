"""The gateway's limits (issue 14, item 3): one test for each.

Most run the gateway's real code in this process with a stub Kafka producer (the requests it
would put on .in are recorded; answers are handed to Gateway.answer as if released on .out):
a stub shows what a real broker cannot, such as a producer that never returns.  One test
runs the gateway against the real broker of the `kafka` fixture.
"""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from kvmrr.gateway import Gateway, Limits, TokenFile
from kvmrr_log.client_ids import declared_scope, scoped_request_id


class StubProducer:
    """Records what would go to .in; `block` makes produce() hang, as a client library
    stuck on an unreachable broker would."""

    def __init__(self):
        self.produced: list[tuple[bytes, bytes, list]] = []
        self.block = threading.Event()
        self.release = threading.Event()
        self.stuck = threading.Event()

    def produce(self, topic, value, key, headers=None, on_delivery=None):
        if self.block.is_set():
            self.stuck.set()
            self.release.wait()
        self.produced.append((key, value, headers))

    def poll(self, timeout=0):
        return 0

    def flush(self, timeout=0):
        return 0


class Running:
    """A gateway serving on loopback from a thread of its own."""

    def __init__(self, limits=Limits(), identity=None, tls=None):
        self.stub = StubProducer()
        self.gw = Gateway("stub:0", "gwtest", limits=limits, identity=identity,
                          producer=self.stub)
        ready = threading.Event()
        self.loop = asyncio.new_event_loop()

        def run():
            asyncio.set_event_loop(self.loop)
            self.task = self.loop.create_task(
                self.gw.serve("127.0.0.1", 0, lambda port: ready.set(), tls))
            try:
                self.loop.run_until_complete(self.task)
            except asyncio.CancelledError:
                pass
            rest = asyncio.all_tasks(self.loop)     # the connections' handlers
            for t in rest:
                t.cancel()
            self.loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            self.loop.close()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10)
        self.port = self.gw.port

    def call(self, fn, *args):
        """fn(*args) on the gateway's loop; its result."""
        done = threading.Event()
        box = []

        def go():
            box.append(fn(*args))
            done.set()
        self.loop.call_soon_threadsafe(go)
        assert done.wait(10)
        return box[0]

    def answer(self, key: bytes, rest: bytes) -> None:
        self.call(self.gw.answer, key, rest)

    def connect(self, hello: bytes | None = None, timeout: float = 5) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        if hello is not None:
            s.sendall(b"HELLO " + hello + b"\n")
            assert read_line(s) == b"HELLO OK"
        return s

    def produced_keys(self, n: int, timeout: float = 5) -> list[bytes]:
        wait(lambda: len(self.stub.produced) >= n, timeout, f"{n} requests produced")
        return [k for k, _, _ in self.stub.produced]

    def stop(self):
        self.stub.release.set()
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(10)


@pytest.fixture
def gateway():
    made = []

    def make(**kw) -> Running:
        r = Running(**kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.stop()


def wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def read_line(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            return buf
        buf += chunk
    return buf.rstrip(b"\n")


def closed(s: socket.socket, timeout: float) -> bytes:
    """Everything until the gateway closes the connection (fails if it does not)."""
    s.settimeout(timeout)
    got = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk


def nothing_within(s: socket.socket, seconds: float) -> bool:
    s.settimeout(seconds)
    try:
        return s.recv(1) == b"x"    # never: recv returns data or times out
    except TimeoutError:
        return True


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# -- request ids scoped to the client --------------------------------------------------------
def test_ids_of_two_clients_never_collide(gateway):
    """The attack of issue 14: the other client sends `c1-5 DEL k` first; the victim's
    `c1-5 PUT k secret` is still forwarded, and each gets its own answer only."""
    g = gateway()
    attacker, victim = g.connect(b"mallory"), g.connect(b"alice")
    attacker.sendall(b"c1-5 DEL k\n")
    g.produced_keys(1)
    victim.sendall(b"c1-5 PUT k secret\n")
    k_att, k_vic = g.produced_keys(2)
    assert k_att != k_vic
    assert k_att == scoped_request_id(declared_scope("mallory"), b"c1-5")
    assert g.stub.produced[1][1] == k_vic + b" PUT k secret"
    assert ("kvmrr-client", b"name:alice") in g.stub.produced[1][2]
    g.answer(k_att, b" NOTFOUND")
    assert read_line(attacker) == b"c1-5 NOTFOUND"
    assert nothing_within(victim, 0.3), "the victim got the other client's answer"
    g.answer(k_vic, b" OK t=1 v=00000001")
    assert read_line(victim) == b"c1-5 OK t=1 v=00000001"
    # the victim's retry on a new connection gets its own stored answer
    again = g.connect(b"alice")
    again.sendall(b"c1-5 PUT k secret\n")
    assert read_line(again) == b"c1-5 OK t=1 v=00000001"
    # connections without HELLO are clients of their own
    a, b = g.connect(), g.connect()
    a.sendall(b"c1-5 GET k\n")
    b.sendall(b"c1-5 GET k\n")
    keys = g.produced_keys(4)
    assert len(set(keys)) == 4


def test_tokens_name_the_client(gateway, tmp_path):
    """With a tokens file a client is who its token says: an unknown token is refused, and
    HELLO is required."""
    path = tmp_path / "tokens"
    path.write_text("# name token\nalice tok-alice-0123456789\nbob tok-bob-0123456789abc\n")
    path.chmod(0o600)
    g = gateway(identity=TokenFile(path))
    s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
    s.sendall(b"HELLO not-a-token-of-anyone\n")
    assert closed(s, 5) == b"HELLO ERR unknown client\n"
    s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
    s.sendall(b"x-1 GET k\n")
    assert closed(s, 5).startswith(b"- ERR say HELLO")
    alice = g.connect(b"tok-alice-0123456789")
    alice.sendall(b"x-1 GET k\n")
    assert g.produced_keys(1) == [scoped_request_id("token:alice", b"x-1")]
    path.chmod(0o644)
    with pytest.raises(ValueError, match="group or others"):
        TokenFile(path)


def test_undecodable_ids_stay_distinct(gateway):
    """Ids of bytes that are not ASCII nor UTF-8 are kept apart and echoed as they came."""
    g = gateway()
    s = g.connect(b"c")
    ids = [b"\xff\xfe-1", b"\xfe\xff-1", b"\x80-1", b"\xc3\x28-1"]
    for rid in ids:
        s.sendall(rid + b" GET k\n")
    keys = g.produced_keys(len(ids))
    assert len(set(keys)) == len(ids)
    for rid, key in zip(ids, keys):
        assert key == scoped_request_id(declared_scope("c"), rid)
        assert len(key) <= 32 and all(0x21 <= b <= 0x7e for b in key)   # the guest's ids
    for key in reversed(keys):
        g.answer(key, b" NOTFOUND")
    got = {read_line(s) for _ in ids}
    assert got == {rid + b" NOTFOUND" for rid in ids}


# -- connections -------------------------------------------------------------------------
def test_connection_cap(gateway):
    g = gateway(limits=Limits(max_clients=5))
    held = [g.connect(b"c%d" % i) for i in range(5)]
    extra = socket.create_connection(("127.0.0.1", g.port), timeout=5)
    assert closed(extra, 5) == b"- ERR too many connections: try later\n"
    assert g.gw.stats["refused_clients"] == 1
    held.pop().close()
    wait(lambda: g.gw.clients == 4, 5, "the closed connection to be counted out")
    g.connect(b"again")          # room again


def test_idle_connections_are_closed(gateway):
    """Silent connections go after the idle timeout; one still waiting for an answer stays."""
    g = gateway(limits=Limits(idle_timeout_s=0.5))
    idle = g.connect(b"idle")
    waiting = g.connect(b"waiting")
    waiting.sendall(b"w-1 GET k\n")
    t0 = time.monotonic()
    assert closed(idle, 5).startswith(b"- ERR idle")
    assert time.monotonic() - t0 < 3
    time.sleep(0.7)
    key = g.produced_keys(1)[0]
    g.answer(key, b" NOTFOUND")
    assert read_line(waiting) == b"w-1 NOTFOUND"
    assert closed(waiting, 5).startswith(b"- ERR idle")
    assert g.gw.stats["idle_closed"] == 2


def test_many_idle_connections_are_bounded(gateway):
    """Hundreds of idle connections: beyond the cap refused, the rest closed when idle."""
    g = gateway(limits=Limits(max_clients=200, idle_timeout_s=1.0))
    socks = []
    for _ in range(300):
        socks.append(socket.create_connection(("127.0.0.1", g.port), timeout=5))
    wait(lambda: g.gw.stats["refused_clients"] + g.gw.stats["clients"] >= 300, 10,
         "all accepted")
    assert g.gw.stats["peak_connections"] <= 200
    assert g.gw.stats["refused_clients"] >= 1
    wait(lambda: g.gw.clients == 0, 10, "the idle connections to be closed")
    for s in socks:
        s.close()


def test_a_client_that_does_not_read_is_dropped(gateway):
    """Retries of an id with a 2 KB answer, never read: the gateway stops reading from the
    client, then drops it, and its memory does not grow with what the client sent."""
    g = gateway(limits=Limits(write_timeout_s=1.0))
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", g.port))
    s.sendall(b"HELLO slow\nbig-1 GET k\n")
    key = g.produced_keys(1)[0]
    g.answer(key, b" OK v=00000001 " + b"x" * 2000)
    before = rss_mb()
    s.settimeout(10)
    sent = 0
    try:
        while sent < 3_000_000:        # 3 MB of retries: 600 MB of answers if buffered
            sent += s.send(b"big-1 GET k\n" * 1000)
    except OSError:
        pass                       # dropped (or the send blocked: back-pressure)
    wait(lambda: g.gw.stats["slow_dropped"] >= 1, 15, "the slow client to be dropped")
    assert rss_mb() - before < 50, f"memory grew {rss_mb() - before:.0f} MB"
    assert g.gw.clients == 0
    other = g.connect(b"other")    # the gateway is fine
    other.sendall(b"big-1 GET k\n")
    g.produced_keys(2)


def test_stored_answers_are_pruned_by_count_and_age(gateway):
    g = gateway(limits=Limits(max_answers=100, retry_window_s=60))
    s = g.connect(b"many")
    n = 1000
    s.sendall(b"".join(b"m-%d GET k\n" % i for i in range(n)))
    keys = g.produced_keys(n, timeout=20)
    for key in keys:
        g.answer(key, b" NOTFOUND")
    for _ in range(n):
        read_line(s)
    assert len(g.gw.answers) == 100 and len(g.gw.sent) <= 100
    # within the window and the count: a retry gets the stored answer, nothing is sent
    s.sendall(b"m-%d GET k\n" % (n - 1))
    assert read_line(s) == b"m-%d NOTFOUND" % (n - 1)
    assert len(g.stub.produced) == n
    # past the retry window everything is forgotten
    g.call(g.gw.prune, time.time() + 61)
    assert not g.gw.answers and not g.gw.sent
    assert not g.gw.waiting


def test_kafka_down_does_not_stall_other_clients(gateway):
    """A producer that never returns (Kafka unreachable): requests beyond the bounded queue
    get ERR busy at once, and other clients are served meanwhile."""
    g = gateway(limits=Limits(produce_queue=10))
    done = g.connect(b"early")
    done.sendall(b"e-1 GET k\n")
    key = g.produced_keys(1)[0]
    g.answer(key, b" NOTFOUND")
    assert read_line(done) == b"e-1 NOTFOUND"
    g.stub.block.set()
    flood = g.connect(b"flood")
    flood.sendall(b"f-0 GET k\n")
    wait(g.stub.stuck.is_set, 5, "the producer to hang")
    flood.sendall(b"".join(b"f-%d GET k\n" % i for i in range(1, 50)))
    busy = 0
    t0 = time.monotonic()
    while busy < 39:                  # 1 stuck in produce() + 10 queued; the rest busy
        line = read_line(flood)
        assert b" ERR busy" in line, line
        busy += 1
    assert time.monotonic() - t0 < 2
    t0 = time.monotonic()
    other = g.connect(b"early")       # a new client is accepted and answered
    other.sendall(b"e-1 GET k\n")
    assert read_line(other) == b"e-1 NOTFOUND"
    assert time.monotonic() - t0 < 1
    g.stub.release.set()               # Kafka back: what was queued goes out
    g.stub.block.clear()
    assert len(g.produced_keys(12)) == 12


def test_a_request_kafka_refuses_is_answered_and_may_be_retried(gateway):
    """A request Kafka refuses for good (not a timeout: there is none) was not sent: its
    client is told, and a retry is sent again."""
    g = gateway()

    class Err:
        def str(self):
            return "Broker: Message size too large"

    class Msg:
        def __init__(self, key):
            self._key = key

        def key(self):
            return self._key
    fail = threading.Event()
    fail.set()
    real = g.stub.produce

    def produce(topic, value, key, headers=None, on_delivery=None):
        real(topic, value, key, headers, on_delivery)
        if fail.is_set():
            on_delivery(Err(), Msg(key))
    g.stub.produce = produce
    s = g.connect(b"c")
    s.sendall(b"r-1 PUT k v\n")
    assert read_line(s) == b"r-1 ERR not sent to the log: retry"
    fail.clear()
    s.sendall(b"r-1 PUT k v\n")
    keys = g.produced_keys(2)
    assert keys[0] == keys[1]
    assert g.gw.stats["not_delivered"] == 1


# -- against a real broker -----------------------------------------------------------------
@pytest.mark.kafka
def test_scoped_ids_on_a_real_broker(kafka):
    """The real gateway process: two clients' `c1-5` reach .in as two requests, each under
    its client's scoped id and marked with its client; after a restart a retry is not sent
    again."""
    from kvmrr_log.kafka import scan_topic, topics
    boot = kafka.split(",")[0]
    vm = f"gwlim{os.getpid()}"

    def start():
        proc = subprocess.Popen([sys.executable, "-m", "kvmrr.cli", "gateway", "--log",
                                 f"kafka://{boot}/{vm}", "--listen", "127.0.0.1:0"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = proc.stdout.readline()
        return proc, int(line.split(" on ")[1].split()[0].rsplit(":", 1)[1])

    def send(port, name, line):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"HELLO " + name + b"\n")
        assert read_line(s) == b"HELLO OK"
        s.sendall(line + b"\n")
        time.sleep(0.5)
        s.close()

    def requests(n):
        deadline = time.monotonic() + 20
        while True:
            got = [(m.key(), m.value(), dict(m.headers() or []))
                   for m in scan_topic(boot, topics(vm).inputs, committed=False)]
            if len(got) >= n or time.monotonic() > deadline:
                return got
            time.sleep(0.2)
    proc, port = start()
    try:
        for name in (b"mallory", b"alice"):
            send(port, name, b"c1-5 PUT k " + name)
        got = requests(2)
        assert [k for k, _, _ in got] == [scoped_request_id(declared_scope("mallory"), b"c1-5"),
                                         scoped_request_id(declared_scope("alice"), b"c1-5")]
        assert got[1][1].endswith(b" PUT k alice")
        assert got[1][2]["kvmrr-client"] == b"name:alice"
    finally:
        proc.terminate()
        proc.wait(10)
    proc, port = start()       # a restarted gateway knows what was sent in the window
    try:
        send(port, b"alice", b"c1-5 PUT k alice")
        send(port, b"alice", b"c1-6 GET k")
        got = requests(3)
        assert len(got) == 3 and got[2][0] == scoped_request_id(declared_scope("alice"),
                                                                 b"c1-6")
    finally:
        proc.terminate()
        proc.wait(10)

