"""`kvmrr gateway`: ordinary TCP clients in front of the replicated service
(docs/ARCHITECTURE.md §5.2).

One request per line, `<id> <command...>`, and one response line per request, `<id> ...`,
as the kvstore guest speaks.  Ids are scoped to the client
(HELLO).  The gateway puts each new request on kvmrr.<vm>.in and answers from the
responses released to kvmrr.<vm>.out (only what a primary's commit policy let out).  A
release counts only under the epoch rule (kvmrr_log.epochs.ReleaseFilter): its log record
must precede the next epoch's Epoch record, which the gateway reads from the log itself, so
an old primary that keeps writing after a takeover gets nothing to a client.  It holds no
state that matters to the service, so it does not care which primary is live.

Who the client is (kvmrr_log/client_ids.py).  A connection may start with `HELLO <arg>`;
the gateway answers `HELLO OK` or `HELLO ERR <reason>` (and closes).  With `--tokens FILE`
the argument is a token, which names the client (see TokenFile), and HELLO is required.
Without it the argument is a name the client declares: unauthenticated, it keeps honest
clients apart and lets one client retry on a new connection.  A connection without HELLO
is a client of its own.  Request ids are the client's own: the gateway scopes them to the
client, so one client's `c1-5` is never another's.  `HELLO` is therefore no request id.

Exactly once, seen from a client: a request id is put on .in once, however often the
client sends it (a retry after a reconnect waits for the same answer), and a response is
sent once per id and connection; an id already answered gets the stored answer again
(that is the retry's answer, not a second execution).  This holds within the retry window:
the ids sent and answered are kept for `retry_window_s` (and at most `max_answers` of
each); a retry after that is a new request.  At start the gateway reads .in and .out and
keeps what is inside the window, so a restarted gateway knows those ids too.

Limits (docs/limits.md): at most `max_clients` connections; a connection silent for
`idle_timeout_s` with nothing pending is closed; at most `max_pending` unanswered requests
per connection; a client that does not read its answers is dropped once
`write_buffer_bytes` are waiting for it, or when its buffer does not drain within
`write_timeout_s`.  Requests go to Kafka from a thread through a queue of
`produce_queue` entries: when Kafka is unreachable the queue fills and a new request is
answered `<id> ERR busy ...` (it was not sent: retry later) while every other client is
served as before.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import os
import queue
import secrets
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import structlog
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from kvmrr_log import events, record_mac
from kvmrr_log.client_ids import (ID_MAX, declared_scope, scoped_request_id, token_scope,
                                  valid_name)
from kvmrr_log.epochs import ReleaseFilter
from kvmrr_log.kafka import (TAIL_FETCH_WAIT_MS, WRITER_HEADER, client_conf, client_id,
                             ensure_topics, scan_topic, topics, watermarks, writer_id)
from kvmrr_log.requests import request_fields
from schemas import LogFormatError, decode_message

MAX_LINE = 2048            # the guest NIC's MTU
STATS_EVERY_S = 5.0
PRUNE_EVERY_S = 1.0
DRAIN_ABOVE = 64 * 1024    # a client's unread answers: past this, wait for it to read
CLIENT_HEADER = "kvmrr-client"   # on each request on .in: the scope it came from


@dataclass(frozen=True)
class Limits:
    max_clients: int = 1000           # open connections; more are refused
    idle_timeout_s: float = 300.0     # a silent connection with nothing pending is closed
    max_pending: int = 1000           # unanswered requests per connection
    retry_window_s: float = 600.0     # sent and answered ids are remembered this long ...
    max_answers: int = 100_000        # ... and at most this many of each
    write_buffer_bytes: int = 256 * 1024   # answers waiting for a client that does not read
    write_timeout_s: float = 10.0     # a client's buffer must drain within this
    produce_queue: int = 1000         # requests waiting for the Kafka producer


class DeclaredNames:
    """No tokens file: a client's HELLO names it, unchecked."""
    required = False

    def hello(self, arg: bytes) -> str | None:
        return declared_scope(arg.decode()) if valid_name(arg) else None


