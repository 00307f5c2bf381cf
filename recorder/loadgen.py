"""A seeded kvstore client that sends requests at host wall-clock times.

Used where no outside client exists (a recording without Kafka, benchmarks): the seed
fixes which requests are sent, the host clock decides when they arrive, which is exactly
the non-determinism the log must capture.
"""
from __future__ import annotations

import random


class KvLoad:
    def __init__(self, seed: int, rate_hz: float, keys: int = 64):
        if rate_hz <= 0:
            raise ValueError("rate must be positive")
        self._rng = random.Random(seed)
        self._interval_ns = int(1e9 / rate_hz)
        self._keys = keys
        self._next_ns: int | None = None
        self.sent = 0

    def next_due_ns(self, now_ns: int) -> int:
        if self._next_ns is None:
            self._next_ns = now_ns + self._interval_ns
        return self._next_ns

    def due(self, now_ns: int) -> list[bytes]:
        """The requests whose time has come (jittered around the rate)."""
        out = []
        while self.next_due_ns(now_ns) <= now_ns:
            out.append(self._request())
            jitter = self._rng.uniform(0.5, 1.5)
            self._next_ns += int(self._interval_ns * jitter)
        return out

    def _request(self) -> bytes:
        self.sent += 1
        return f"r{self.sent} {self.command()}".encode()

    def command(self) -> str:
        """The next seeded request, without its id."""
        key = f"k{self._rng.randrange(self._keys)}"
        op = self._rng.random()
        if op < 0.45:
            return f"PUT {key} v{self._rng.getrandbits(32):08x}"
        if op < 0.85:
            return f"GET {key}"
        if op < 0.95:
            return f"DEL {key}"
        return "STAT"
