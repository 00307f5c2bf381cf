"""The `kvmrr` command: one verb per job, thin over the library (rr's shape)."""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from libkvmrr import KvmrrError, resolve_counter
from kvmrr_log.guest_images import load_guest
from kvmrr_log.percentiles import percentile_ms
from kvmrr_log.kafka import FencedError, KafkaLogError
from kvmrr_log.urls import FileLog, LogUrlError, parse_log_url
from recorder.archive_sink import ArchiveSink
from recorder.loadgen import KvLoad
from recorder.pacing import DEFAULT_MAX_LAG_MS
from recorder.session import RecordSession
from replayer.errors import DivergenceError, ReplayError
from replayer.session import replay_records
from schemas import LogFormatError, read_archive

EXIT_DIVERGED = 1
EXIT_BAD_INPUT = 2
EXIT_FENCED = 3       # a newer primary took over: this one stopped, releasing nothing


class UsageError(Exception):
    pass


def _console(quiet: bool, to_stderr: bool):
    out = sys.stderr if to_stderr else sys.stdout

    def show(ev: dict) -> None:
        if ev["channel"] == 0 and not quiet:
            out.write(ev["data"].decode("utf-8", "replace"))
            out.flush()
    return show


def _file_only(url: str) -> FileLog:
    log = parse_log_url(url)
    if not isinstance(log, FileLog):
        raise UsageError("kafka:// logs need the Kafka log support (issue 3); use file:PATH")
    return log


def _load(args) -> KvLoad | None:
    if args.load and args.load > 0:
        return KvLoad(seed=args.seed, rate_hz=args.load)
    return None


def _default_load(args) -> None:
    if args.load is None:
        serving = getattr(args, "serve", False)
        args.load = 200.0 if args.guest == "kvstore" and not serving else 0.0


def _emit(args, summary: dict, human: str) -> None:
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(human, file=sys.stderr)   # stdout is the guest's console


def cmd_run(args, log=None) -> int:
    _default_load(args)
    guest = load_guest(args.guest)
    counter, why = resolve_counter(args.mode)
    session_kwargs = dict(counter=counter, vm_id=args.vm, bootargs=args.bootargs,
                          max_instructions=args.max_instructions, max_seconds=args.seconds,
                          checksum_every=args.checksum_every,
                          snapshot_every=args.snapshot_every, load=_load(args),
                          on_output=_console(args.quiet, args.json))
    extra = {}
    primary = pacer = None
    if log is None:
        sink = _NoSink()
        session = RecordSession(guest, sink, mode="run", **session_kwargs)
    elif isinstance(log, FileLog):
        sink = ArchiveSink(log.path, args.compression)
        session = RecordSession(guest, sink, **session_kwargs)
    else:
        from recorder.primary import record_on_kafka
        del session_kwargs["counter"], session_kwargs["vm_id"]
        primary = record_on_kafka(log.bootstrap, log.vm_id, guest, serve=args.serve,
                                  policy=_policy(args.commit), counter=counter,
                                  max_backup_lag_ms=args.max_backup_lag_ms,
                                  heartbeat_every_ns=args.heartbeat_ms * 1_000_000,
                                  slice_ns=int(args.txn_ms * 1_000_000), **session_kwargs)
        sink, session, pacer = primary.sink, primary.session, primary.pacer
        if args.serve:
            _progress_lines(sink, primary.inputs)
        if args.metrics_port:
            from replayer.metrics import serve
            serve(args.metrics_port)
    if primary is not None:
        result = primary.run()      # closes its sink, inputs and pacer
    else:
        try:
            result = session.run()
        finally:
            sink.close()
    if isinstance(log, FileLog):
        log_bytes = log.path.stat().st_size
    elif log is not None:
        log_bytes = sink.bytes_published
        lat = sink.commit_latencies
        extra = {"commit_p50_ms": percentile_ms(lat, 0.5), "commit_p99_ms": percentile_ms(lat, 0.99),
                 "commits": len(lat), **_release_stats(sink)}
        if pacer:
            extra["paced_seconds"] = round(pacer.paused_s, 3)
    else:
        log_bytes = 0
    summary = {
        "mode": counter, "guest": guest.name, "instructions": result.instructions,
        "events": result.events, "events_by_kind": result.events_by_kind,
        "log_bytes": log_bytes, "seconds": round(result.seconds, 3),
        "instructions_per_second": round(result.instructions / max(result.seconds, 1e-9)),
        "state_hash": result.state_hash, "outputs_sha256": result.outputs_sha256,
        "outputs": result.outputs, "reason": result.reason, "exit_code": result.exit_code,
        "snapshots": result.snapshots, "counter_why": why, **extra,
    }
    verb = "recorded" if log else "ran"
    _emit(args, summary, f"kvmrr: {verb} {guest.name}: {result.instructions} instructions "
          f"({result.reason}) in {result.seconds:.2f}s with counter {counter}, "
          f"{result.events} events, state {result.state_hash}")
    return 0


