"""Percentiles, computed one way for every figure the project reports (CLI, client,
benchmarks): the nearest rank, so a reported p99 is a latency that was measured."""
from __future__ import annotations

from typing import Iterable


def percentile(values: Iterable[float], q: float) -> float | None:
    """The value at rank q (0..1) of the sorted values; None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def percentile_ms(values: Iterable[float], q: float) -> float | None:
    """percentile() of values in seconds, in milliseconds rounded to 0.01."""
    p = percentile(values, q)
    return None if p is None else round(p * 1e3, 2)
