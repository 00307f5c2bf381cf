"""What record and replay both compute so a replay can be checked against its record."""
from __future__ import annotations

import hashlib
import struct

# What an icount means on this host (docs/ARCHITECTURE.md §2.6).  Both counters produce it
# (calibration proves it at start); a log that names other semantics is refused, never
# replayed.
ICOUNT_SEMANTICS = ("x86-64 instructions retired since the first; REP string = 1 + 1 per "
                    "~1 KiB chunk; KVM insn_emulation v1")


class OutputDigest:
    """sha256 over every output in order: channel, seq, length, bytes."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.count = 0
        self.bytes = 0

    def add(self, event: dict) -> None:
        data = event["data"]
        self._h.update(struct.pack(">BQI", event["channel"], event["seq"], len(data)))
        self._h.update(data)
        self.count += 1
        self.bytes += len(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()