class TokenFile:
    """`--tokens FILE`: one client a line, `<name> <token>` (`#` comments).  HELLO <token>
    names the client; a connection without a known token is refused.  The file must not be
    readable by group or others.  Only SHA-256 digests of the tokens are kept."""
    required = True

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ValueError(f"tokens file {path} is open to group or others "
                             f"(mode {stat.S_IMODE(mode):o}): chmod 600 it")
        self.clients: list[tuple[bytes, str]] = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or not valid_name(parts[0].encode()) or len(parts[1]) < 16:
                raise ValueError(f"tokens file {path} line {n}: expected '<name> <token>' "
                                 "with a name of printable characters and a token of at "
                                 "least 16")
            self.clients.append((hashlib.sha256(parts[1].encode()).digest(), parts[0]))
        if not self.clients:
            raise ValueError(f"tokens file {path} names no client")

    def hello(self, arg: bytes) -> str | None:
        digest = hashlib.sha256(arg).digest()
        found = None
        for known, name in self.clients:        # no early exit: same time for every token
            if hmac.compare_digest(known, digest):
                found = name
        return token_scope(found) if found else None


class _Conn:
    __slots__ = ("writer", "scope", "waiting", "last")

    def __init__(self, writer: asyncio.StreamWriter, now: float):
        self.writer = writer
        self.scope: str | None = None
        self.waiting: set[bytes] = set()   # scoped ids this connection waits for
        self.last = now                    # when it last sent a line (loop time)


