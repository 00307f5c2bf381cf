"""The Linux guest on Kafka, its primary killed mid-boot (issue 13, item 5): the scenario
behind tests/test_linux_takeover.py and `kvmrr demo --guest linux`.

The primary records `linux` with step (the kernel reads the TSC: docs/guests.md §9); a
backup follows with step (a fast backup refuses to take over a step log).  Once the log
holds some of the boot's console, the primary is SIGKILLed; the backup takes over and
records on to the budget.  Then the whole log is replayed offline with fast, and the
console stream is checked at the seam: the old primary's valid part of the log followed by
the new primary's part is every output seq once, in order, and equals the replay's console.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time
from typing import Callable

from harness.ftcluster import start_process
from kvmrr_log import events


def log_console(bootstrap: str, vm: str) -> list[tuple[int, int, bytes]]:
    """The console Output events the VM's log validly holds so far, as (epoch, seq, data):
    read under the epoch rule, so an old primary's records after the seal never appear.
    [] before the log exists."""
    return log_progress(bootstrap, vm)[0]


def log_progress(bootstrap: str, vm: str) -> tuple[list[tuple[int, int, bytes]], int]:
    """log_console's list, and the highest icount the log's events reach (heartbeats
    included; -1 before the log exists)."""
    from kvmrr_log.kafka import KafkaLogError, topics
    from kvmrr_log.topic_reader import LogTopicReader
    out: list[tuple[int, int, bytes]] = []
    last = -1
    reader = LogTopicReader(bootstrap, vm, topics(vm).log)
    try:
        for rec, _ in reader.records(0):
            if rec["kind"] == "EventBatch":
                out += [(reader.epoch, ev["seq"], ev["data"]) for ev in rec["events"]
                        if ev["kind"] == "Output" and ev["channel"] == 0]
                last = max([last] + [ev["icount"] for ev in rec["events"]])
    except KafkaLogError:        # the topic does not exist yet: what was read so far
        pass
    finally:
        reader.close()
    return out, last


def _text(data: bytes) -> str:
    # the UART's lines end in \r\n; the processes' output is read as text (\n)
    return data.decode("utf-8", "replace").replace("\r\n", "\n")


def console_seam(outputs: list[tuple[int, int, bytes]], replayed: str,
                 old_printed: str) -> dict:
    """What the log's console says about the takeover: the old primary's lines (epoch 0)
    and the new one's (epoch 1), and whether each holds: every seq once and in order from
    0, the old part is what the old primary printed (a prefix: it may have printed lines it
    never committed), the two parts together equal the offline replay's console."""
    seqs = [seq for _, seq, _ in outputs]
    epochs = [e for e, _, _ in outputs]
    old = "".join(_text(d) for e, _, d in outputs if e == 0)
    new = "".join(_text(d) for e, _, d in outputs if e == 1)
    checks = {
        "seqs_once_in_order": seqs == list(range(len(seqs))),
        "two_epochs_in_order": epochs == sorted(epochs) and set(epochs) == {0, 1},
        "old_part_was_printed": old_printed.startswith(old),
        "equals_offline_replay": (old + new).splitlines() == replayed.splitlines()
        and old + new == replayed,
    }
    return {"console_lines_before": len(old.splitlines()),
            "console_lines_after": len(new.splitlines()),
            "no_gap_no_duplicate": all(checks.values()), "checks": checks,
            "old_lines": old.splitlines(), "new_lines": new.splitlines()}


def event_names(stderr: str) -> list[str]:
    """The structured log events on a kvmrr process's stderr, by name."""
    names = []
    for line in stderr.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and "event" in ev:
            names.append(ev["event"])
    return names


def console_of(stderr: str) -> str:
    """The guest console a kvmrr --json process printed on stderr, without its structured
    log events (one whole line each, as is every console Output of this guest)."""
    return "".join(ln for ln in stderr.splitlines(keepends=True) if not event_names(ln))


