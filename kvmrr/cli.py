"""The `kvmrr` command: one verb per job, thin over the library (rr's shape)."""
from __future__ import annotations

import argparse
import json
import os
import math
import re
import sys
from collections import Counter
from pathlib import Path

from libkvmrr import KvmrrError, resolve_counter
from kvmrr.logsetup import configure as configure_logging
from kvmrr_log import events
from kvmrr_log.guest_images import LINUX_CMDLINE, carried_image, load_guest
from kvmrr_log.percentiles import percentile_ms
from kvmrr_log.kafka import FencedError, KafkaLogError
from kvmrr_log.kafka_config import KafkaConfigError
from kvmrr_log.urls import FileLog, LogUrlError, parse_log_url
from kvmrr.gateway import Limits
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


# -- option values: every one range-checked at parse time (exit 2, one line) --------------
MAX_ICOUNT = 1 << 62          # instruction counts: the core's are 64-bit
LEGAL_ID = re.compile(r"[A-Za-z0-9._-]+")   # Kafka's topic characters (VM and backup ids)
VM_ID_MAX = 200               # kvmrr.<vm>.succession within Kafka's 249
BACKUP_ID_MAX = 64


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line, `kvmrr: error: ...`, exit 2."""

    def error(self, message: str):
        first = message.splitlines()[0] if message else "bad arguments"
        self.exit(EXIT_BAD_INPUT, f"kvmrr: error: {first} (see {self.prog} --help)\n")


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _fmt(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n >= 1 << 32 and n & (n - 1) == 0 else str(n)


def _count(lo: int, hi: int, *, zero: str | None = None):
    """A whole number in lo..hi (1e6 is accepted as 1000000); zero: what 0 means, when 0
    is allowed besides lo..hi."""
    def parse(text: str) -> int:
        t = text.strip()
        try:
            value = int(t, 10)
        except ValueError:
            f = _number(t)
            if f != int(f):
                raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
            value = int(f)
        if value == 0 and zero is not None:
            return 0
        if not lo <= value <= hi:
            also = f", or 0 for {zero}" if zero is not None else ""
            raise argparse.ArgumentTypeError(f"{text} is out of range {lo}..{_fmt(hi)}"
                                             f"{also}")
        return value
    return parse


def _real(lo: float, hi: float, *, above: bool = False):
    """A finite number in lo..hi (above: lo itself excluded)."""
    def parse(text: str) -> float:
        value = _number(text)
        if value < lo or (above and value == lo) or value > hi:
            low = f"above {lo:g}" if above else f"at least {lo:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: {low} and at most "
                                             f"{hi:g}")
        return value
    return parse


def _ident(what: str, max_len: int):
    def parse(text: str) -> str:
        if not text or len(text) > max_len or not LEGAL_ID.fullmatch(text):
            raise argparse.ArgumentTypeError(
                f"{what} {text!r} must be 1..{max_len} characters of A-Z a-z 0-9 . _ -")
        return text
    return parse


def _nonempty(what: str, max_len: int = 4096):
    def parse(text: str) -> str:
        if not text.strip() or len(text) > max_len or "\0" in text:
            raise argparse.ArgumentTypeError(f"{what} {text!r} must be 1..{max_len} "
                                             "characters")
        return text
    return parse


def _readable_file(what: str):
    """A file that exists and can be read, checked before a verb starts (and logs)."""
    def parse(text: str) -> str:
        path = _nonempty(what)(text)
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise argparse.ArgumentTypeError(f"{what} {text!r} is not a readable file")
        return path
    return parse


def _listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: use HOST:PORT, PORT 0..65535")
    return host.strip("[]"), int(port)


def _commit(text: str) -> str:
    from recorder.service import CommitPolicy
    try:
        policy = CommitPolicy.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if policy.backups > 16:
        raise argparse.ArgumentTypeError(f"{text!r}: at most backups:16")
    return text


PORT = _count(1, 65535, zero="none")


def _console(quiet: bool, to_stderr: bool):
    out = sys.stderr if to_stderr else sys.stdout

    def show(ev: dict) -> None:
        if ev["channel"] == 0 and not quiet:
            out.write(ev["data"].decode("utf-8", "replace"))
            out.flush()
    return show


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
    guest = load_guest(args.guest, "pc" if args.cmdline is not None else None)
    bootargs = args.bootargs
    if guest.machine == "pc":
        if bootargs:
            raise KvmrrError("--bootargs is for kvmrr's own guests; a Linux guest takes "
                             "--cmdline")
        bootargs = LINUX_CMDLINE if args.cmdline is None else args.cmdline
    counter, why = resolve_counter(args.mode)
    session_kwargs = dict(counter=counter, vm_id=args.vm, bootargs=bootargs,
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
            _progress_lines(sink, primary.inputs, log.vm_id)
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
    """Output commit (docs/ARCHITECTURE.md §5): responses released and how long each was
    held."""
    if not sink.serving:
        return {}
    lat = sink.output_latencies
    return {"commit_policy": str(sink.policy), "responses_released": sink.outputs_released,
            "output_commit_p50_ms": percentile_ms(lat, 0.5),
            "output_commit_p99_ms": percentile_ms(lat, 0.99)}


def _progress_lines(sink, inputs, vm: str, every_s: float = 1.0) -> None:
    """A serving primary logs every second what it released (event `serving`): an
    operator (or `make run`) sees it even if the process is killed later."""
    import threading
    import time

    import structlog
    log = structlog.get_logger().bind(vm_id=vm, role="primary")

    def loop() -> None:
        while True:
            time.sleep(every_s)
            log.info(events.SERVING, inputs_consumed=inputs.consumed,
                     inputs_forged=inputs.forged, next_input_offset=inputs.next_offset,
                     **_release_stats(sink))
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
    if args.gdb:
        return _serve_gdb(args)
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


def _serve_gdb(args) -> int:
    """replay --gdb HOST:PORT: the time-travel debugger (docs/debugging.md)."""
    from replayer.gdbstub import Timeline, load_log, serve
    host, port = args.gdb
    counter, _ = resolve_counter(args.mode)
    log = load_log(args.log)
    tl = Timeline(log.header, log.snapshot, log.events, log.end, counter=counter,
                  guest=load_guest(args.guest) if args.guest else None,
                  snapshot_every=args.snapshot_every)
    if args.until is not None:
        tl.goto(args.until)

    def ready(bound: int) -> None:
        print(f"kvmrr gdb: serving {tl.image.path} (icount {tl.begin} to {tl.end}) on "
              f"{host}:{bound}; now at icount {tl.icount}", flush=True)
    try:
        serve(tl, host, port, once=args.gdb_once, ready=ready)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_follow(args) -> int:
    log = parse_log_url(args.log)
    if isinstance(log, FileLog):
        raise UsageError("follow reads a live log: --log kafka://HOST:PORT/VM")
    from replayer import metrics
    from replayer.follow import Follower
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    counter, why = resolve_counter(args.mode)
    f = Follower(log.bootstrap, log.vm_id, counter=counter, backup_id=args.backup_id,
                 start=args.start, guest=load_guest(args.guest) if args.guest else None,
                 on_output=_console(args.quiet, args.json), wait=args.idle_timeout)
    if not args.failover_timeout:
        result = f.run(finished_log=False, idle_timeout=args.idle_timeout)
        return _report_replay(args, counter, f.header, result, 0, verb="followed")
    if f.header.get("counter") == "step" and counter != "step":
        # A `step` record may hold RDTSC/RDRAND/RDSEED, which a `fast` record only checks
        # for at icount 0 (docs/ARCHITECTURE.md §2.7): after a takeover they would run
        # unlogged, so a backup that may take over records as the log was recorded.
        raise UsageError(f"{log.vm_id}: the log was recorded with --mode step, so a backup "
                         f"that may take over must follow with --mode step, not {counter}")
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

    from kvmrr.gateway import DeclaredNames, Gateway, TokenFile
    log = parse_log_url(args.log)
    if isinstance(log, FileLog):
        raise UsageError("the gateway serves a VM on Kafka: --log kafka://HOST:PORT/VM")
    host, port = args.listen
    try:
        identity = TokenFile(args.tokens) if args.tokens else DeclaredNames()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    limits = Limits(max_clients=args.max_clients, idle_timeout_s=args.idle_timeout,
                    max_pending=args.max_pending, retry_window_s=args.retry_window,
                    max_answers=args.max_answers)
    _room_for_connections(limits.max_clients)
    tls = _server_tls(args.tls_cert) if args.tls_cert else None
    gw = Gateway(log.bootstrap, log.vm_id, limits=limits, identity=identity)

    def ready(bound: int) -> None:
        print(f"kvmrr gateway: listening on {host}:{bound} for VM {log.vm_id}"
              + (" (TLS)" if tls else ""), flush=True)
    try:
        asyncio.run(gw.serve(host, port, ready, tls))
    except KeyboardInterrupt:
        pass
    return 0


def _server_tls(pem: str):
    """The gateway's TLS context: PEM holds its key and certificate chain (`make secrets`
    writes build/secrets/gateway-tls.pem)."""
    import ssl
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(pem)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--tls-cert {pem}: {getattr(exc, 'strerror', None) or exc}") from None
    return ctx


def _room_for_connections(n: int) -> None:
    """Raise the soft limit on open files so that n connections (and Kafka's) fit."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            raise UsageError(f"--max-clients {n} needs {want} open files; the hard limit "
                             f"is {hard}")


