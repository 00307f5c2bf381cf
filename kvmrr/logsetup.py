"""The one logging path: every kvmrr process (the CLI's verbs, the demo, the benchmarks and
the sweep) logs structured events through structlog, configured here once at its start;
libraries only call `structlog.get_logger()`.

Events go to stderr: one JSON object a line (`event`, `level`, `timestamp` and the event's
fields), which the FT harness and the benchmarks read, or, when stderr is a terminal, the
console renderer for a human.  stdout stays for a command's result (the `--json` summary,
the demo's summary) and the guest's console.  Event names other programs read are in
kvmrr_log/events.py.
"""
from __future__ import annotations

import logging
import sys

import structlog


class _Stderr:
    """A PrintLogger on whatever sys.stderr is when a logger is made (pytest swaps it)."""

    def __call__(self, *args) -> structlog.PrintLogger:
        return structlog.PrintLogger(sys.stderr)


def configure(level: int = logging.INFO, console: bool | None = None) -> None:
    """console: human-readable lines (default: when stderr is a terminal), else JSON."""
    if console is None:
        console = sys.stderr.isatty()
    if console:
        stamp = structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False)
        renderer = structlog.dev.ConsoleRenderer()
    else:
        stamp = structlog.processors.TimeStamper(fmt="iso")
        renderer = structlog.processors.JSONRenderer(sort_keys=True)
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars,
                    structlog.processors.add_log_level, stamp, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_Stderr(),
        cache_logger_on_first_use=False)
