"""`kvmrr gateway`: ordinary TCP clients in front of the replicated service (DESIGN §5).

One request per line, `<id> <command...>`, and one response line per request, `<id> ...`,
as the kvstore guest speaks.  The id is the client's: unique per request (prefix it with a
client name).  The gateway puts each new request on kvmrr.<vm>.in and answers from the
responses released to kvmrr.<vm>.out (only what a primary's commit policy let out).  A
release counts only under the epoch rule (kvmrr_log.epochs.ReleaseFilter): its log record
must precede the next epoch's Epoch record, which the gateway reads from the log itself, so
an old primary that keeps writing after a takeover gets nothing to a client.  It holds no
state that matters to the service, so it does not care which primary is live.

Exactly once, seen from the client: a request id is put on .in once, however often the
client sends it (a retry after a reconnect waits for the same answer), and a response is
sent once per id and connection; an id already answered gets the stored answer again
(that is the retry's answer, not a second execution).  At start the gateway reads .in and
.out from the beginning, so a restarted gateway knows every id already sent and answered.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict

import structlog
from confluent_kafka import Consumer, Producer, TopicPartition

from kvmrr_log.epochs import ReleaseFilter
from kvmrr_log.kafka import WRITER_HEADER, client_conf, ensure_topics, scan_topic, writer_id
from schemas import LogFormatError, decode_message

MAX_LINE = 2048            # the guest NIC's MTU
STATS_EVERY_S = 5.0


class Gateway:
    def __init__(self, bootstrap: str, vm: str):
        self.bootstrap, self.vm = bootstrap, vm
        self.topics = ensure_topics(bootstrap, vm)
        self.writer = writer_id(vm).encode()
        self.log = structlog.get_logger().bind(vm_id=vm, role="gateway")
        self.producer = Producer(dict(client_conf(bootstrap), **{
            "enable.idempotence": True, "acks": "all", "linger.ms": 1}))
        self.sent: set[str] = set()            # ids on .in
        self.answers: dict[str, bytes] = {}    # id -> response line
        self.waiting: dict[str, set[asyncio.StreamWriter]] = defaultdict(set)
        self.seqs: set[int] = set()
        self.stats = {"requests": 0, "retries": 0, "responses": 0, "duplicate_outputs": 0,
                      "unknown_responses": 0, "clients": 0, "void_outputs": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._rebuild()

    # -- state from the topics ----------------------------------------------------------
    def _rebuild(self) -> None:
        for msg in scan_topic(self.bootstrap, self.topics.inputs, committed=False):
            self.sent.add(_request_id(msg.value() or b""))
        self._out_offset = 0
        self.releases = ReleaseFilter(self.bootstrap, self.vm)
        for msg in scan_topic(self.bootstrap, self.topics.outputs):
            self._admit(msg)
            self._out_offset = msg.offset() + 1
        self.releases.log.read_to_end()
        for out in self.releases.ready():
            self._take_output(out)
        self.log.info("state", sent=len(self.sent), answered=len(self.answers))

    def _admit(self, msg) -> None:
        """A message from .out into the release filter (a stranger's or an undecodable
        one is ignored, with the reason logged)."""
        if dict(msg.headers() or []).get(WRITER_HEADER) != self.writer:
            self.log.warning("not the VM's recorder: ignored", offset=msg.offset())
            return
        try:
            out = decode_message(msg.value() or b"", msg.headers() or [])
        except LogFormatError as exc:
            self.log.error("undecodable response: ignored", offset=msg.offset(), error=str(exc))
            return
        self.releases.add(out, msg.offset())

    def _take_output(self, out: dict) -> tuple[str, bytes] | None:
        """A valid release, or None for one to ignore (with the reason counted)."""
        self.stats["void_outputs"] = self.releases.void
        if out["seq"] in self.seqs:
            # a response released twice would be a broken output commit: never passed on
            self.stats["duplicate_outputs"] += 1
            self.log.error("output seq released twice", seq=out["seq"], epoch=out["epoch"])
            return None
        self.seqs.add(out["seq"])
        line = out["data"].rstrip(b"\n")
        rid = _request_id(line)
        if rid in self.answers:
            self.stats["duplicate_outputs"] += 1
            self.log.error("request answered twice", id=rid, seq=out["seq"])
            return None
        self.answers[rid] = line
        return rid, line

    # -- released responses, on a thread --------------------------------------------------
    def _consume_outputs(self) -> None:
        c = Consumer(dict(client_conf(self.bootstrap), **{
            "group.id": f"kvmrr.{self.vm}.gateway", "enable.auto.commit": False,
            "fetch.wait.max.ms": 5}))
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
        if got is None:
            return
        rid, line = got
        self.stats["responses"] += 1
        for w in self.waiting.pop(rid, ()):
            _send(w, line)
        if rid not in self.sent:
            self.stats["unknown_responses"] += 1   # e.g. "-" for a request without an id

    # -- clients --------------------------------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.stats["clients"] += 1
        mine: set[str] = set()
        try:
            while True:
                try:
                    raw = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    return
                except asyncio.LimitOverrunError:
                    _send(writer, b"- ERR line longer than %d bytes" % MAX_LINE)
                    return
                line = raw.rstrip(b"\r\n")
                if not line.strip():
                    continue
                rid = _request_id(line)
                if not rid or rid == "-" or len(line) > MAX_LINE:
                    _send(writer, f"{rid or '-'} ERR a request is '<id> <command>' of at most "
                                  f"{MAX_LINE} bytes".encode())
                    continue
                if rid in self.answers:
                    self.stats["retries"] += 1
                    _send(writer, self.answers[rid])
                    continue
                self.waiting[rid].add(writer)
                mine.add(rid)
                if rid in self.sent:
                    self.stats["retries"] += 1
                    continue
                self.sent.add(rid)
                self.stats["requests"] += 1
                self._produce(line)
        finally:
            for rid in mine:
                self.waiting.get(rid, set()).discard(writer)
            writer.close()

    def _produce(self, line: bytes) -> None:
        while True:
            try:
                self.producer.produce(self.topics.inputs, line, _request_id(line).encode())
                self.producer.poll(0)
                return
            except BufferError:
                self.producer.poll(0.01)

    async def serve(self, host: str, port: int, ready=None) -> None:
        self._loop = asyncio.get_running_loop()
        server = await asyncio.start_server(self._client, host, port, limit=MAX_LINE + 2)
        self.port = server.sockets[0].getsockname()[1]
        t = threading.Thread(target=self._consume_outputs, name="kvmrr-gateway-out",
                             daemon=True)
        t.start()
        flusher = asyncio.create_task(self._flush_loop())
        self.log.info("listening", host=host, port=self.port)
        if ready:
            ready(self.port)
        try:
            async with server:
                await server.serve_forever()
        finally:
            flusher.cancel()
            self._stop.set()
            self.producer.flush(10)

    async def _flush_loop(self) -> None:
        """Delivery reports of the .in producer; the counters now and then."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            self.producer.poll(0)
            if time.monotonic() - last >= STATS_EVERY_S:
                last = time.monotonic()
                self.log.info("stats", pending=sum(map(len, self.waiting.values())),
                              **self.stats)


def _request_id(line: bytes) -> str:
    return line.split(b" ", 1)[0].decode("ascii", "replace").strip()


def _send(writer: asyncio.StreamWriter, line: bytes) -> None:
    if not writer.is_closing():
        writer.write(line + b"\n")
