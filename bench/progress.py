"""Progress of a long benchmark (`make bench` runs up to 30 minutes): after each measured
point, one structured event on stderr saying which point of how many, the time spent and
an estimate of the time left.

The estimate charges each point still to come with the mean time a point of its own
section took so far (sections differ a lot: a counter point takes a second, a served
point tens of seconds), or, for a section not begun, the mean over all points so far.
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict

import structlog


def clock_text(seconds: float | None) -> str | None:
    """1:05, 12:30, 1:02:03."""
    if seconds is None:
        return None
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    def __init__(self, plan: dict[str, int], event: str = "point", clock=time.monotonic,
                 log=None):
        """plan: points per section, in the order they run."""
        self.plan = {k: n for k, n in plan.items() if n > 0}
        self.total = sum(self.plan.values())
        self.event, self.clock = event, clock
        self.log = log or structlog.get_logger()
        self.done: Counter[str] = Counter()
        self.spent: defaultdict[str, float] = defaultdict(float)
        self.t0 = self._last = clock()

    @property
    def points_done(self) -> int:
        return sum(self.done.values())

    def eta_s(self) -> float | None:
        """Seconds still to go, estimated; None before the first point."""
        n = self.points_done
        if n == 0:
            return None
        overall = sum(self.spent.values()) / n
        left = 0.0
        for section, planned in self.plan.items():
            todo = planned - self.done[section]
            if todo > 0:
                per = (self.spent[section] / self.done[section] if self.done[section]
                       else overall)
                left += todo * per
        return left

    def between_points(self) -> None:
        """The time since the last point went to set-up (a broker started), not to the next
        point: it counts as elapsed, but no section's time per point is charged with it."""
        self._last = self.clock()

    def point(self, section: str, **fields) -> dict:
        """One point of `section` measured (its figures in fields): log where we are."""
        now = self.clock()
        self.spent[section] += now - self._last
        self._last = now
        self.done[section] += 1
        elapsed, eta = now - self.t0, self.eta_s()
        info = {"point": self.points_done, "of": self.total, "section": section,
                "elapsed": clock_text(elapsed), "eta": clock_text(eta),
                "elapsed_s": round(elapsed, 1), "eta_s": None if eta is None else round(eta, 1)}
        self.log.info(self.event, **info, **fields)
        return info
