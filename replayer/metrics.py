"""Prometheus metrics of a backup, units in the names."""
from __future__ import annotations

import os

from prometheus_client import Gauge, start_http_server

# where --metrics-port listens: loopback unless KVMRR_METRICS_ADDR says otherwise (the
# kvmrr/node image sets 0.0.0.0, so its exposed 9100 can be scraped from the network)
METRICS_ADDR_ENV = "KVMRR_METRICS_ADDR"
DEFAULT_METRICS_ADDR = "127.0.0.1"

LAG_INSTRUCTIONS = Gauge("kvmrr_replay_lag_instructions",
                         "instructions the backup's replay is behind the received log",
                         ["vm", "backup"])
LAG_SECONDS = Gauge("kvmrr_replay_lag_seconds",
                    "age of the newest primary heartbeat the replay has reached",
                    ["vm", "backup"])
REPLAYED = Gauge("kvmrr_replayed_instructions", "icount the backup has replayed to",
                 ["vm", "backup"])


def metrics_addr() -> str:
    return os.environ.get(METRICS_ADDR_ENV) or DEFAULT_METRICS_ADDR


def serve(port: int, addr: str | None = None):
    """The metrics on addr:port (addr: KVMRR_METRICS_ADDR, or 127.0.0.1); (server, thread)."""
    return start_http_server(port, addr=addr or metrics_addr())