def _release_stats(sink) -> dict:
    """Output commit (DESIGN §5): responses released and how long each was held."""
    if not sink.serving:
        return {}
    lat = sink.output_latencies
    return {"commit_policy": str(sink.policy), "responses_released": sink.outputs_released,
            "output_commit_p50_ms": percentile_ms(lat, 0.5),
            "output_commit_p99_ms": percentile_ms(lat, 0.99)}


def _progress_lines(sink, inputs, every_s: float = 1.0) -> None:
    """A serving primary says every second, as a JSON line on stderr, what it released:
    an operator (or `make run`) sees it even if the process is killed later."""
    import threading
    import time

    def loop() -> None:
        while True:
            time.sleep(every_s)
            line = {"event": "serving", "inputs_consumed": inputs.consumed,
                    "next_input_offset": inputs.next_offset, **_release_stats(sink)}
            print(json.dumps(line, sort_keys=True), file=sys.stderr, flush=True)
    threading.Thread(target=loop, name="kvmrr-progress", daemon=True).start()


def _policy(text: str):
    from recorder.service import CommitPolicy
    try:
        return CommitPolicy.parse(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


class _NoSink:
    """A plain run records nothing."""

    def write(self, record: dict) -> None:
        pass

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass


def cmd_record(args) -> int:
    return cmd_run(args, log=parse_log_url(args.log))


def _replay_summary(counter, header, result, log_bytes) -> dict:
    return {
        "mode": counter, "guest": header["guest_name"], "instructions": result.icount,
        "start_icount": result.start_icount, "events": result.events,
        "events_by_kind": result.events_by_kind, "log_bytes": log_bytes,
        "seconds": round(result.seconds, 3),
        "instructions_per_second": round((result.icount - result.start_icount)
                                         / max(result.seconds, 1e-9)),
        "state_hash": result.state_hash, "outputs_sha256": result.outputs_sha256,
        "outputs": result.outputs, "verified": result.finished,
        "outputs_verified": result.verified_outputs, "stopped_at": result.icount,
    }


def _report_replay(args, counter, header, result, log_bytes, verb="replayed") -> int:
    summary = _replay_summary(counter, header, result, log_bytes)
    if getattr(args, "dump", None) == "regs":
        summary["regs"] = {k: f"{v:#018x}" for k, v in result.regs.items()}
        if not args.json:
            print(f"registers at icount {result.icount}:")
            for k, v in result.regs.items():
                print(f"  {k:<7} {v:#018x}")
    what = ("verified against the record" if result.finished
            else f"stopped at icount {result.icount}")
    _emit(args, summary, f"kvmrr: {verb} {header['guest_name']} with counter {counter}: "
          f"{result.icount} instructions, {what}; state {result.state_hash}")
    return 0


def cmd_replay(args) -> int:
    log = parse_log_url(args.log)
    counter, why = resolve_counter(args.mode)
    guest = load_guest(args.guest) if args.guest else None
    on_output = _console(args.quiet, args.json)
    if isinstance(log, FileLog):
        header, records = read_archive(log.path)
        result = replay_records(header, records, counter=counter, guest=guest,
                                until=args.until, start=args.start, on_output=on_output)
        return _report_replay(args, counter, header, result, log.path.stat().st_size)
    from replayer.follow import Follower
    f = Follower(log.bootstrap, log.vm_id, counter=counter, backup_id=None,
                 start=args.start, until=args.until, guest=guest, on_output=on_output)
    result = f.run(finished_log=True, idle_timeout=None)
    return _report_replay(args, counter, f.header, result, 0)


def cmd_follow(args) -> int:
    log = parse_log_url(args.log)
    if isinstance(log, FileLog):
        raise UsageError("follow reads a live log: --log kafka://HOST:PORT/VM")
    from kvmrr.logsetup import configure
    from replayer import metrics
    from replayer.follow import Follower
    configure()
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    counter, why = resolve_counter(args.mode)
    f = Follower(log.bootstrap, log.vm_id, counter=counter, backup_id=args.backup_id,
                 start=args.start, guest=load_guest(args.guest) if args.guest else None,
                 on_output=_console(args.quiet, args.json), wait=args.idle_timeout)
    if not args.failover_timeout:
        result = f.run(finished_log=False, idle_timeout=args.idle_timeout)
        return _report_replay(args, counter, f.header, result, 0, verb="followed")
    result, primary = f.follow_or_take_over(
        failover_timeout=args.failover_timeout, give_up_after=args.idle_timeout,
        serve=args.serve, policy=_policy(args.commit),
        max_instructions=args.max_instructions,
        checksum_every=args.checksum_every, snapshot_every=args.snapshot_every,
        heartbeat_every_ns=args.heartbeat_ms * 1_000_000,
        slice_ns=int(args.txn_ms * 1_000_000), max_backup_lag_ms=args.max_backup_lag_ms)
    if primary is None:
        return _report_replay(args, counter, f.header, result, 0, verb="followed")
    summary = {"took_over": True, "takeover_icount": result.icount,
               "instructions": primary.instructions, "state_hash": primary.state_hash,
               "outputs_sha256": primary.outputs_sha256, "reason": primary.reason,
               "events": primary.events, "mode": counter, "seconds": round(primary.seconds, 3),
               **_release_stats(f.primary_sink)}
    _emit(args, summary, f"kvmrr: backup {args.backup_id} took over at icount {result.icount} "
          f"and recorded to {primary.instructions}; state {primary.state_hash}")
    return 0


def cmd_gateway(args) -> int:
    import asyncio

    from kvmrr.gateway import Gateway
    from kvmrr.logsetup import configure
    log = parse_log_url(args.log)
    if isinstance(log, FileLog):
        raise UsageError("the gateway serves a VM on Kafka: --log kafka://HOST:PORT/VM")
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--listen {args.listen!r}: use HOST:PORT")
    configure()
    gw = Gateway(log.bootstrap, log.vm_id)

    def ready(bound: int) -> None:
        print(f"kvmrr gateway: listening on {host}:{bound} for VM {log.vm_id}", flush=True)
    try:
        asyncio.run(gw.serve(host, int(port), ready))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_archive(args) -> int:
    log = parse_log_url(args.log)
    if isinstance(log, FileLog):
        raise UsageError("archive exports a log on Kafka: --log kafka://HOST:PORT/VM")
    from replayer.archive import export_archive
    info = export_archive(log.bootstrap, log.vm_id, Path(args.output), start=args.start)
    if args.json:
        print(json.dumps(info, sort_keys=True))
    else:
        print(f"kvmrr: archived {info['batches']} batches ({info['events']} events) from "
              f"icount {info['start_icount']} to {args.output}", file=sys.stderr)
    return 0


def cmd_inspect(args) -> int:
    log = _file_only(args.log)
    header, records = read_archive(log.path)
    kinds: Counter[str] = Counter()
    snapshots, batches, last_icount = [], 0, 0
    events_out = []
    for rec in records:
        if rec["kind"] == "Snapshot":
            snapshots.append({"icount": rec["icount"], "next_seq": rec["next_seq"],
                              "bytes": len(rec["blob"]), "state_hash": rec["state_hash"]})
        elif rec["kind"] == "EventBatch":
            batches += 1
            for i, ev in enumerate(rec["events"]):
                kinds[ev["kind"]] += 1
                last_icount = ev["icount"]
                if args.events:
                    shown = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in ev.items()}
                    shown["seq"] = rec["first_seq"] + i
                    events_out.append(shown)
    hdr = {k: v for k, v in header.items() if k != "kind"}
    summary = {"header": hdr, "snapshots": snapshots, "batches": batches,
               "events_by_kind": dict(kinds), "events": sum(kinds.values()),
               "last_icount": last_icount, "log_bytes": log.path.stat().st_size}
    if args.json:
        if args.events:
            summary["event_list"] = events_out
        print(json.dumps(summary, sort_keys=True))
        return 0
    print(f"{log.path}: guest {header['guest_name']} (sha256 {header['guest_sha256'][:16]}…), "
          f"vm {header['vm_id']}, counter {header['counter']}")
    print(f"  icount: {header['icount_semantics']}")
    print(f"  {len(snapshots)} snapshot(s) at icount "
          f"{', '.join(str(s['icount']) for s in snapshots)}; {batches} batches; "
          f"last icount {last_icount}")
    for k, n in sorted(kinds.items()):
        print(f"  {k:<10} {n}")
    for ev in events_out:
        print("  " + json.dumps(ev, sort_keys=True))
    return 0