def cmd_provision(args) -> int:
    """The admin's step on a secure Kafka: the VM's topics, principals and ACLs
    (kvmrr_log.kafka_acls; docs/operating.md §6.2)."""
    log = parse_log_url(args.log)
    if isinstance(log, FileLog):
        raise UsageError("provision is for a log on Kafka: --log kafka://HOST:PORT/VM")
    from kvmrr_log.kafka_acls import provision
    n = provision(log.bootstrap, log.vm_id)
    print(json.dumps({"vm": log.vm_id, "acls": n}))
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


def _inspect_log(args) -> str:
    """`inspect --log LOG`, or the older `inspect LOG`."""
    if args.log and args.log_arg and args.log != args.log_arg:
        raise UsageError(f"two logs given ({args.log_arg} and --log {args.log}): give one")
    url = args.log or args.log_arg
    if not url:
        raise UsageError("inspect needs a log: --log file:PATH.avro or kafka://HOST:PORT/VM")
    return url


def _kafka_records(log):
    """A log on Kafka as inspect reads it: its header, then its snapshots (what they are,
    not their memory), then its committed records up to the current end."""
    from kvmrr_log.kafka import topics
    from kvmrr_log.topic_reader import LogTopicReader, read_header
    header = read_header(log.bootstrap, log.vm_id)

    def records():
        for topic in (topics(log.vm_id).snapshots, topics(log.vm_id).log):
            reader = LogTopicReader(log.bootstrap, log.vm_id, topic)
            size = 0
            try:
                for rec, _ in reader.records(0):
                    if rec["kind"] != "Snapshot":
                        yield rec
                        continue
                    size = len(rec["blob"]) + (size if rec["chunk"] else 0)
                    if rec["chunk"] == rec["chunks"] - 1:
                        yield dict(rec, blob=b"", bytes=size)
            finally:
                reader.close()
    return header, records()


