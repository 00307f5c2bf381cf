"""`kvmrr demo --guest linux` (make run-linux): the Linux guest's boot on an embedded
single-node Kafka, its primary killed mid-boot (issue 13, item 5; harness.linux_takeover
runs the scenario, tests/test_linux_takeover.py checks it).

Both the primary and the backup record with step (docs/guests.md §9), about 50 k
instructions/s here, so the demo stops at a budget (2.5 M instructions by default, about a
minute); the whole boot with KUnit under step on Kafka takes most of an hour.  Progress is
logged as structured events on stderr; the result is a human line, then one JSON line, on
stdout.
"""
from __future__ import annotations

import json
import os
import uuid

import structlog

from harness import linux_takeover
from harness.localkafka import LocalKafka, LocalKafkaError
from kvmrr_log.guest_images import load_guest
from libkvmrr import KvmrrError


def run_linux_demo(args) -> int:
    log = structlog.get_logger().bind(role="demo", guest="linux")
    if args.compose:
        log.error("demo_failed", error="the linux demo runs on the embedded Kafka only")
        return 2
    try:
        load_guest("linux")
    except (KvmrrError, OSError) as exc:
        log.error("demo_failed", error=f"{exc} (make linux-guest builds it)")
        return 2
    vm = f"lx{uuid.uuid4().hex[:8]}"
    try:
        with LocalKafka(1, f"demo-{os.getpid()}") as kafka:
            log.info("kafka_started", bootstrap=kafka.bootstrap, vm=vm)
            s = linux_takeover.run(kafka.bootstrap, vm, budget=args.max_instructions,
                                   say=lambda ev, **kw: log.info(ev, **kw))
    except (LocalKafkaError, TimeoutError) as exc:
        log.error("demo_failed", error=str(exc))
        return 2
    summary = {k: s[k] for k in ("vm", "budget", "took_over", "takeovers", "takeover_icount",
                                 "takeover_ms", "killed_after_s", "console_lines_before",
                                 "console_lines_after", "no_gap_no_duplicate", "checks",
                                 "replay_equal", "seconds")}
    summary["state_hash"] = s["backup"].get("state_hash")
    summary["replay_state_hash"] = s["replay"].get("state_hash")
    ok = bool(s["took_over"] and s["takeovers"] == 1 and s["no_gap_no_duplicate"]
              and s["replay_equal"])
    log.info("demo_finished", ok=ok)
    print(f"summary: the primary was killed after {s['killed_after_s']} s; backup b1 took "
          f"over at icount {s['takeover_icount']} ({s['takeover_ms']} ms) and recorded to "
          f"{s['backup'].get('instructions')}; console lines {s['console_lines_before']} by "
          f"the old primary + {s['console_lines_after']} by the new, no gap and no "
          f"duplicate: {s['no_gap_no_duplicate']}; offline replay equal: {s['replay_equal']}")
    print("kvmrr demo: " + ("the Linux boot survived its primary: console whole, state "
                            "verified" if ok else "FAILED"))
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 0 if ok else 1 if not s["replay_equal"] else 2
