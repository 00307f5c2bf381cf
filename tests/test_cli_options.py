"""A fuzz test of the CLI's options (issue 14, items 4 and 5).

Every option of every verb that takes a value (and the positional guest) gets seeded hostile
values: negative, zero, huge, 1e30, inf, nan, empty, blank, non-numeric, control and
non-ASCII characters.  Whatever the value, the CLI must exit 0 (the value was fine and the
run did its job) or 2 (refused, or the job failed for a reason that is no divergence), with
no traceback; an exit 2 says so in one line, `kvmrr: error: ...`.  Each run has a timeout,
so a hang fails the test.

The other arguments are chosen so that a run the CLI accepts ends quickly: the `hello`
guest (it exits by itself after a few hundred instructions), logs in files, and for the
verbs that need Kafka (follow, gateway, archive) a file: log, which they refuse after
parsing; the demo gets a compose env file that does not exist, so it never starts a cluster.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvmrr.cli import build_parser
from kvmrr_log.paths import REPO

SEED = 14
PER_OPTION = 4          # hostile values tried per option, besides the fixed ones
RUN_TIMEOUT_S = 30.0    # a run that takes longer is a hang
RUN_WHOLE = 6           # accepted and refused values also run in a new process

HOSTILE = ["-1", "-5", "0", "1", "-0", "1e30", "-1e30", "inf", "-inf", "nan", "", " ",
           "abc", "1.5", "0x10", "1e-300", "99999999999999999999999999", "9" * 400,
           "2e9", "-2147483649", "\x7f", "é", "a b", "../..", "\t", "1_000", "+7",
           "4611686018427387905", "18446744073709551616", "x" * 5000]
ALWAYS = ["-1", "nan", "1e30", ""]     # the values of the issue, for every option


def _options() -> list[tuple[str, str]]:
    """(verb, option) for every option that takes a value; "guest" for the positional."""
    out = []
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for verb, p in sub.choices.items():
        for a in p._actions:
            if a.nargs == 0 or isinstance(a, argparse._HelpAction):
                continue
            if a.option_strings:
                out.append((verb, max(a.option_strings, key=len)))
            elif a.dest == "guest":
                out.append((verb, "guest"))
    return out


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "hello.avro"
    proc = subprocess.run([sys.executable, "-m", "kvmrr.cli", "record", "hello", "--log",
                           f"file:{path}", "--quiet"], cwd=REPO, capture_output=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return path


def _base(verb: str, archive, tmp) -> list[str]:
    """A command of verb that the CLI runs quickly when its options are fine."""
    return {
        "run": ["run", "hello", "--max-instructions", "200000"],
        "record": ["record", "hello", "--log", f"file:{tmp}/rec.avro",
                   "--max-instructions", "200000"],
        "replay": ["replay", "--log", f"file:{archive}"],
        "follow": ["follow", "--log", f"file:{archive}", "--backup-id", "b1"],
        "gateway": ["gateway", "--log", f"file:{archive}"],
        "archive": ["archive", "--log", f"file:{archive}", "-o", f"{tmp}/out.avro"],
        "inspect": ["inspect", "--log", f"file:{archive}"],
        "provision": ["provision", "--log", f"file:{archive}"],
        "demo": ["demo", "--compose", f"{tmp}/no-such.env", "--workdir", f"{tmp}/demo"],
    }[verb]


def _with(base: list[str], option: str, value: str) -> list[str]:
    """base with option set to value (replacing it if base has it)."""
    args = list(base)
    if option == "guest":
        args[1] = value
        return args
    if option in args:
        i = args.index(option)
        del args[i:i + 2]
    return args + [f"{option}={value}"]     # (= lets a value start with "-")


def _cases(archive, tmp) -> list[tuple[str, str, list[str]]]:
    rng = random.Random(SEED)
    cases = []
    for verb, option in _options():
        values = ALWAYS + rng.sample([v for v in HOSTILE if v not in ALWAYS], PER_OPTION)
        for value in values:
            cases.append((verb, option, _with(_base(verb, archive, tmp), option, value)))
    return cases


def _run(args: list[str]) -> tuple[list[str], subprocess.CompletedProcess | None]:
    """The CLI as a user runs it, in a process of its own."""
    try:
        return args, subprocess.run([sys.executable, "-m", "kvmrr.cli", *args], cwd=REPO,
                                    capture_output=True, text=True, errors="replace",
                                    timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return args, None


def _fork_run(args: list[str], tmp) -> tuple[int | None, str]:
    """cli.main(args) in a forked child (this process's imports are reused, so a run costs
    what the command itself costs): (exit code or None for a hang, stderr)."""
    out, err = tmp / "fork.out", tmp / "fork.err"
    pid = os.fork()
    if pid == 0:        # the child: never returns into pytest
        code = 70
        try:
            o, e = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), \
                os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(o, 1)
            os.dup2(e, 2)
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
            os.chdir(REPO)
            from kvmrr import cli
            try:
                code = cli.main(args)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 2
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code if isinstance(code, int) else 70)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), err.read_text(errors="replace")
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None, err.read_text(errors="replace")
        time.sleep(0.005)


def _show(args: list[str]) -> str:
    return "kvmrr " + " ".join(repr(a[:60]) if not a.strip() or " " in a else a[:60]
                               for a in args)


def _judge(args: list[str], code: int | None, stderr: str) -> str | None:
    """What is wrong with how the CLI ended (None: nothing)."""
    if code is None:
        return f"{_show(args)}: no exit within {RUN_TIMEOUT_S:.0f} s (a hang)"
    err = stderr.strip().splitlines()
    if code not in (0, 2):
        return f"{_show(args)}: exit {code}: {err[-1:]}"
    if "Traceback" in stderr:
        return f"{_show(args)}: a traceback: {err[-1:]}"
    if code == 2 and (len(err) != 1 or not err[0].startswith("kvmrr: error: ")):
        return f"{_show(args)}: exit 2 but stderr is not one 'kvmrr: error:' line: {err[:3]}"
    return None


def test_hostile_option_values_exit_0_or_2_in_one_line(archive, tmp_path):
    """Every hostile value goes through the parser in this process (fast); those it lets
    through are run for real in a forked child, each with a timeout; and a few of each
    kind are run as a user runs them, in a new process."""
    cases = _cases(archive, tmp_path)
    assert len({(v, o) for v, o, _ in cases}) >= 60, "the parser lost its options?"
    bad, accepted, refused = [], [], []
    for _, _, args in cases:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                build_parser().parse_args(args)
        except SystemExit as exc:
            problem = _judge(args, exc.code, err.getvalue())
            if problem:
                bad.append(problem)
            refused.append(args)
            continue
        accepted.append(args)
    ran_fine = 0
    for args in accepted:         # every accepted value, run for real
        code, stderr = _fork_run(args, tmp_path)
        ran_fine += code == 0
        problem = _judge(args, code, stderr)
        if problem:
            bad.append(problem)
    assert ran_fine >= 20, "hardly any run succeeds: the test itself is broken"
    rng = random.Random(SEED)     # and a few, whole, as a user runs them
    runs = rng.sample(accepted, min(len(accepted), RUN_WHOLE)) + \
        rng.sample(refused, min(len(refused), RUN_WHOLE))
    with ThreadPoolExecutor(2) as pool:
        for args, proc in pool.map(_run, runs):
            problem = _judge(args, proc and proc.returncode, proc.stderr if proc else "")
            if problem:
                bad.append(problem)
    assert not bad, (f"{len(bad)} of {len(cases)} values ({len(runs)} run) misbehaved:\n"
                     + "\n".join(bad[:30]))


@pytest.mark.parametrize("args,needle", [
    (["run", "hello", "--checksum-every", "-1"], "--checksum-every"),
    (["run", "hello", "--load", "inf"], "--load"),
    (["run", "hello", "--max-instructions", "1e30"], "--max-instructions"),
    (["run", "hello", "--max-instructions", "-5"], "--max-instructions"),
    (["run", "hello", "--snapshot-every", "-1"], "--snapshot-every"),
    (["run", "hello", "--seconds", "nan"], "--seconds"),
    (["run", "hello", "--vm", ""], "--vm"),
    (["replay", "--log", "file:x.avro", "--until", "1e30"], "--until"),
])
def test_the_values_of_issue_14_are_refused(args, needle):
    """Each value the issue found hanging, crashing or silently accepted: exit 2, one line
    naming the option."""
    _, proc = _run(args)
    assert proc is not None, "hung"
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmrr: error: ") and needle in lines[0]


def test_inspect_takes_log_as_an_option_or_positionally(archive):
    for args in (["inspect", "--log", f"file:{archive}", "--json"],
                 ["inspect", f"file:{archive}", "--json"]):
        _, proc = _run(args)
        assert proc.returncode == 0, proc.stderr
        assert '"batches"' in proc.stdout
    _, proc = _run(["inspect", f"file:{archive}", "--log", "file:other.avro"])
    assert proc.returncode == 2 and "two logs" in proc.stderr
    _, proc = _run(["inspect"])
    assert proc.returncode == 2 and "--log" in proc.stderr


def test_an_unexpected_error_is_one_line_and_exit_2(monkeypatch, capsys):
    """A bug still ends as one line and exit 2, not a traceback and not 1 (divergence)."""
    from kvmrr import cli

    def broken(args):
        raise ZeroDivisionError("division by zero\nsecond line")
    monkeypatch.setattr(cli, "cmd_run", broken)
    assert cli.main(["run", "hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kvmrr: error: unexpected ZeroDivisionError: division by zero"]


@pytest.mark.kafka
def test_inspect_reads_a_log_on_kafka(kafka, archive):
    """inspect --log kafka://... says what the file archive of the same recording says."""
    import json
    url = f"kafka://{kafka.split(',')[0]}/inspect{os.getpid()}"
    _, rec = _run(["record", "hello", "--log", url, "--quiet"])
    assert rec.returncode == 0, rec.stderr
    _, proc = _run(["inspect", "--log", url, "--json"])
    assert proc.returncode == 0, proc.stderr
    on_kafka = json.loads(proc.stdout)
    _, proc = _run(["inspect", "--log", f"file:{archive}", "--json"])
    in_file = json.loads(proc.stdout)
    assert on_kafka["events_by_kind"] == in_file["events_by_kind"]
    assert on_kafka["last_icount"] == in_file["last_icount"]
    assert len(on_kafka["snapshots"]) == 1 and on_kafka["snapshots"][0]["bytes"] > 0
    assert on_kafka["snapshots"][0]["state_hash"] == in_file["snapshots"][0]["state_hash"]
    _, proc = _run(["inspect", url])
    assert proc.returncode == 0 and "guest hello" in proc.stdout