def run(bootstrap: str, vm: str, *, budget: int, kill_after_outputs: int = 3,
        kill_at_icount: int | None = None, failover_timeout: float = 3.0,
        start_timeout: float = 240, say: Callable[..., None] = lambda *a, **k: None) -> dict:
    """The scenario on the brokers at bootstrap, in the VM `vm`'s topics.  The kill comes
    soon after the log holds kill_after_outputs console lines: the boot prints its first
    11 lines between icount 132 k and 293 k (then none to 2.5 M), so with 3 the new
    primary prints several of them.  With kill_at_icount, it comes once the log's events
    reach that icount instead (later lines fall at icounts that move with the host's
    speed: the timer ticks by wall-clock time, and the boot calibrates against them).
    The summary:
    the backup's and the offline replay's JSON, the seam check, the figures; raises
    TimeoutError when the primary commits no console output in start_timeout s."""
    boot = bootstrap.split(",")[0]
    url = f"kafka://{boot}/{vm}"
    t0 = time.monotonic()
    # the backup shows the console it replays and then records on its stderr (--json)
    backup = start_process(["follow", "--log", url, "--backup-id", "b1", "--mode", "step",
                            "--start", "first", "--json",
                            "--failover-timeout", str(failover_timeout),
                            "--max-instructions", str(budget), "--idle-timeout", "120"])
    # no --json: the primary's console goes to its stdout, apart from its log events
    primary = start_process(["record", "linux", "--mode", "step", "--log", url,
                             "--max-instructions", str(budget)])
    say("linux_started", primary_pid=primary.pid, backup_pid=backup.pid, log=url,
        budget=budget)
    def due() -> bool:
        outputs, last = log_progress(boot, vm)
        if kill_at_icount is not None:
            return last >= kill_at_icount
        return len(outputs) >= kill_after_outputs
    try:
        while not due():
            if primary.poll() is not None:
                raise TimeoutError(f"the primary exited {primary.returncode}: "
                                   f"{primary.stderr.read()[-500:]}")
            if time.monotonic() - t0 > start_timeout:
                what = (f"a log to icount {kill_at_icount}" if kill_at_icount is not None
                        else f"{kill_after_outputs} console lines")
                raise TimeoutError(f"the primary committed {what} not within "
                                   f"{start_timeout:.0f} s")
            time.sleep(0.3 if kill_at_icount is None else 2.0)
        primary.send_signal(signal.SIGKILL)
        primary.wait(10)
        killed_s = time.monotonic() - t0
        say("primary_killed", signal="SIGKILL", pid=primary.pid, after_s=round(killed_s, 1))
        old_printed = primary.stdout.read()
        out, err = backup.communicate(timeout=1800)
    finally:
        for p in (primary, backup):
            if p.poll() is None:
                p.kill()
                p.wait(10)
    lines = out.strip().splitlines()
    took = json.loads(lines[-1]) if lines else {}
    live = [json.loads(ln) for ln in err.splitlines() if f'"event": "{events.LIVE}"' in ln]
    say("backup_done", exit=backup.returncode, took_over=took.get("took_over", False),
        takeover_icount=took.get("takeover_icount"), instructions=took.get("instructions"))
    say("offline_replay", log=url, mode="fast", start_icount=0)
    replay = start_process(["replay", "--log", url, "--mode", "fast", "--start", "first",
                            "--json"])
    rep_out, rep_err = replay.communicate(timeout=1800)
    rep_proc = subprocess.CompletedProcess(replay.args, replay.returncode, rep_out, rep_err)
    rep_lines = rep_proc.stdout.strip().splitlines()
    rep = json.loads(rep_lines[-1]) if rep_proc.returncode == 0 and rep_lines else {}
    replayed = console_of(rep_proc.stderr)
    seam = console_seam(log_console(boot, vm), replayed, old_printed)
    # what the backup showed, replayed then recorded, is the same stream
    seam["checks"]["backup_showed_the_same"] = console_of(err) == replayed
    seam["no_gap_no_duplicate"] = all(seam["checks"].values())
    return {"vm": vm, "budget": budget, "backup_exit": backup.returncode,
            "backup_error": err[-2000:] if backup.returncode else "",
            "took_over": bool(took.get("took_over")),
            "takeover_icount": took.get("takeover_icount"),
            "takeovers": event_names(err).count(events.TAKEOVER),
            "takeover_ms": live[0].get("takeover_ms") if live else None,
            "killed_after_s": round(killed_s, 1), "backup": took,
            "replay_exit": rep_proc.returncode, "replay": rep,
            "replay_error": rep_proc.stderr[-2000:] if rep_proc.returncode else "",
            "replay_equal": bool(rep) and rep.get("verified") and rep.get("outputs_verified")
            and (rep.get("state_hash"), rep.get("outputs_sha256"))
            == (took.get("state_hash"), took.get("outputs_sha256")),
            "seconds": round(time.monotonic() - t0, 1), **seam}
