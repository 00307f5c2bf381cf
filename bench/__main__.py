"""The benchmarks: `python -m bench SUITE` (the Makefile's bench-* targets) writes
bench/SUITE.json.  Every ratio is measured in one run on this (shared, noisy) machine."""
from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path


def _suite(name: str):
    if name == "core":
        from bench.core import bench_core as run
    elif name == "log":
        from bench.log import bench_log as run
    elif name == "ft":
        from bench.ft import run
    elif name == "gdb":
        from bench.gdb import bench_gdb as run
    elif name == "linux":
        from bench.linux import bench_linux as run
    elif name == "security":
        from bench.security import bench_security as run
    else:
        from bench.cluster import bench_cluster as run
    return run


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("suite", choices=("core", "log", "ft", "cluster", "gdb", "security",
                                          "linux"))
    ap.add_argument("--out", default=None, help="default bench/SUITE.json")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    args.out = args.out or f"bench/{args.suite}.json"
    # a SIGTERM unwinds like ^C, so the suite's brokers and follower are stopped
    signal.signal(signal.SIGTERM, _interrupted)
    from kvmrr.logsetup import configure
    configure()          # progress as structured events on stderr; the result on stdout
    result = _suite(args.suite)(args.quick)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
