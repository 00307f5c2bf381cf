"""A fault-tolerant kvstore service on loopback, as processes: a primary, backups, the
gateway, and a client.  `make run`, the fault-tolerance tests and `make bench-ft` script
their scenarios (kill the primary, stop it, kill a backup...) with it, and `finish()`
verifies the end the same way for all: QUIT the guest, let the survivors end the log, and
replay the whole log offline against their final states.

The nodes are local processes started here (start_primary, start_backup, start_gateway), or
containers started elsewhere (docker-compose, the container tests) and attached: a node
only needs a Popen-like process (harness.containers.ContainerProcess is one).

What a node did is read from its structured log events on stderr (JSON lines, matched by
their `event` field, names in kvmrr_log/events.py) and its `--json` summary on stdout,
never from message text.  With narrate=True the watched events of each node are logged
again (structlog) with the node's name: the demo's narration.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import structlog

from harness.client import KvClient
from harness.localkafka import provision_vm
from kvmrr_log.client_ids import declared_scope, scoped_request_id
from kvmrr_log import events
from kvmrr_log import kafka_config
from kvmrr_log.kafka import ensure_topics
from kvmrr_log.kafka_acls import gateway_principal, vm_principal
from harness.logstats import log_bytes, released_outputs, released_seqs
from kvmrr_log.paths import REPO
from kvmrr_log.requests import request_id


# what a backup's log says that the scenario's narration shows
BACKUP_EVENTS = events.BACKUP_EVENTS
PRIMARY_EVENTS = (events.FENCED,)
_LEVELS = ("debug", "info", "warning", "error", "critical")


def start_process(args: list[str], wrap=None, env: dict | None = None) -> subprocess.Popen:
    """`kvmrr ARGS` as a local process; wrap(cmd) -> cmd: how to start it (e.g. in a
    network namespace of its own); env: its environment (this one's by default)."""
    cmd = [sys.executable, "-m", "kvmrr.cli", *args]
    return subprocess.Popen(wrap(cmd) if wrap else cmd, cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Node:
    """A kvmrr process (or anything Popen-like: a container); its stderr is kept in a file,
    its structured log events (JSON lines) in .lines and anything else in .text.  log: a
    structlog logger to narrate the events named in `watch` with, or None."""

    def __init__(self, name: str, proc, workdir: Path, log=None, watch=()):
        self.name = name
        self.stderr_path = workdir / f"{name}.stderr"
        self.proc = proc
        self.lines: list[dict] = []
        self.text: list[str] = []
        self.log, self.watch = log, watch
        self.stdout: list[str] = []
        self._threads = [threading.Thread(target=self._err, daemon=True),
                         threading.Thread(target=self._out, daemon=True)]
        for t in self._threads:
            t.start()

    def _err(self) -> None:
        with open(self.stderr_path, "w") as f:
            for raw in self.proc.stderr:
                f.write(raw)
                f.flush()
                try:
                    line = json.loads(raw)
                except ValueError:
                    line = None
                if not isinstance(line, dict) or "event" not in line:
                    self.text.append(raw)
                    continue
                self.lines.append(line)
                if self.log and line["event"] in self.watch:
                    extra = {k: v for k, v in line.items() if k not in
                             ("event", "timestamp", "level", "vm_id", "role", "backup")}
                    level = line.get("level")
                    narrate = getattr(self.log, level if level in _LEVELS else "info")
                    narrate(line["event"], node=self.name, **extra)

    def _out(self) -> None:
        for raw in self.proc.stdout:
            self.stdout.append(raw)

    def last(self, event: str) -> dict | None:
        """The last log event of that name (kvmrr_log.events), or None."""
        found = self.all(event)
        return found[-1] if found else None

    def all(self, event: str) -> list[dict]:
        """Every log event of that name so far, in order."""
        return [ln for ln in list(self.lines) if ln.get("event") == event]

    def result(self) -> dict | None:
        """The JSON summary the process printed last on stdout."""
        for raw in reversed(self.stdout):
            try:
                return json.loads(raw)
            except ValueError:
                continue
        return None

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return rc

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


class FtCluster:
    def __init__(self, bootstrap: str, workdir: Path, *, counter: str = "auto",
                 commit: str = "log", failover_timeout: float = 1.0,
                 snapshot_every: int = 2_000_000, narrate: bool = False,
                 vm: str | None = None, txn_ms: float = 10.0,
                 secrets: Path | None = None):
        """secrets: a `kafkactl secrets` folder holding this VM's principals, for a secure
        Kafka (harness.localkafka.LocalKafka(secrets=...)): the VM is provisioned as the
        admin, the primary and backups sign in as vm-<vm>, the gateway as gateway-<vm>,
        and this harness reads as the admin (docs/operating.md §6)."""
        self.bootstrap = bootstrap
        self.vm = vm or f"ft{uuid.uuid4().hex[:8]}"
        self.url = f"kafka://{bootstrap}/{self.vm}"
        self.work = Path(workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.counter, self.commit = counter, commit
        self.failover_timeout = failover_timeout
        self.snapshot_every = snapshot_every
        self.txn_ms = txn_ms
        self.log = structlog.get_logger().bind(vm=self.vm) if narrate else None
        self.nodes: dict[str, Node] = {}
        self.primary: Node | None = None
        self.secrets = Path(secrets) if secrets else None
        if self.secrets:
            provision_vm(bootstrap, self.secrets, self.vm)   # its principals, if new
        else:
            ensure_topics(bootstrap, self.vm)

    def conf(self, principal: str) -> Path | None:
        """The principal's client config (KVMRR_KAFKA_CONFIG), None on a plain Kafka."""
        return self.secrets / f"{principal}.conf" if self.secrets else None

    def as_admin(self):
        return kafka_config.using(self.conf("admin"))

    def as_replica(self):
        """Signed in as the VM's replicas, whose record key checks the MACs: what the
        harness reads back (.out, the log) is judged as a backup would judge it (the
        admin holds no VM's key, and a keyed record read without one counts as forged)."""
        return kafka_config.using(self.conf(vm_principal(self.vm)))

    # -- the processes ----------------------------------------------------------------------
    def start_primary(self, wrap=None, extra: tuple[str, ...] = ()) -> Node:
        self.primary = self._node("primary", [
            "record", "kvstore", "--log", self.url, "--serve", "--commit", self.commit,
            "--mode", self.counter, "--snapshot-every", str(self.snapshot_every),
            "--txn-ms", str(self.txn_ms), "--json", "--quiet", *extra],
            watch=PRIMARY_EVENTS, wrap=wrap, principal=vm_principal(self.vm))
        return self.primary

    def start_backup(self, name: str, start: str = "first") -> Node:
        return self._node(name, [
            "follow", "--log", self.url, "--backup-id", name, "--serve", "--commit",
            self.commit, "--mode", self.counter, "--failover-timeout",
            str(self.failover_timeout), "--snapshot-every", str(self.snapshot_every),
            "--txn-ms", str(self.txn_ms), "--start", start, "--idle-timeout", "60", "--json", "--quiet"],
            watch=BACKUP_EVENTS, principal=vm_principal(self.vm))

    def start_gateway(self) -> int:
        gw = self._node("gateway", ["gateway", "--log", self.url, "--listen", "127.0.0.1:0"],
                        principal=gateway_principal(self.vm))
        wait_for(lambda: gw.last(events.LISTENING) or gw.proc.poll() is not None, 60,
                 "the gateway")
        listening = gw.last(events.LISTENING)
        if listening is None:
            # It exited: its last lines may still be in the pipe, so read them all first.
            gw.wait(10)
            listening = gw.last(events.LISTENING)
        if listening is None:
            raise RuntimeError(f"the gateway exited {gw.proc.poll()}: "
                               f"{''.join(gw.text[-4:]).strip()[-600:]}")
        self.gateway_port = int(listening["port"])
        return self.gateway_port

    def _node(self, name: str, args: list[str], watch=(), wrap=None,
              principal: str = "admin") -> Node:
        env = kafka_config.env_for(self.conf(principal)) if self.secrets else None
        return self.attach(name, start_process(args, wrap, env), watch)

    def attach(self, name: str, proc, watch=()) -> Node:
        """Take on a node started elsewhere (a container): `name` is "primary", "gateway"
        or a backup's id; `proc` is Popen-like."""
        node = Node(name, proc, self.work, log=self.log, watch=watch)
        self.nodes[name] = node
        if name == "primary":
            self.primary = node
        return node

    def backups(self) -> list[Node]:
        return [n for name, n in self.nodes.items() if name not in ("primary", "gateway")]

    def wait_backups_reading(self, timeout: float = 90) -> None:
        wait_for(lambda: all(b.last(events.READING) or b.proc.poll() is not None
                             for b in self.backups()), timeout, "the backups to start")

    def backups_following(self, max_lag_ms: float = 250.0, timeout: float = 10.0) -> bool:
        """Wait until every live backup says it follows within max_lag_ms of the primary
        (its `following` line, once a second): the catch-up of a start is over.  False if
        that did not come within timeout (a busy machine: the caller goes on anyway)."""
        def caught_up(b: Node) -> bool:
            line = b.last(events.FOLLOWING)
            return b.proc.poll() is not None or (line is not None
                                                 and line.get("lag_ms", 1e9) <= max_lag_ms)
        try:
            wait_for(lambda: all(caught_up(b) for b in self.backups()), timeout,
                     "the backups to follow")
            return True
        except TimeoutError:
            return False

    def until_serving(self, client: KvClient) -> dict:
        """Before a measured load: one request answered (a guest just started boots first,
        and that answer waits for it) and the backups caught up with the start (restoring
        its snapshot and replaying the boot take the CPUs the primary needs).  How long
        each took, as figures to report beside the load's (backups_caught_up_s None: not
        within 10 s, and the load starts anyway)."""
        t0 = time.monotonic()
        client.request("GET ready", timeout=60)
        t1 = time.monotonic()
        caught_up = self.backups_following()
        return {"first_answer_ms": round((t1 - t0) * 1000, 1),
                "backups_caught_up_s": round(time.monotonic() - t1, 2) if caught_up else None}

    def client(self, name: str = "c1", seed: int = 7) -> KvClient:
        return KvClient("127.0.0.1", self.gateway_port, name=name, seed=seed)

    def live_backup(self) -> Node | None:
        """The backup that announced it went live (took over), if any."""
        live = [b for b in self.backups() if b.last(events.LIVE)]
        return live[-1] if live else None

    def first_new_primary_answer(self, client: KvClient, t_kill: float) -> float | None:
        """Seconds from t_kill to the client's first answer released by the new primary: a
        response on .out with a seq above what was released when it went live."""
        live = self.live_backup()
        if live is None:
            return None
        released = live.last(events.LIVE)["released_seq"]
        with self.as_replica():
            outs = released_outputs(self.bootstrap, self.vm)
        new_ids = {request_id(o["data"]) for o in outs if o["seq"] > released}
        scope = declared_scope(client.name)     # the gateway's ids for this client's
        times = [a for rid, (_, a) in client.answer_times().items()
                 if scoped_request_id(scope, rid.encode()).decode() in new_ids]
        return round(min(times) - t_kill, 3) if times else None

    # -- the end ----------------------------------------------------------------------------
    def finish(self, client: KvClient, drain_s: float = 30.0) -> dict:
        """Drain the client, read the store back, QUIT, and verify: a dict of figures."""
        drained = client.drain(drain_s)
        checked, bad = client.check_store()
        report = client.report()
        client.request("QUIT", timeout=60)
        client.close()
        ends, stopped = {}, {}
        for node in self.backups() + ([self.primary] if self.primary else []):
            if node.proc.poll() is None or node.proc.returncode == 0:   # not killed
                try:
                    node.wait(180)
                except subprocess.TimeoutExpired:
                    node.kill()
                ends[node.name] = node.result()
            else:       # killed, fenced (3) or failed: why, for the verdict's message
                stopped[node.name] = {"rc": node.proc.returncode,
                                      "stderr": "".join(node.text[-4:]).strip()[-600:]}
        rep = subprocess.run([sys.executable, "-m", "kvmrr.cli", "replay", "--log", self.url,
                              "--start", "first", "--mode", self.counter, "--json",
                              "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=900,
                             env=kafka_config.env_for(self.conf(vm_principal(self.vm)))
                             if self.secrets else None)
        replay = json.loads(rep.stdout.strip().splitlines()[-1]) if rep.returncode == 0 else {}
        hashes = {n: r.get("state_hash") for n, r in ends.items() if r}
        with self.as_replica():
            seqs = released_seqs(self.bootstrap, self.vm)
            logged = log_bytes(self.bootstrap, self.vm)
        winners = [n for n, r in ends.items() if r and r.get("took_over")]
        new = ends[winners[0]] if winners else (ends.get("primary") or {})
        return {
            "vm": self.vm, "commit": self.commit, "drained": drained,
            "requests": report.requests, "answered": report.answered, "lost": report.lost,
            "duplicated": report.duplicated + (len(seqs) - len(set(seqs))),
            "duplicate_releases": len(seqs) - len(set(seqs)),
            "client_errors": report.errors, "reconnects": report.reconnects,
            "store_checked": checked, "store_mismatches": bad,
            "took_over": winners, "ends": ends, "stopped": stopped,
            "takeover_attempts": sum(len(b.all(events.TAKEOVER)) for b in self.backups()),
            "survivor_hashes": hashes, "replay": replay,
            "replay_error": rep.stderr.strip()[-800:] if rep.returncode else None,
            "state_match": bool(replay) and bool(hashes) and
            all(h == replay.get("state_hash") for h in hashes.values()),
            "commit_p50_ms": new.get("output_commit_p50_ms"),
            "commit_p99_ms": new.get("output_commit_p99_ms"),
            "latency_p50_ms": report.latency_p50_ms, "latency_p99_ms": report.latency_p99_ms,
            "responses_released": len(seqs), "log_bytes": logged,
        }

    def stop(self) -> None:
        for n in self.nodes.values():
            n.kill()

