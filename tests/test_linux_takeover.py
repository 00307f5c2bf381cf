"""Issue 13, item 5: the Linux guest on Kafka, its primary killed mid-boot.

The primary records `linux` with step (the kernel reads the TSC: docs/guests.md §9) into a
log on the session's broker; a backup follows with step (a fast one refuses to take over a
step log).  Once the log holds some of the boot's console, the primary is SIGKILLed; the
backup takes over and records on to the budget.  The whole log replays offline to the
survivor's state, and the console stream the log holds (the old primary's valid part, then
the new primary's) equals the replay's, line by line, each line once."""
import json
import signal
import time
import uuid

import pytest

from conftest import kvmrr
from test_linux_guest import linux  # noqa: F401  (the fixture: skips without the kernel)
from test_takeover import _events, _spawn
from kvmrr_log import events

pytestmark = pytest.mark.kafka
# step records at about 50 k instructions/s here (slower under load); the kernel's first
# console line ("Linux version 6.1...") comes at about 0.5 M instructions
BUDGET = 2_500_000
KILL_AFTER_OUTPUTS = 8      # console records committed before the primary is killed


def log_console(bootstrap: str, vm: str) -> list[tuple[int, int, bytes]]:
    """The console Output events the log validly holds so far, as (epoch, seq, data): read
    under the epoch rule, so an old primary's records after the seal never appear."""
    from kvmrr_log.kafka import topics
    from kvmrr_log.topic_reader import LogTopicReader
    try:
        reader = LogTopicReader(bootstrap, vm, topics(vm).log)
    except Exception:
        return []
    out = []
    try:
        for rec, _ in reader.records(0):
            if rec["kind"] == "EventBatch":
                out += [(reader.epoch, ev["seq"], ev["data"]) for ev in rec["events"]
                        if ev["kind"] == "Output" and ev["channel"] == 0]
    except Exception:       # the topic does not exist yet
        return out
    finally:
        reader.close()
    return out


def check_console(outputs: list[tuple[int, int, bytes]], replayed: str,
                  old_printed: str) -> tuple[list[str], list[str]]:
    """The old primary's part of the log then the new one's: every seq once, in order, and
    the lines equal the offline replay's; the old part is what the old primary printed (a
    prefix of it: it may have printed lines it never committed).  (old lines, new lines)."""
    seqs = [seq for _, seq, _ in outputs]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and seqs[0] == 0, seqs
    epochs = [e for e, _, _ in outputs]
    assert epochs == sorted(epochs) and set(epochs) == {0, 1}, sorted(set(epochs))
    # the UART's lines end in \r\n; the processes' output is read as text (\n)
    old, new = (b"".join(d for e, _, d in outputs if e == ep).decode("utf-8", "replace")
                .replace("\r\n", "\n") for ep in (0, 1))
    assert old_printed.startswith(old), (old[-300:], old_printed[-300:])
    assert (old + new).splitlines() == replayed.splitlines()
    assert old + new == replayed
    return old.splitlines(), new.splitlines()


def console_of(stderr: str) -> str:
    """The guest console a kvmrr --json process printed on stderr, without its structured
    log events (one whole line each, as is every console Output of this guest)."""
    return "".join(ln for ln in stderr.splitlines(keepends=True) if not _events(ln))


def test_console_check_sees_a_duplicate_and_a_gap():
    """The check above can fail: a line the new primary repeats, or one lost at the seam."""
    outs = [(0, 0, b"[ 0.1] a\n"), (0, 1, b"[ 0.2] b\n"), (1, 2, b"[ 0.3] c\n")]
    assert check_console(outs, "[ 0.1] a\n[ 0.2] b\n[ 0.3] c\n",
                         "[ 0.1] a\n[ 0.2] b\n[ 0.3]") == (["[ 0.1] a", "[ 0.2] b"],
                                                           ["[ 0.3] c"])
    dup = outs[:2] + [(1, 2, b"[ 0.2] b\n"), (1, 3, b"[ 0.3] c\n")]
    with pytest.raises(AssertionError):
        check_console(dup, "[ 0.1] a\n[ 0.2] b\n[ 0.3] c\n", "[ 0.1] a\n[ 0.2] b\n")
    with pytest.raises(AssertionError):        # seq 1 missing
        check_console([outs[0], outs[2]], "[ 0.1] a\n[ 0.2] b\n[ 0.3] c\n", "[ 0.1] a\n")
    with pytest.raises(AssertionError):        # the old part not what the primary printed
        check_console(outs, "[ 0.1] a\n[ 0.2] b\n[ 0.3] c\n", "[ 0.1] a\n")


def test_backup_takes_over_linux_mid_boot(kafka, linux):  # noqa: F811
    vm = f"lx{uuid.uuid4().hex[:8]}"
    boot = kafka.split(",")[0]
    url = f"kafka://{boot}/{vm}"
    t0 = time.monotonic()
    backup = _spawn("follow", "--log", url, "--backup-id", "b1", "--mode", "step", "--json",
                    "--quiet", "--failover-timeout", "3", "--max-instructions", BUDGET,
                    "--idle-timeout", "120")
    # no --json: the primary's console goes to its stdout, apart from its log events
    primary = _spawn("record", "linux", "--mode", "step", "--log", url,
                     "--max-instructions", BUDGET)
    try:
        while len(log_console(boot, vm)) < KILL_AFTER_OUTPUTS:
            assert primary.poll() is None, primary.stderr.read()[-3000:]
            assert time.monotonic() - t0 < 240, "the primary committed no console output"
            time.sleep(1)
        primary.send_signal(signal.SIGKILL)
        primary.wait(10)
        killed_s = time.monotonic() - t0
        old_printed = primary.stdout.read()
        out, err = backup.communicate(timeout=600)
    finally:
        for p in (primary, backup):
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert backup.returncode == 0, err[-3000:]
    took = json.loads(out.strip().splitlines()[-1])
    assert took.get("took_over"), f"the backup did not take over: {out[-500:]} {err[-3000:]}"
    assert took["instructions"] == BUDGET and took["reason"] == "budget", took
    assert 0 < took["takeover_icount"] < BUDGET, took
    assert _events(err).count(events.TAKEOVER) == 1, err[-3000:]
    live = [json.loads(ln) for ln in err.splitlines() if f'"event": "{events.LIVE}"' in ln]
    # the whole log, the old primary's part then the new one's, replays with fast
    rep_proc = kvmrr("replay", "--log", url, "--mode", "fast", "--start", "first", "--json",
                     timeout=600)
    rep = json.loads(rep_proc.stdout.strip().splitlines()[-1])
    assert rep["verified"] and rep["outputs_verified"], rep
    assert rep["instructions"] == BUDGET
    assert (rep["state_hash"], rep["outputs_sha256"]) == (took["state_hash"],
                                                         took["outputs_sha256"])
    old, new = check_console(log_console(boot, vm), console_of(rep_proc.stderr), old_printed)
    assert len(old) >= 1 and new, (old, new)
    assert any("Linux version 6.1" in ln for ln in old), old
    print(f"\nlinux takeover: killed at {killed_s:.0f} s, took over at icount "
          f"{took['takeover_icount']}, takeover_ms {live[0]['takeover_ms'] if live else '?'}, "
          f"{len(old)} console lines by the old primary + {len(new)} by the new, "
          f"new primary {took['seconds']} s, all {time.monotonic() - t0:.0f} s")