def cmd_inspect(args) -> int:
    url = _inspect_log(args)
    log = parse_log_url(url)
    if isinstance(log, FileLog):
        header, records = read_archive(log.path)
        name, size = str(log.path), log.path.stat().st_size
    else:
        header, records = _kafka_records(log)
        name, size = url, None
    kinds: Counter[str] = Counter()
    snapshots, batches, last_icount = [], 0, 0
    events_out = []
    for rec in records:
        if rec["kind"] == "Snapshot":
            snapshots.append({"icount": rec["icount"], "next_seq": rec["next_seq"],
                              "bytes": rec.get("bytes", len(rec["blob"])),
                              "state_hash": rec["state_hash"]})
        elif rec["kind"] == "EventBatch":
            batches += 1
            for i, ev in enumerate(rec["events"]):
                kinds[ev["kind"]] += 1
                last_icount = ev["icount"]
                if args.events:
                    shown = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in ev.items()}
                    shown["seq"] = rec["first_seq"] + i
                    events_out.append(shown)
    image = carried_image(header)
    hdr = {k: v for k, v in header.items()
           if k not in ("kind", "guest_image", "guest_image_deflated")}
    hdr["guest_image_bytes"] = len(image)
    summary = {"header": hdr, "snapshots": snapshots, "batches": batches,
               "events_by_kind": dict(kinds), "events": sum(kinds.values()),
               "last_icount": last_icount, "log_bytes": size}
    if args.json:
        if args.events:
            summary["event_list"] = events_out
        print(json.dumps(summary, sort_keys=True))
        return 0
    print(f"{name}: guest {header['guest_name']}, vm {header['vm_id']}, "
          f"counter {header['counter']}")
    carried = f"{len(image)} bytes carried in the log" if image else "not carried in the log"
    print(f"  image: {header['guest_name']} sha256 {header['guest_sha256']} ({carried})")
    if header.get("cpu_model"):
        print(f"  cpu: {header['cpu_model']}, host CPU {header.get('host_cpu', -1)}")
    if header.get("machine", "kvmrr") != "kvmrr":
        print(f"  machine: {header['machine']}, command line: {header['bootargs']}")
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