def cmd_demo(args) -> int:
    from kvmrr.demo import run_demo
    return run_demo(args)


def _guest_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default="auto", choices=("auto", "fast", "step"),
                   help="instruction counter (auto: the best exact one here)")
    p.add_argument("--max-instructions", type=int, default=None, metavar="N")
    p.add_argument("--seconds", type=float, default=None, metavar="S",
                   help="stop after S seconds of wall-clock time")
    p.add_argument("--bootargs", default="", help="key=value ... passed to the guest")
    p.add_argument("--vm", default="vm0", help="VM id")
    p.add_argument("--load", type=float, default=None, metavar="RATE",
                   help="built-in kvstore client: requests/s (default 200 for kvstore)")
    p.add_argument("--seed", type=int, default=1, help="seed of the built-in client")
    p.add_argument("--checksum-every", type=int, default=1_000_000, metavar="N")
    p.add_argument("--snapshot-every", type=int, default=0, metavar="N",
                   help="also snapshot every N instructions")
    p.add_argument("--compression", default="deflate", choices=("deflate", "null"))
    p.add_argument("--heartbeat-ms", type=int, default=100,
                   help="kafka logs: a heartbeat every this many ms")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="kafka logs: Prometheus on 127.0.0.1:PORT")
    _service_opts(p)
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--quiet", action="store_true", help="do not show the guest console")


