"""Prometheus metrics of a backup, units in the names."""
from __future__ import annotations

from prometheus_client import Gauge, start_http_server

LAG_INSTRUCTIONS = Gauge("kvmrr_replay_lag_instructions",
                         "instructions the backup's replay is behind the received log",
                         ["vm", "backup"])
LAG_SECONDS = Gauge("kvmrr_replay_lag_seconds",
                    "age of the newest primary heartbeat the replay has reached",
                    ["vm", "backup"])
REPLAYED = Gauge("kvmrr_replayed_instructions", "icount the backup has replayed to",
                 ["vm", "backup"])


def serve(port: int) -> None:
    start_http_server(port, addr="127.0.0.1")
