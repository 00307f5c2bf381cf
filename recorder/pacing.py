"""Keeping the primary within reach of its backups (docs/ARCHITECTURE.md §6.5).

A backup replays more slowly than the primary records whenever the primary runs flat out:
every logged interrupt has to be met at its exact instruction, which costs the replay
about a millisecond that the recording does not pay (`make bench`: replay 0.88x record at
a 100 Hz timer).  Left alone, its lag grows without bound, and so does the catch-up a
takeover must replay before it goes live: the failover time.  So, as VMware FT does, the
primary slows down instead: after each slice it reads the backups' acks, and while the
most advanced backup it heard from lately is more than max_lag_s of the primary's own
progress behind, it pauses a little before the next slice.  A backup that stopped acking
(dead, or idle because it has caught up) does not hold the primary back.
"""
from __future__ import annotations

import time
from collections import deque

from recorder.service import AckWatch

DEFAULT_MAX_LAG_MS = 1000.0   # `--max-backup-lag-ms`: about the failover's catch-up budget
PAUSE_MAX_S = 0.02      # per slice: the primary never stops, it only slows down
LIVE_S = 2.0            # a backup heard from within this long counts
TRAIL_S = 120.0         # how much of the primary's progress is remembered


class BackupPacer:
    def __init__(self, bootstrap: str, vm: str, max_lag_s: float, me: str | None = None):
        """me: the backup id this primary had before it took over (its own acks)."""
        self.acks = AckWatch(bootstrap, vm)
        self.max_lag_s = max_lag_s
        self.me = me
        self._trail: deque[tuple[float, int]] = deque()   # (monotonic, icount) per slice
        self.paused_s = 0.0
        self.lag_s = 0.0        # the last lag seen, for the record's summary

    def lag(self, now: float, icount: int) -> float:
        """Seconds since the primary passed what the best live backup has replayed (0:
        none heard, or it has replayed all the primary has run)."""
        self._trail.append((now, icount))
        while self._trail and now - self._trail[0][0] > TRAIL_S:
            self._trail.popleft()
        self.acks.poll()
        best = self.acks.best_replayed(LIVE_S, exclude=self.me)
        if best < 0:
            return 0.0
        while self._trail and self._trail[0][1] <= best:   # passed: no longer needed
            self._trail.popleft()
        return now - self._trail[0][0] if self._trail else 0.0

    def pace(self, icount: int) -> None:
        """Called on the vCPU thread between slices."""
        self.lag_s = self.lag(time.monotonic(), icount)
        if self.lag_s > self.max_lag_s:
            pause = min(self.lag_s - self.max_lag_s, PAUSE_MAX_S)
            time.sleep(pause)
            self.paused_s += pause

    def close(self) -> None:
        self.acks.close()


def pacer_for(bootstrap: str, vm: str, max_lag_ms: float,
              me: str | None = None) -> BackupPacer | None:
    """The pacer `--max-backup-lag-ms` asks for (0: none)."""
    return BackupPacer(bootstrap, vm, max_lag_ms / 1000, me) if max_lag_ms > 0 else None