def _service_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--txn-ms", type=float, default=10.0, metavar="MS",
                   help="kafka logs: the vCPU hands what it logged to the publisher every MS "
                        "ms (a slice with output is written at once, idle ones together)")
    p.add_argument("--serve", action="store_true",
                   help="kafka logs: take requests from kvmrr.<vm>.in and release responses "
                        "to kvmrr.<vm>.out (as the new primary, for a backup)")
    p.add_argument("--commit", default="log", metavar="POLICY",
                   help="when a response may leave: 'log' (its log is committed) or "
                        "'backups:N' (and N backups acked receiving it)")
    p.add_argument("--max-backup-lag-ms", type=float, default=DEFAULT_MAX_LAG_MS, metavar="MS",
                   help="kafka logs: slow the guest down while the most advanced backup "
                        "is more than MS ms of its progress behind (0: never)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvmrr", description=__doc__)
    sub = ap.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("run", help="run a guest, recording nothing")
    p.add_argument("guest", help="hello, ticks, kvstore or a path to an ELF")
    _guest_opts(p)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("record", help="run a guest and record its log")
    p.add_argument("guest")
    p.add_argument("--log", required=True, help="file:PATH.avro or kafka://HOST:PORT/VM")
    _guest_opts(p)
    p.set_defaults(fn=cmd_record)
    p = sub.add_parser("replay", help="replay a log and verify it against the record")
    p.add_argument("--log", required=True, help="file:PATH.avro or kafka://HOST:PORT/VM")
    p.add_argument("--mode", default="auto", choices=("auto", "fast", "step"))
    p.add_argument("--until", type=int, default=None, metavar="ICOUNT",
                   help="stop exactly at this instruction count")
    p.add_argument("--dump", choices=("regs",), default=None)
    p.add_argument("--start", choices=("first", "latest"), default="first",
                   help="snapshot to start from (latest: the last one before --until)")
    p.add_argument("--guest", default=None, help="guest image to use instead of the built-in")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_replay)
    p = sub.add_parser("follow", help="a backup: follow a live log on Kafka and replay it")
    p.add_argument("--log", required=True, help="kafka://HOST:PORT/VM")
    p.add_argument("--backup-id", required=True)
    p.add_argument("--mode", default="auto", choices=("auto", "fast", "step"))
    p.add_argument("--start", choices=("first", "latest"), default="latest")
    p.add_argument("--idle-timeout", type=float, default=30.0, metavar="S",
                   help="give up after S seconds without a new record")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus on 127.0.0.1:PORT")
    p.add_argument("--failover-timeout", type=float, default=0.0, metavar="S",
                   help="take over when the primary is silent for S seconds (0: never)")
    p.add_argument("--max-instructions", type=int, default=None, metavar="N",
                   help="as the new primary: stop at N")
    p.add_argument("--checksum-every", type=int, default=1_000_000, metavar="N")
    p.add_argument("--snapshot-every", type=int, default=0, metavar="N")
    p.add_argument("--heartbeat-ms", type=int, default=100)
    _service_opts(p)
    p.add_argument("--guest", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_follow)
    p = sub.add_parser("gateway", help="TCP clients in front of a served VM: one request "
                                       "per line, one response per request")
    p.add_argument("--log", required=True, help="kafka://HOST:PORT/VM")
    p.add_argument("--listen", default="127.0.0.1:7070", help="HOST:PORT (port 0: any)")
    p.set_defaults(fn=cmd_gateway)
    p = sub.add_parser("archive", help="export a log on Kafka to an Avro archive")
    p.add_argument("--log", required=True, help="kafka://HOST:PORT/VM")
    p.add_argument("-o", "--output", required=True, help="PATH.avro")
    p.add_argument("--start", choices=("first", "latest"), default="first")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_archive)
    p = sub.add_parser("inspect", help="show a log's header and event counts")
    p.add_argument("log", help="file:PATH.avro")
    p.add_argument("--events", action="store_true", help="list the events themselves")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="(accepted for symmetry)")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("demo", help="the main job (make run)")
    p.add_argument("--workdir", default="build/demo")
    p.add_argument("--compose", default=None, metavar="ENV_FILE",
                   help="run it against the docker-compose cluster configured by ENV_FILE "
                        "(compose/.env; make compose-demo)")
    p.set_defaults(fn=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except FencedError as exc:
        print(f"kvmrr: {exc}", file=sys.stderr)
        return EXIT_FENCED
    except DivergenceError as exc:
        print(exc.report, file=sys.stderr)
        print(f"kvmrr: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except (KvmrrError, ReplayError, LogFormatError, LogUrlError, UsageError, KafkaLogError,
            OSError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"kvmrr: error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("kvmrr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
