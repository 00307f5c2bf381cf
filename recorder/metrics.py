"""Prometheus metrics of a primary, units in the names (served with `--metrics-port`)."""
from __future__ import annotations

from prometheus_client import Counter, Histogram

OUTPUT_COMMIT_SECONDS = Histogram(
    "kvmrr_output_commit_seconds",
    "a response: the start of the slice that produced it -> released on .out "
    "(docs/ARCHITECTURE.md §5.1)",
    ["vm", "policy"],
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0))
RESPONSES_RELEASED = Counter("kvmrr_responses_released_total",
                             "responses released on .out", ["vm"])