def _mode_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default="auto", choices=("auto", "fast", "step"),
                   help="instruction counter (auto: the best exact one here)")


def _output_opts(p: argparse.ArgumentParser, quiet_help: str = "do not show the guest console"
                 ) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--quiet", action="store_true", help=quiet_help)


def _record_opts(p: argparse.ArgumentParser) -> None:
    """What a recording takes, as a primary from the start or after a takeover."""
    p.add_argument("--max-instructions", type=_count(1, MAX_ICOUNT), default=None,
                   metavar="N", help="stop at N instructions")
    p.add_argument("--checksum-every", type=_count(1000, MAX_ICOUNT, zero="never"),
                   default=1_000_000, metavar="N",
                   help="a state checksum in the log every N instructions (0: never)")
    p.add_argument("--snapshot-every", type=_count(10_000, MAX_ICOUNT, zero="never"),
                   default=0, metavar="N",
                   help="also snapshot every N instructions (0: only at the start)")
    p.add_argument("--heartbeat-ms", type=_count(1, 60_000), default=100, metavar="MS",
                   help="kafka logs: a heartbeat every this many ms")
    p.add_argument("--txn-ms", type=_real(0.1, 60_000), default=10.0, metavar="MS",
                   help="kafka logs: the vCPU hands what it logged to the publisher every MS "
                        "ms (a slice with output is written at once, idle ones together)")
    p.add_argument("--serve", action="store_true",
                   help="kafka logs: take requests from kvmrr.<vm>.in and release responses "
                        "to kvmrr.<vm>.out (as the new primary, for a backup)")
    p.add_argument("--commit", type=_commit, default="log", metavar="POLICY",
                   help="when a response may leave: 'log' (its log is committed) or "
                        "'backups:N' (and N backups acked receiving it), N 1..16")
    p.add_argument("--max-backup-lag-ms", type=_real(0, 3_600_000), default=DEFAULT_MAX_LAG_MS,
                   metavar="MS",
                   help="kafka logs: slow the guest down while the most advanced backup "
                        "is more than MS ms of its progress behind (0: never)")
    p.add_argument("--metrics-port", type=PORT, default=0, metavar="PORT",
                   help="kafka logs: Prometheus on $KVMRR_METRICS_ADDR (default 127.0.0.1):PORT "
                        "(0: none)")


