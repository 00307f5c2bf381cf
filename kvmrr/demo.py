"""`make run`: the fault-tolerance demo, end to end on an embedded single-node Kafka.

A primary runs kvstore, serving requests from kvmrr.<vm>.in; two backups follow its log;
the gateway puts a client load in front.  A few seconds in, the primary is killed with
SIGKILL; one backup takes over while the client goes on.  At the end the client checks
what it got, the store is read back, the guest is told to QUIT, and the whole log is
replayed offline against the survivor's final state.  A human summary, then one JSON line.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from libkvmrr import best_counter
from kvmrr.client import KvClient
from kvmrr.kafkalog import ensure_topics
from kvmrr.localkafka import LocalKafka, LocalKafkaError
from kvmrr.logstats import log_bytes, released_seqs

REPO = Path(__file__).resolve().parent.parent
RATE_HZ = 100.0          # client requests/s
BEFORE_KILL_S = 5.0
AFTER_KILL_S = 6.0
FAILOVER_TIMEOUT_S = 1.0


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Node:
    """A kvmrr process of the demo; its stderr JSON lines are watched and logged."""

    def __init__(self, name: str, args: list[str], workdir: Path, watch=()):
        self.name = name
        self.stderr_path = workdir / f"{name}.stderr"
        self.proc = subprocess.Popen([sys.executable, "-m", "kvmrr.cli", *args], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[dict] = []
        self.watch = watch
        self.first_stdout = threading.Event()
        self.stdout: list[str] = []
        threading.Thread(target=self._err, daemon=True).start()
        threading.Thread(target=self._out, daemon=True).start()

    def _err(self) -> None:
        with open(self.stderr_path, "w") as f:
            for raw in self.proc.stderr:
                f.write(raw)
                f.flush()
                try:
                    line = json.loads(raw)
                except ValueError:
                    if raw.startswith("kvmrr"):
                        say(f"{self.name}: {raw.strip()}")
                    continue
                if not isinstance(line, dict):
                    continue
                self.lines.append(line)
                if line.get("event") in self.watch:
                    extra = {k: v for k, v in line.items()
                             if k not in ("event", "timestamp", "level", "vm_id", "role")}
                    say(f"{self.name}: {line['event']} {extra}")

    def _out(self) -> None:
        for raw in self.proc.stdout:
            self.stdout.append(raw)
            self.first_stdout.set()

    def last(self, event: str) -> dict | None:
        found = [ln for ln in self.lines if ln.get("event") == event]
        return found[-1] if found else None

    def result(self) -> dict | None:
        for raw in reversed(self.stdout):
            try:
                return json.loads(raw)
            except ValueError:
                continue
        return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def run_demo(args) -> int:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    counter, why = best_counter()
    say(f"kvmrr demo: counter {counter} ({why})")
    try:
        with LocalKafka(1, f"demo-{os.getpid()}", say=say) as kafka:
            summary = _demo(kafka.bootstrap, counter, work)
    except (LocalKafkaError, TimeoutError) as exc:
        say(f"kvmrr demo: FAILED: {exc}")
        return 1
    ok = (summary["lost"] == 0 and summary["duplicated"] == 0 and summary["state_match"]
          and summary["store_mismatches"] == 0 and summary["took_over"])
    say("kvmrr demo: " + ("the service survived its primary: nothing lost, nothing twice, "
                          "state verified" if ok else "FAILED"))
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 0 if ok else 1


def _demo(bootstrap: str, counter: str, work: Path) -> dict:
    vm = f"demo{uuid.uuid4().hex[:6]}"
    url = f"kafka://{bootstrap}/{vm}"
    ensure_topics(bootstrap, vm)
    say(f"VM {vm}: topics kvmrr.{vm}.{{log,snapshots,acks,in,out,succession}}")
    nodes: list[Node] = []
    try:
        primary = Node("primary", ["record", "kvstore", "--log", url, "--serve",
                                   "--mode", counter, "--snapshot-every", "2000000",
                                   "--json", "--quiet"], work, watch=())
        nodes.append(primary)
        backups = []
        for b in ("b1", "b2"):
            backups.append(Node(b, ["follow", "--log", url, "--backup-id", b, "--serve",
                                    "--mode", counter, "--failover-timeout",
                                    str(FAILOVER_TIMEOUT_S), "--start", "first",
                                    "--idle-timeout", "60", "--json", "--quiet"], work,
                                watch=("reading", "primary silent, taking over", "live",
                                       "done as primary")))
        nodes += backups
        gateway = Node("gateway", ["gateway", "--log", url, "--listen", "127.0.0.1:0"], work)
        nodes.append(gateway)
        _wait(gateway.first_stdout.is_set, 60, "the gateway")
        port = int(gateway.stdout[0].strip().rsplit(":", 1)[1].split()[0])
        say(f"primary pid {primary.proc.pid}, backups pids "
            f"{[b.proc.pid for b in backups]}, gateway on 127.0.0.1:{port}")
        _wait(lambda: all(b.last("reading") for b in backups), 90, "the backups to start")

        client = KvClient("127.0.0.1", port, name="c1", seed=7)
        say(f"client: {RATE_HZ:.0f} requests/s through the gateway")
        t0 = time.monotonic()

        def progress():
            if time.monotonic() - progress.last >= 1.0:
                progress.last = time.monotonic()
                r = client.report()
                say(f"client: {r.requests} sent, {r.answered} answered")
        progress.last = time.monotonic()
        client.run(RATE_HZ, BEFORE_KILL_S, on_tick=progress)
        served = primary.last("serving") or {}
        say(f"SIGKILL primary (pid {primary.proc.pid}) after {time.monotonic() - t0:.1f} s")
        t_kill = time.monotonic()
        primary.kill()
        client.run(RATE_HZ, AFTER_KILL_S, on_tick=progress)
        drained = client.drain(30)
        say(f"client: every request answered: {drained}")
        first_new = client.first_answer_sent_after(t_kill)
        failover_s = round(first_new - t_kill, 3) if first_new else None
        say(f"failover: first response to a request sent after the kill came "
            f"{failover_s} s after it")
        checked, bad = client.check_store()
        say(f"store: {checked} keys read back, {len(bad)} differ from the acknowledged "
            f"writes" + (f": {bad[:3]}" if bad else ""))
        report = client.report()
        client.request("QUIT")
        client.close()
        say("QUIT sent: the guest exits, the survivors finish the log")
        for b in backups:
            b.proc.wait(120)
        results = {b.name: b.result() for b in backups}
        winner = [n for n, r in results.items() if r and r.get("took_over")]
        say(f"backups: {results}")
        rep = subprocess.run([sys.executable, "-m", "kvmrr.cli", "replay", "--log", url,
                              "--start", "first", "--mode", counter, "--json", "--quiet"],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
        replay = json.loads(rep.stdout.strip().splitlines()[-1]) if rep.returncode == 0 else {}
        if rep.returncode != 0:
            say(f"offline replay failed: {rep.stderr.strip()[-500:]}")
        hashes = {n: r.get("state_hash") for n, r in results.items() if r}
        state_match = bool(replay) and len(hashes) == 2 and \
            all(h == replay["state_hash"] for h in hashes.values())
        say(f"offline replay of the whole log from icount 0: state {replay.get('state_hash')}"
            f"; survivors {hashes}: {'match' if state_match else 'MISMATCH'}")
        seqs = released_seqs(bootstrap, vm)
        new = results[winner[0]] if winner else {}
        return {
            "vm": vm, "counter": counter,
            "requests": report.requests, "answered": report.answered, "lost": report.lost,
            "duplicated": report.duplicated + (len(seqs) - len(set(seqs))),
            "client_errors": report.errors, "reconnects": report.reconnects,
            "store_checked": checked, "store_mismatches": len(bad),
            "took_over": len(winner) == 1, "winner": winner[0] if winner else None,
            "failover_seconds": failover_s,
            "commit_p50_ms": new.get("output_commit_p50_ms"),
            "commit_p99_ms": new.get("output_commit_p99_ms"),
            "commit_before_kill_p50_ms": served.get("output_commit_p50_ms"),
            "commit_before_kill_p99_ms": served.get("output_commit_p99_ms"),
            "latency_p50_ms": report.latency_p50_ms, "latency_p99_ms": report.latency_p99_ms,
            "responses_released": len(seqs), "log_bytes": log_bytes(bootstrap, vm),
            "state_match": state_match, "state_hash": replay.get("state_hash"),
        }
    finally:
        for n in nodes:
            n.kill()
