"""Codec throughput and log size for `make bench-core`: python -m schemas.bench"""

from __future__ import annotations

import json
import time

from schemas.codec import decode_message, encode_message


def _timer_batches(events: int, batch_size: int) -> list[dict]:
    """Interrupts as a 1 kHz timer logs them from a guest running ~1 M instructions/s:
    icount near 1e9, a few distinct RIPs near 1 MiB, vector 32."""
    batches = []
    for first in range(0, events, batch_size):
        batch = [{"kind": "Interrupt", "icount": 1_000_000_000 + seq * 1_003,
                  "rip": 0x101000 + (seq % 7) * 0x13, "vector": 32}
                 for seq in range(first, min(first + batch_size, events))]
        batches.append({"kind": "EventBatch", "first_seq": first, "events": batch,
                        "next_input_offset": -1, "epoch": 0})
    return batches


def bench_codec(events: int = 200_000, batch_size: int = 256) -> dict:
    """Encode then decode `events` Interrupt events as Kafka messages of `batch_size`
    events.  Returns events/s through encode+decode (and each alone) and the average
    bytes per Interrupt, batch overhead included."""
    batches = _timer_batches(events, batch_size)

    start = time.perf_counter()
    messages = [encode_message(batch) for batch in batches]
    encoded = time.perf_counter()
    decoded = [decode_message(value, headers) for value, headers in messages]
    done = time.perf_counter()

    if decoded != batches:
        raise AssertionError("codec round trip changed the events")
    value_bytes = sum(len(value) for value, _ in messages)
    return {
        "events": events,
        "batch_size": batch_size,
        "events_per_s": events / (done - start),
        "encode_events_per_s": events / (encoded - start),
        "decode_events_per_s": events / (done - encoded),
        "bytes_per_interrupt": value_bytes / events,
    }


if __name__ == "__main__":
    print(json.dumps(bench_codec(), indent=2))