def _guest_opts(p: argparse.ArgumentParser) -> None:
    _mode_opt(p)
    p.add_argument("--seconds", type=_real(0, 10_000_000, above=True), default=None,
                   metavar="S", help="stop after S seconds of wall-clock time")
    p.add_argument("--bootargs", default="", help="key=value ... passed to the guest")
    p.add_argument("--cmdline", type=_nonempty("cmdline", 2047), default=None,
                   help="boot the guest as a Linux vmlinux on the PC machine with this "
                        "kernel command line (default for `linux`: docs/guests.md)")
    p.add_argument("--vm", type=_ident("VM id", VM_ID_MAX), default="vm0", help="VM id")
    p.add_argument("--load", type=_real(0, 100_000), default=None, metavar="RATE",
                   help="built-in kvstore client: requests/s, at most 100000 (default 200 "
                        "for kvstore; 0: none)")
    p.add_argument("--seed", type=_count(0, 1 << 62), default=1,
                   help="seed of the built-in client")
    p.add_argument("--compression", default="deflate", choices=("deflate", "null"))
    _record_opts(p)
    _output_opts(p)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="kvmrr", description=__doc__)
    sub = ap.add_subparsers(dest="verb", required=True)
    guest = _nonempty("guest")
    log_url = _nonempty("log")
    p = sub.add_parser("run", help="run a guest, recording nothing")
    p.add_argument("guest", type=guest, help="hello, ticks, kvstore, linux or a path to an ELF")
    _guest_opts(p)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("record", help="run a guest and record its log")
    p.add_argument("guest", type=guest)
    p.add_argument("--log", type=log_url, required=True,
                   help="file:PATH.avro or kafka://HOST:PORT/VM")
    _guest_opts(p)
    p.set_defaults(fn=cmd_record)
    p = sub.add_parser("replay", help="replay a log and verify it against the record")
    p.add_argument("--log", type=log_url, required=True,
                   help="file:PATH.avro or kafka://HOST:PORT/VM")
    _mode_opt(p)
    p.add_argument("--until", type=_count(0, MAX_ICOUNT), default=None, metavar="ICOUNT",
                   help="stop exactly at this instruction count")
    p.add_argument("--dump", choices=("regs",), default=None)
    p.add_argument("--start", choices=("first", "latest"), default="first",
                   help="snapshot to start from (latest: the last one before --until)")
    p.add_argument("--guest", type=guest, default=None,
                   help="guest image to use instead of the built-in")
    p.add_argument("--gdb", type=_listen, default=None, metavar="HOST:PORT",
                   help="serve gdb's remote protocol here, forwards and backwards "
                        "(docs/debugging.md); --until: where the session starts")
    p.add_argument("--snapshot-every", type=_count(1000, MAX_ICOUNT), default=None,
                   metavar="N", help="--gdb: snapshot automatically every N instructions "
                        "(default 10000 per 8 MiB of guest memory)")
    p.add_argument("--gdb-once", action="store_true",
                   help="--gdb: exit when the first gdb disconnects")
    _output_opts(p)
    p.set_defaults(fn=cmd_replay)
    p = sub.add_parser("follow", help="a backup: follow a live log on Kafka and replay it")
    p.add_argument("--log", type=log_url, required=True, help="kafka://HOST:PORT/VM")
    p.add_argument("--backup-id", type=_ident("backup id", BACKUP_ID_MAX), required=True)
    _mode_opt(p)
    p.add_argument("--start", choices=("first", "latest"), default="latest")
    p.add_argument("--idle-timeout", type=_real(0, 10_000_000, above=True), default=30.0,
                   metavar="S", help="give up after S seconds without a new record")
    p.add_argument("--failover-timeout", type=_real(0, 3600), default=0.0, metavar="S",
                   help="take over when the primary is silent for S seconds (0: never)")
    _record_opts(p)
    p.add_argument("--guest", type=guest, default=None)
    _output_opts(p)
    p.set_defaults(fn=cmd_follow)
    p = sub.add_parser("gateway", help="TCP clients in front of a served VM: one request "
                                       "per line, one response per request")
    p.add_argument("--log", type=log_url, required=True, help="kafka://HOST:PORT/VM")
    p.add_argument("--listen", type=_listen, default="127.0.0.1:7070",
                   help="HOST:PORT (port 0: any)")
    p.add_argument("--tokens", type=_nonempty("tokens file"), default=None, metavar="FILE",
                   help="clients must say HELLO <token>; FILE has '<name> <token>' lines, "
                        "mode 600 (without it: HELLO <name>, unauthenticated)")
    p.add_argument("--tls-cert", type=_nonempty("TLS certificate"), default=None,
                   metavar="PEM", help="serve clients over TLS with this key and "
                                       "certificate (build/secrets/gateway-tls.pem)")
    d = Limits()
    p.add_argument("--max-clients", type=_count(1, 100_000), default=d.max_clients,
                   metavar="N", help="open connections at most")
    p.add_argument("--idle-timeout", type=_real(0, 86_400, above=True),
                   default=d.idle_timeout_s, metavar="S",
                   help="close a connection silent for S seconds with nothing pending")
    p.add_argument("--max-pending", type=_count(1, 100_000), default=d.max_pending,
                   metavar="N", help="unanswered requests per connection at most")
    p.add_argument("--retry-window", type=_real(1, 7 * 86_400), default=d.retry_window_s,
                   metavar="S", help="a retry within S seconds gets the stored answer")
    p.add_argument("--max-answers", type=_count(1, 10_000_000), default=d.max_answers,
                   metavar="N", help="request ids and answers kept, at most N of each")
    p.set_defaults(fn=cmd_gateway)
    p = sub.add_parser("provision", help="as the admin of a secure Kafka: create a VM's "
                                         "topics, principals and ACLs")
    p.add_argument("--log", type=log_url, required=True, help="kafka://HOST:PORT/VM")
    p.set_defaults(fn=cmd_provision)
    p = sub.add_parser("archive", help="export a log on Kafka to an Avro archive")
    p.add_argument("--log", type=log_url, required=True, help="kafka://HOST:PORT/VM")
    p.add_argument("-o", "--output", type=_nonempty("output"), required=True,
                   help="PATH.avro")
    p.add_argument("--start", choices=("first", "latest"), default="first")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_archive)
    p = sub.add_parser("inspect", help="show a log's header and event counts")
    p.add_argument("log_arg", nargs="?", type=log_url, default=None, metavar="LOG",
                   help="the log, as --log (the older form)")
    p.add_argument("--log", type=log_url, default=None,
                   help="file:PATH.avro or kafka://HOST:PORT/VM")
    p.add_argument("--events", action="store_true", help="list the events themselves")
    _output_opts(p, quiet_help="(accepted for symmetry)")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("demo", help="the main job (make run)")
    p.add_argument("--workdir", type=_nonempty("workdir"), default="build/demo")
    p.add_argument("--compose", type=_readable_file("compose env file"), default=None,
                   metavar="ENV_FILE",
                   help="run it against the docker-compose cluster configured by ENV_FILE "
                        "(compose/.env; make compose-demo)")
    p.add_argument("--guest", choices=("kvstore", "linux"), default="kvstore",
                   help="kvstore: the service under a client load (make run); linux: the "
                        "Linux guest's boot recorded with step, its primary killed mid-boot "
                        "(make run-linux; needs make linux-guest).  Under step on Kafka the "
                        "whole boot takes most of an hour here, so the linux demo stops at "
                        "--max-instructions")
    p.add_argument("--max-instructions", type=_count(1, 10**12), default=2_500_000,
                   help="the linux demo's budget (default 2.5 M: about a minute here)")
    p.set_defaults(fn=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 a divergence, 3 fenced, 2 anything else that went wrong
    (always one line on stderr, never a traceback), 130 interrupted."""
    configure_logging()      # every verb logs structured events on stderr (kvmrr.logsetup)
    try:
        args = build_parser().parse_args(argv)
        return args.fn(args)
    except FencedError as exc:
        import structlog
        structlog.get_logger().error(events.FENCED, error=str(exc))
        print(f"kvmrr: {exc}", file=sys.stderr)
        if argv is None:
            # A program, not a call: stop at once.  Its Kafka clients may still hang on a
            # cut connection, and finalizing them at interpreter exit once ended a fenced
            # primary on a secure broker with SIGSEGV instead of exit 3 (the 20 fault
            # rounds, a `cut` round); a fenced recorder has nothing left to flush.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_FENCED)
        return EXIT_FENCED
    except DivergenceError as exc:
        print(exc.report, file=sys.stderr)
        print(f"kvmrr: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except (KvmrrError, ReplayError, LogFormatError, LogUrlError, UsageError, KafkaLogError,
            KafkaConfigError, OSError) as exc:
        print(f"kvmrr: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("kvmrr: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:      # a bug, or input nobody foresaw: still one line
        print(f"kvmrr: error: unexpected {type(exc).__name__}: {_one_line(exc)}",
              file=sys.stderr)
        return EXIT_BAD_INPUT


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
