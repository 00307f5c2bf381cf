"""What a replay can fail with.  Every message is one line a user can act on."""
from __future__ import annotations


class ReplayError(Exception):
    """The log cannot be replayed (gap, wrong guest, unknown semantics, ...)."""


class DivergenceError(ReplayError):
    """The replay disagrees with its record; .report holds the full report."""

    def __init__(self, message: str, report: str, icount: int):
        super().__init__(message)
        self.report = report
        self.icount = icount