class Gateway:
    def __init__(self, bootstrap: str, vm: str, *, limits: Limits = Limits(),
                 identity=None, producer=None):
        """producer: a stand-in for the Kafka producer (tests); then the topics are
        neither checked nor read, and no responses are consumed: feed them to answer()."""
        self.bootstrap, self.vm = bootstrap, vm
        self.limits = limits
        self.identity = identity or DeclaredNames()
        self.writer = writer_id(vm).encode()
        self.log = structlog.get_logger().bind(vm_id=vm, role="gateway")
        self.client_id = client_id(vm, "gateway")
        self.sent: OrderedDict[bytes, float] = OrderedDict()     # scoped id -> when (wall)
        self.answers: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()
        #                                       scoped id -> (when, the answer after the id)
        self.waiting: dict[bytes, dict[_Conn, bytes]] = {}   # scoped id -> conn -> its id
        self.max_seq = -1                  # .out's seqs only grow
        self.clients = 0
        self.conns: set[_Conn] = set()
        self.stats = {"requests": 0, "retries": 0, "responses": 0, "duplicate_outputs": 0,
                      "unknown_responses": 0, "clients": 0, "refused_clients": 0,
                      "peak_connections": 0, "idle_closed": 0, "slow_dropped": 0,
                      "busy": 0, "not_delivered": 0, "pruned": 0,
                      "void_outputs": 0, "forged_outputs": 0}
        self._nonce = secrets.token_hex(8)
        self._conn_numbers = itertools.count(1)
        self._queue: queue.Queue = queue.Queue(maxsize=limits.produce_queue)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._live = producer is None
        if self._live:
            self.topics = ensure_topics(bootstrap, vm)
            self.producer = Producer(dict(client_conf(bootstrap, self.client_id), **{
                "enable.idempotence": True, "acks": "all", "linger.ms": 1,
                # never give up on a request (its outcome would be unknown: a retry could
                # run it twice); while Kafka is away the queues fill and new requests get
                # ERR busy instead
                "message.timeout.ms": 0,
                "queue.buffering.max.messages": limits.produce_queue,
                "queue.buffering.max.kbytes": max(1, limits.produce_queue * MAX_LINE // 1024)}))
            self._rebuild()
        else:
            self.topics = topics(vm)
            self.producer = producer

    # -- state from the topics ----------------------------------------------------------
    def _rebuild(self) -> None:
        """What was sent within the retry window, read from where the window starts (by
        the records' timestamps); and what was validly released.  .out is read from its
        beginning: the epoch rule needs its Epoch records, and the answers kept are
        bounded by count (max_answers) as they are added."""
        oldest_ms = (time.time() - self.limits.retry_window_s) * 1000
        start = self._offset_at(self.topics.inputs, oldest_ms)
        for msg in scan_topic(self.bootstrap, self.topics.inputs, start=start,
                              committed=False, client_id=self.client_id):
            ts = msg.timestamp()[1]
            if record_mac.problem(msg):     # not the gateway's: never sent, nothing to skip
                continue
            if ts >= oldest_ms:
                self.sent[request_fields(msg.value() or b"")[0]] = ts / 1000
                self._prune_count()
        self._out_offset = 0
        self.releases = ReleaseFilter(self.bootstrap, self.vm)
        for msg in scan_topic(self.bootstrap, self.topics.outputs, client_id=self.client_id):
            self._admit(msg)
            self._out_offset = msg.offset() + 1
        self.releases.log.read_to_end()
        for out in self.releases.ready():
            got = self._take_output(out)
            if got:
                self.answers[got[0]] = (time.time(), got[1])
                self._prune_count()
        self.log.info("state", sent=len(self.sent), answered=len(self.answers))

    def _offset_at(self, topic: str, ts_ms: float) -> int:
        """The first offset of topic at or after ts_ms; its end if none is that recent; 0
        if the broker cannot say."""
        c = Consumer(dict(client_conf(self.bootstrap, self.client_id),
                          **{"group.id": "kvmrr-gateway-times"}))
        try:
            got = c.offsets_for_times([TopicPartition(topic, 0, int(ts_ms))], timeout=15)[0]
            if got.error is None and got.offset >= 0:
                return got.offset
            if got.error is None:
                return max(0, watermarks(self.bootstrap, topic, client_id=self.client_id)[1])
        except KafkaException:
            pass
        finally:
            c.close()
        return 0

    def _admit(self, msg) -> None:
        """A message from .out into the release filter (a stranger's or an undecodable
        one is ignored, with the reason logged)."""
        if dict(msg.headers() or []).get(WRITER_HEADER) != self.writer:
            self.log.warning("not the VM's recorder: ignored", offset=msg.offset())
            return
        forged = record_mac.problem(msg)
        if forged:     # ignored and counted: a client never gets a forged answer
            self.stats["forged_outputs"] += 1
            self.log.error("forged response: ignored", offset=msg.offset(), error=forged)
            return
        try:
            out = decode_message(msg.value() or b"", msg.headers() or [])
        except LogFormatError as exc:
            self.log.error("undecodable response: ignored", offset=msg.offset(), error=str(exc))
            return
        self.releases.add(out, msg.offset())

    def _take_output(self, out: dict) -> tuple[bytes, bytes] | None:
        """A valid release as (scoped id, the line after the id), or None for one to
        ignore (with the reason counted)."""
        self.stats["void_outputs"] = self.releases.void
        if out["seq"] <= self.max_seq:
            # a response released twice would be a broken output commit: never passed on
            self.stats["duplicate_outputs"] += 1
            self.log.error("output seq released twice", seq=out["seq"], epoch=out["epoch"])
            return None
        self.max_seq = out["seq"]
        key, rest = request_fields(out["data"])
        return key, (b" " + rest if rest else b"")

    # -- released responses, on a thread --------------------------------------------------
    def _consume_outputs(self) -> None:
        c = Consumer(dict(client_conf(self.bootstrap, self.client_id), **{
            "group.id": f"kvmrr.{self.vm}.gateway", "enable.auto.commit": False,
            "fetch.wait.max.ms": TAIL_FETCH_WAIT_MS}))
        c.assign([TopicPartition(self.topics.outputs, 0, self._out_offset)])
        try:
            while not self._stop.is_set():
                msg = c.poll(0.1 if not self.releases.waiting else 0.002)
                if msg is not None and not msg.error():
                    self._admit(msg)
                for out in self.releases.ready(0.002):
                    self._loop.call_soon_threadsafe(self._deliver, out)
        finally:
            c.close()
            self.releases.close()

    def _deliver(self, out: dict) -> None:
        got = self._take_output(out)
        if got is not None:
            self.answer(*got)

    def answer(self, key: bytes, rest: bytes) -> None:
        """A released response to the scoped id key: kept, and sent to whoever waits."""
        if key in self.answers:
            self.stats["duplicate_outputs"] += 1
            self.log.error("request answered twice", id=key.decode("ascii", "replace"))
            return
        self.answers[key] = (time.time(), rest)
        self._prune_count()
        self.stats["responses"] += 1
        waiters = self.waiting.pop(key, {})
        for conn, rid in waiters.items():
            conn.waiting.discard(key)
            self._send(conn, rid + rest)
        if key not in self.sent and not waiters:
            self.stats["unknown_responses"] += 1   # e.g. "-" for a request without an id

    # -- clients --------------------------------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        if self.clients >= self.limits.max_clients:
            self.stats["refused_clients"] += 1
            writer.write(b"- ERR too many connections: try later\n")
            writer.close()
            return
        self.clients += 1
        self.stats["clients"] += 1
        self.stats["peak_connections"] = max(self.stats["peak_connections"], self.clients)
        conn = _Conn(writer, self._loop.time())
        self.conns.add(conn)
        first = True
        try:
            while not writer.is_closing():
                try:
                    raw = await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError:
                    self._send(conn, b"- ERR line longer than %d bytes" % MAX_LINE)
                    return
                except (asyncio.IncompleteReadError, ConnectionError, OSError):
                    return
                conn.last = self._loop.time()
                line = raw.rstrip(b"\r\n")
                if not line.strip():
                    continue
                if first:
                    first = False
                    if line == b"HELLO" or line.startswith(b"HELLO "):
                        conn.scope = self.identity.hello(line[6:].strip())
                        if conn.scope is None:
                            self._send(conn, b"HELLO ERR unknown client")
                            return
                        self._send(conn, b"HELLO OK")
                        continue
                    if self.identity.required:
                        self._send(conn, b"- ERR say HELLO <token> first")
                        return
                    conn.scope = f"conn:{self._nonce}:{next(self._conn_numbers)}"
                self._request(conn, line)
                if writer.transport.get_write_buffer_size() < DRAIN_ABOVE:
                    continue
                try:            # back-pressure: read no more until the client reads
                    await asyncio.wait_for(writer.drain(), self.limits.write_timeout_s)
                except asyncio.TimeoutError:
                    self._drop_slow(conn)
                    return
                except (ConnectionError, OSError):
                    return
        except asyncio.CancelledError:
            return                      # the gateway stops
        finally:
            self.clients -= 1
            self.conns.discard(conn)
            for key in conn.waiting:
                waiters = self.waiting.get(key)
                if waiters is not None:
                    waiters.pop(conn, None)
                    if not waiters:
                        del self.waiting[key]
            if not writer.is_closing():
                writer.close()

    def _request(self, conn: _Conn, line: bytes) -> None:
        rid, command = request_fields(line)
        if not rid or rid == b"-" or rid == b"HELLO" or len(rid) > ID_MAX \
                or not command.strip():
            self._send(conn, (rid if rid and len(rid) <= ID_MAX else b"-") +
                       b" ERR a request is '<id> <command>' with an id of at most %d bytes"
                       % ID_MAX)
            return
        key = scoped_request_id(conn.scope, rid)
        request = key + b" " + command
        if len(request) > MAX_LINE:
            self._send(conn, rid + b" ERR a request's command is at most %d bytes"
                       % (MAX_LINE - len(key) - 1))
            return
        answered = self.answers.get(key)
        if answered is not None:
            self.stats["retries"] += 1
            self._send(conn, rid + answered[1])
            return
        if key in conn.waiting:
            self.stats["retries"] += 1
            return
        if len(conn.waiting) >= self.limits.max_pending:
            self._send(conn, rid + b" ERR %d requests of this connection are unanswered: "
                       b"wait for their answers" % len(conn.waiting))
            return
        if key not in self.sent:
            try:
                self._queue.put_nowait((key, request, conn.scope.encode()))
            except queue.Full:
                self.stats["busy"] += 1
                self._send(conn, rid + b" ERR busy: the log does not take requests now "
                           b"(not sent: retry later)")
                return
            self.sent[key] = time.time()
            self._prune_count()
            self.stats["requests"] += 1
        else:
            self.stats["retries"] += 1
        conn.waiting.add(key)
        self.waiting.setdefault(key, {})[conn] = rid

    def _send(self, conn: _Conn, line: bytes) -> None:
        w = conn.writer
        if w.is_closing():
            return
        w.write(line + b"\n")
        if w.transport.get_write_buffer_size() > self.limits.write_buffer_bytes:
            self._drop_slow(conn)

    def _drop_slow(self, conn: _Conn) -> None:
        """A client that does not read its answers: dropped, and its buffer with it."""
        self.stats["slow_dropped"] += 1
        self.log.warning("client does not read: dropped", scope=conn.scope)
        conn.writer.transport.abort()

    # -- the ids kept --------------------------------------------------------------------
    def _prune_count(self) -> None:
        for kept in (self.sent, self.answers):
            while len(kept) > self.limits.max_answers:
                kept.popitem(last=False)
                self.stats["pruned"] += 1

    def prune(self, now: float | None = None) -> None:
        """Forget ids sent or answered before the retry window."""
        oldest = (time.time() if now is None else now) - self.limits.retry_window_s
        while self.sent and next(iter(self.sent.values())) < oldest:
            self.sent.popitem(last=False)
            self.stats["pruned"] += 1
        while self.answers and next(iter(self.answers.values()))[0] < oldest:
            self.answers.popitem(last=False)
            self.stats["pruned"] += 1
        self._prune_count()

    # -- requests to Kafka, on a thread ---------------------------------------------------
    def _produce_loop(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=0.05)
            except queue.Empty:
                self.producer.poll(0)
                if self._stop.is_set():
                    return
                continue
            key, request, scope = item
            # MACed with the VM's record key like every record a reader trusts: the
            # primary takes only the gateway's requests (docs/operating.md §6.3)
            headers = record_mac.sign(self.topics.inputs, key, request,
                                      [(CLIENT_HEADER, scope)])
            while True:
                try:
                    self.producer.produce(self.topics.inputs, request, key,
                                          headers=headers, on_delivery=self._delivery)
                    break
                except BufferError:        # librdkafka's queue is full: Kafka is behind
                    self.producer.poll(0.05)
                    if self._stop.is_set():
                        return
            self.producer.poll(0)

    def _delivery(self, err, msg) -> None:
        """On the producer thread.  A message that could not be written for good (not a
        timeout: there is none) was not sent: its waiters are told, and may retry."""
        if err is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._not_sent, msg.key(), err.str())

    def _not_sent(self, key: bytes, why: str) -> None:
        self.stats["not_delivered"] += 1
        self.log.error("request not written to the log", error=why)
        self.sent.pop(key, None)
        for conn, rid in self.waiting.pop(key, {}).items():
            conn.waiting.discard(key)
            self._send(conn, rid + b" ERR not sent to the log: retry")

    async def serve(self, host: str, port: int, ready=None, tls=None) -> None:
        """tls: an ssl.SSLContext for the client port (--tls-cert), or None for TCP."""
        self._loop = asyncio.get_running_loop()
        handshake_s = min(10.0, self.limits.idle_timeout_s) if tls else None
        server = await asyncio.start_server(self._client, host, port, limit=MAX_LINE + 2,
                                            ssl=tls, ssl_handshake_timeout=handshake_s)
        self.port = server.sockets[0].getsockname()[1]
        threads = [threading.Thread(target=self._produce_loop, name="kvmrr-gateway-in",
                                    daemon=True)]
        if self._live:
            threads.append(threading.Thread(target=self._consume_outputs,
                                            name="kvmrr-gateway-out", daemon=True))
        for t in threads:
            t.start()
        housekeeping = asyncio.create_task(self._housekeeping())
        self.log.info(events.LISTENING, host=host, port=self.port, tls=tls is not None,
                      **self.limits.__dict__)
        if ready:
            ready(self.port)
        try:
            async with server:
                await server.serve_forever()
        finally:
            housekeeping.cancel()
            self._stop.set()
            for t in threads:
                t.join(5)
            if self._live:
                self.producer.flush(10)

    def close_idle(self) -> None:
        """Close the connections silent for idle_timeout_s with nothing pending."""
        oldest = self._loop.time() - self.limits.idle_timeout_s
        for conn in [c for c in self.conns if c.last < oldest and not c.waiting]:
            self.stats["idle_closed"] += 1
            self._send(conn, b"- ERR idle for %d s: closing" % self.limits.idle_timeout_s)
            conn.writer.close()
            self.conns.discard(conn)

    async def _housekeeping(self) -> None:
        """Idle connections closed, ids out of the retry window forgotten; the counters
        now and then."""
        last = time.monotonic()
        every = min(PRUNE_EVERY_S, self.limits.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(every)
            self.close_idle()
            self.prune()
            if time.monotonic() - last >= STATS_EVERY_S:
                last = time.monotonic()
                self.log.info("stats", connections=self.clients, pending=len(self.waiting),
                              sent_kept=len(self.sent), answers_kept=len(self.answers),
                              produce_queue=self._queue.qsize(), **self.stats)
