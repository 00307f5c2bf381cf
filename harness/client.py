"""A kvstore client over the gateway that never gives up on a request, and checks what it
got: used by `make run`, the fault-tolerance tests and the benchmark.

Requests are seeded (recorder.loadgen.KvLoad), with ids `<name>-<n>`.  Each connection
starts with `HELLO <name>` (or `HELLO <token>` for a gateway with a tokens file), so the
gateway knows the client again after a reconnect.  When the connection breaks it reconnects
and sends every unanswered request again, with its id: the gateway answers each id once.
It counts what a user would: answered, lost (never answered), duplicated (answered twice),
and at the end checks that the store holds the last acknowledged write of every key it
wrote.
"""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from kvmrr_log.percentiles import percentile_ms
from kvmrr_log.requests import request_id, request_line, split_request
from recorder.loadgen import KvLoad

RECONNECT_S = 0.1


@dataclass
class ClientReport:
    requests: int
    answered: int
    lost: int
    duplicated: int
    errors: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    reconnects: int
    store_checked: int = 0
    store_mismatches: int = 0


class KvClient:
    def __init__(self, host: str, port: int, *, name: str = "c", seed: int = 1,
                 keys: int = 32, token: str | None = None):
        self.addr = (host, port)
        self.name = name
        self.hello = f"HELLO {token or name}\n".encode()
        self.hello_refused: bytes | None = None
        self._gen = KvLoad(seed=seed, rate_hz=1.0, keys=keys)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.pending: dict[str, tuple[bytes, float]] = {}   # id -> (line, first sent)
        self.answers: dict[str, bytes] = {}
        self.order: list[str] = []                          # ids in the order sent
        self.lines: dict[str, bytes] = {}
        self.latencies: list[float] = []
        self.duplicated = 0
        self.errors = 0
        self.reconnects = 0
        self.answered_at: dict[str, tuple[float, float]] = {}   # id -> (sent, answered)
        self._closed = False
        self._reader: threading.Thread | None = None

    # -- connection ------------------------------------------------------------------------
    def _connect(self) -> socket.socket | None:
        with self._lock:
            if self._sock is not None:
                return self._sock
        try:
            s = socket.create_connection(self.addr, timeout=2)
        except OSError:
            return None
        s.settimeout(None)
        # one short line per request: Nagle would hold a request back until the gateway
        # acknowledges the previous one (its next answer, or a delayed ACK)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._sock = s
            resend = [self.pending[i][0] for i in self.order if i in self.pending]
        self._reader = threading.Thread(target=self._read, args=(s,), daemon=True)
        self._reader.start()
        if resend:
            self.reconnects += 1
        self._write(s, self.hello + b"".join(line + b"\n" for line in resend))
        return s

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            if self._sock is s:
                self._sock = None
        try:
            s.close()
        except OSError:
            pass

    def _write(self, s: socket.socket, data: bytes) -> None:
        try:
            s.sendall(data)
        except OSError:
            self._drop(s)

    def _read(self, s: socket.socket) -> None:
        buf = b""
        while True:
            try:
                chunk = s.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                self._drop(s)
                return
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                self._answer(line)

    def _answer(self, line: bytes) -> None:
        if line.startswith(b"HELLO "):
            if line != b"HELLO OK":
                self.hello_refused = line
            return
        rid = request_id(line)
        now = time.monotonic()
        with self._lock:
            if rid in self.answers:
                self.duplicated += 1
                return
            if rid not in self.pending:
                self.errors += 1          # an answer to nothing this client asked
                return
            _, sent = self.pending.pop(rid)
            self.answers[rid] = line
            self.latencies.append(now - sent)
            self.answered_at[rid] = (sent, now)
            if split_request(line)[1].startswith("ERR"):
                self.errors += 1

    # -- requests --------------------------------------------------------------------------
    def send(self, body: str) -> str:
        """Send `<id> body`; the id."""
        s = self._connect()
        with self._lock:
            rid = f"{self.name}-{len(self.order) + 1}"
            line = request_line(rid, body)
            self.order.append(rid)
            self.lines[rid] = line
            self.pending[rid] = (line, time.monotonic())
        if s is not None:
            self._write(s, line + b"\n")
        return rid

    def send_random(self) -> str:
        return self.send(self._gen.command())

    def run(self, rate_hz: float, seconds: float, stop: threading.Event | None = None,
            on_tick=None) -> None:
        """Send at rate_hz for seconds (or until stop), reconnecting as needed."""
        interval = 1.0 / rate_hz
        t_end = time.monotonic() + seconds
        next_t = time.monotonic()
        while time.monotonic() < t_end and not (stop and stop.is_set()):
            now = time.monotonic()
            if now >= next_t:
                self.send_random()
                next_t += interval
                if next_t < now - 1:       # far behind (a stall): do not burst
                    next_t = now
            if self._sock is None:
                self._connect()
            if on_tick:
                on_tick()
            time.sleep(min(max(0.0, next_t - time.monotonic()), 0.01))

    def drain(self, timeout: float) -> bool:
        """Wait until every request is answered; False if some never were."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self.pending:
                    return True
            if self._sock is None:
                self._connect()
            time.sleep(0.02)
        return not self.pending

    def answer_times(self) -> dict[str, tuple[float, float]]:
        """id -> (sent, answered), a copy (the reader thread keeps adding)."""
        with self._lock:
            return dict(self.answered_at)

    def latencies_between(self, sent_from: float = 0.0,
                          answered_before: float = float("inf")) -> list[float]:
        """Seconds from sent to answered of the requests sent at or after monotonic time
        sent_from and answered before answered_before (a measured load's, or those before
        a kill)."""
        with self._lock:
            return [a - s for s, a in self.answered_at.values()
                    if s >= sent_from and a < answered_before]

    def first_answer_sent_after(self, t: float) -> float | None:
        """When the first answer to a request sent at or after monotonic time t came: after
        a primary is killed at t, the first response from its successor."""
        with self._lock:
            later = [a for s, a in self.answered_at.values() if s >= t]
        return min(later) if later else None

    def request(self, body: str, timeout: float = 30.0) -> bytes:
        rid = self.send(body)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if rid in self.answers:
                    return self.answers[rid]
            if self._sock is None:
                self._connect()
            time.sleep(0.005)
        raise TimeoutError(f"no answer to {rid} {body} within {timeout} s")

    # -- checks ----------------------------------------------------------------------------
    def expected_store(self) -> dict[str, str | None]:
        """The last acknowledged write of every key, in the order the requests were sent
        (one connection: the gateway puts them on .in in that order)."""
        model: dict[str, str | None] = {}
        for rid in self.order:
            parts = split_request(self.lines[rid])[1].split(" ")
            answer = split_request(self.answers.get(rid, b""))[1].split(" ")
            if parts[0] == "PUT" and answer[0] == "OK":
                model[parts[1]] = parts[2]
            elif parts[0] == "DEL" and answer[0] in ("OK", "NOTFOUND"):
                model[parts[1]] = None
        return model

    def check_store(self, timeout: float = 30.0) -> tuple[int, list[str]]:
        """GET every key written; (keys checked, mismatches described)."""
        bad = []
        model = self.expected_store()
        for key, value in sorted(model.items()):
            answer = split_request(self.request(f"GET {key}", timeout))[1]
            got = answer.split(" ")
            if value is None:
                if got[0] != "NOTFOUND":
                    bad.append(f"{key}: expected deleted, got {answer}")
            elif got[0] != "OK" or got[-1] != value:
                bad.append(f"{key}: expected {value}, got {answer}")
        return len(model), bad

    def report(self) -> ClientReport:
        with self._lock:
            lat = list(self.latencies)
            return ClientReport(
                requests=len(self.order), answered=len(self.answers), lost=len(self.pending),
                duplicated=self.duplicated, errors=self.errors, 
                latency_p50_ms=percentile_ms(lat, 0.5),
                latency_p99_ms=percentile_ms(lat, 0.99), reconnects=self.reconnects)

    def close(self) -> None:
        with self._lock:
            s, self._sock = self._sock, None
        if s:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass
