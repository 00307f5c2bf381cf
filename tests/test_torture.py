"""Issue 11: the torture guests (guests/torture), recorded with every counter and replayed
with every counter under timers from 10 Hz to 10 kHz; what this host cannot count is
refused at record with exit 2 and one line."""
import json
import time

import pytest

from conftest import REPO, kvmrr, kvmrr_json

TORTURE = REPO / "build" / "guests" / "torture"
REPLAYABLE = ["exceptions", "repstr", "shadows", "smc", "higherhalf", "timeinsn", "xsave"]
# Instructions per recording: enough for hundreds of interrupts at 10 kHz, short enough
# for step (about 15 k instructions/s here) to keep the tier fast.
BUDGET = {"fast": 60_000, "step": 25_000}


def guest(name):
    path = TORTURE / f"{name}.elf"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make build`")
    return path


def record(tmp_path, name, counter, hz, budget=None, extra=()):
    log = tmp_path / f"{name}-{counter}-{hz}.avro"
    args = ["record", guest(name), "--log", f"file:{log}", "--mode", counter,
            "--bootargs", f"timer_hz={hz}", "--checksum-every", 5000, *extra]
    if budget:
        args += ["--max-instructions", budget]
    return log, kvmrr_json(*args)


def replay(log, name, counter, *extra):
    return kvmrr_json("replay", "--log", f"file:{log}", "--guest", guest(name), "--mode",
                      counter, *extra)


def check_replays(log, name, rec):
    for counter in ("fast", "step"):
        rep = replay(log, name, counter)
        assert rep["verified"] and rep["outputs_verified"], (counter, rep)
        assert rep["instructions"] == rec["instructions"], counter
        assert rep["state_hash"] == rec["state_hash"], counter
        assert rep["outputs_sha256"] == rec["outputs_sha256"], counter


def counters_and_rates():
    """(counter, timer Hz): the fast tier records with fast at 10 Hz to 10 kHz and with
    step at 1 kHz; the rest are marked slow."""
    fast_tier = {"fast": (10, 1000, 10000), "step": (1000,)}
    return [pytest.param(c, hz, marks=() if hz in fast_tier[c] else pytest.mark.slow,
                         id=f"{c}-{hz}Hz")
            for c in ("fast", "step") for hz in (10, 1000, 10000)]


@pytest.mark.parametrize("name", REPLAYABLE)
@pytest.mark.parametrize("counter,hz", counters_and_rates())
def test_record_replay_every_counter(tmp_path, name, counter, hz):
    """A budget of instructions of a program that would loop far longer (iters)."""
    if name == "timeinsn" and counter == "fast":
        pytest.skip("fast refuses RDTSC/RDRAND/RDSEED here: test_fast_refuses_time_instructions")
    log, rec = record(tmp_path, name, counter, hz, BUDGET[counter],
                      extra=("--bootargs", f"timer_hz={hz} iters=1000000"))
    assert rec["instructions"] == BUDGET[counter]
    if hz >= 1000:
        assert rec["events_by_kind"].get("Interrupt", 0) >= 5, rec["events_by_kind"]
    if name == "timeinsn" and not (counter == "step" and hz > 1000):
        # step at 10 kHz: the tick follows the host's clock, and at step's 15-60 k
        # instructions/s a loaded host may spend the whole budget in the timer handler
        # before the guest's first RDTSC (0 Insn, 262 interrupts in a fresh-clone run);
        # the replay checks below still hold
        assert rec["events_by_kind"].get("Insn", 0) > 0
    check_replays(log, name, rec)


@pytest.mark.parametrize("name", REPLAYABLE)
def test_runs_to_its_end_and_replays(tmp_path, name):
    """The whole program at 1 kHz (timeinsn: step at 10 Hz): it exits 0 with its report
    line, and both counters replay it to the same state and output."""
    counter, hz = ("step", 10) if name == "timeinsn" else ("fast", 1000)
    log, rec = record(tmp_path, name, counter, hz)
    assert rec["reason"] == "exited" and rec["exit_code"] == 0, rec
    check_replays(log, name, rec)


@pytest.mark.parametrize("name", ["exceptions", "higherhalf", "shadows", "repstr", "xsave"])
def test_fast_and_step_count_alike(name):
    """Without a timer the program is deterministic: both counters count it alike."""
    out = {}
    for counter in ("fast", "step"):
        out[counter] = kvmrr_json("run", guest(name), "--mode", counter, "--bootargs",
                                  "timer_hz=0 iters=3")
    assert out["fast"]["instructions"] == out["step"]["instructions"]
    assert out["fast"]["state_hash"] == out["step"]["state_hash"]


def test_exact_stops_between_fault_and_handler(tmp_path):
    """Stops at consecutive icounts through a loop of faults and software interrupts: the
    two counters reach the same state at each (the handler's first instruction, frame
    pushed, counts one after the faulting instruction)."""
    log, rec = record(tmp_path, "exceptions", "fast", 0, extra=("--bootargs", "timer_hz=0 iters=4"))
    start = rec["instructions"] - 400       # inside the last iterations
    for icount in range(start, start + 40, 3):
        hashes = {c: replay(log, "exceptions", c, "--until", icount)["state_hash"]
                  for c in ("fast", "step")}
        assert hashes["fast"] == hashes["step"], icount


@pytest.mark.parametrize("counter", ["fast", "step"])
@pytest.mark.parametrize("hz", [0, 1000])
def test_ring3_is_refused(tmp_path, counter, hz):
    log = tmp_path / "r3.avro"
    t0 = time.monotonic()
    proc = kvmrr("record", guest("ring3"), "--log", f"file:{log}", "--mode", counter,
                 "--bootargs", f"timer_hz={hz}", check=False, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "ring 3" in lines[0], proc.stderr
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("counter", ["fast", "step"])
def test_triple_fault_is_a_clean_error(tmp_path, counter):
    proc = kvmrr("record", guest("triple"), "--log", f"file:{tmp_path / 't.avro'}", "--mode",
                 counter, check=False, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "triple fault" in lines[0], proc.stderr


def test_fast_refuses_time_instructions(tmp_path):
    """This host's emulator runs RDTSC, RDRAND and RDSEED without an exit, and hardware
    breakpoints on them are not reliable (run.c): a fast record refuses at once, exit 2,
    one line naming them and where."""
    t0 = time.monotonic()
    proc = kvmrr("record", guest("timeinsn"), "--log", f"file:{tmp_path / 't.avro'}", "--mode",
                 "fast", check=False, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "RDTSC" in lines[0] and "0x" in lines[0], proc.stderr
    assert time.monotonic() - t0 < 10


def test_cpuid_leaf1_replays(tmp_path):
    """CPUID leaf 1 EBX[31:24] is the APIC ID of the host CPU the vCPU thread runs on
    (0x20800 / 0x1020800 here, whatever KVM_SET_CPUID2 says): the vCPU is pinned to one
    host CPU, the log names it, and the replay runs there too."""
    for _ in range(3):
        log, rec = record(tmp_path, "timeinsn", "step", 10, extra=("--bootargs", "timer_hz=10 leaf=1"))
        check_replays(log, "timeinsn", rec)


def test_fuzz_seeds():
    """A handful of the differential fuzzer's seeds (make fuzz SEEDS=N runs more)."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "guests/fuzz/fuzz.py", "--seeds", "4", "--first", "100"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_xsave_faults_like_the_cpu():
    """Bad XSAVE/XRSTOR operands fault (libkvmrr/src/xsave.c): per iteration a misaligned
    area, XCOMP_BV set, XSTATE_BV beyond XCR0 and reserved MXCSR bits (#GP) and an unmapped
    area (#PF); every fourth also CR0.TS (#NM) and CR4.OSXSAVE clear (#UD).  The guest's
    handlers count them; the count is the same under both counters.  (That the CPU itself
    faults on these operands, and saves what the core saves, is test_core.c's
    test_xsave_matches_the_cpu.)"""
    for counter in ("fast", "step"):
        out = kvmrr("run", guest("xsave"), "--mode", counter, "--bootargs", "timer_hz=0 iters=8")
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("xsave ")][0]
        assert " faults=52 " in line, (counter, line)   # 8 * 6 + 2 * 2


def one_line_refusal(proc, words):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr
    return lines[0]


@pytest.mark.parametrize("counter", ["fast", "step"])
@pytest.mark.parametrize("hz", [0, 1000])
@pytest.mark.parametrize("how,words", [(0, "RFLAGS.TF"), (1, "RFLAGS.TF"), (2, "DR7 0x401")],
                         ids=["tf", "tf-dr6-cleared", "own-breakpoint"])
def test_guest_debug_is_refused_at_record(tmp_path, counter, hz, how, words):
    """The guest's own debug machinery (trapflag): its single-step trap (how=0), the same
    with a handler that clears DR6 as an OS's does (how=1), and a breakpoint of its own in
    DR0/DR7 (how=2).  This host hides the guest's TF from a core that single-steps, which
    a replay does before its events, and the core's breakpoints take the debug registers:
    a record of either counter stops with exit 2 and one line, at the first #DB (fast:
    a breakpoint on the guest's #DB handler, then its DR6) or POPF that sets TF (step),
    or once DR7 enables a breakpoint.  The one case a record misses is a #DB gate set and
    a trap taken between two exits with DR6 cleared by the handler (how=1 with no timer
    under fast): test_guest_trap_flag_missed_at_record."""
    if counter == "fast" and how == 1 and hz == 0:
        pytest.skip("the case a fast record misses: test_guest_trap_flag_missed_at_record")
    proc = kvmrr("record", guest("trapflag"), "--log", f"file:{tmp_path / 't.avro'}",
                 "--mode", counter, "--bootargs", f"timer_hz={hz} iters=50 how={how}",
                 check=False, timeout=120)
    line = one_line_refusal(proc, "POPF" if counter == "step" and how < 2 else words)
    if counter == "fast" and hz and how < 2:
        # at the first trap, seen at the handler's entry: the loop's first POPF is a few
        # instructions before
        assert "took a #DB" in line, line


def test_db_gate_shared_with_the_timer_records_and_replays(tmp_path):
    """trapflag how=3: vector 1's gate points at the timer's handler and the guest never
    takes a #DB, so every tick stops at the fast record's watch on the #DB handler; the
    guest's DR6 holds no cause there and the record goes on, stepping over the entry.
    It records every tick and replays with both counters."""
    log, rec = record(tmp_path, "trapflag", "fast", 1000,
                      extra=("--bootargs", "timer_hz=1000 iters=3000 how=3"))
    assert rec["reason"] == "exited" and rec["events_by_kind"]["Interrupt"] >= 10, rec
    check_replays(log, "trapflag", rec)


def test_guest_trap_flag_missed_at_record(tmp_path):
    """The gap left (docs/ARCHITECTURE.md §2.7): trapflag with a handler that clears DR6
    and no timer takes all its traps in one free run, before any exit could arm the watch
    on its #DB handler, so `fast` records it.  Its replay runs free too and verifies; a
    replay that single-steps across it refuses at the POPF that sets TF, in one line,
    never a replay that lost the traps."""
    log, rec = record(tmp_path, "trapflag", "fast", 0,
                      extra=("--bootargs", "timer_hz=0 iters=50 how=1", "--checksum-every", 0))
    assert rec["reason"] == "exited"
    rep = replay(log, "trapflag", "fast")
    assert rep["verified"] and rep["state_hash"] == rec["state_hash"]
    proc = kvmrr("replay", "--log", f"file:{log}", "--mode", "step", check=False, timeout=120)
    one_line_refusal(proc, "RFLAGS.TF")


def test_exact_stops_through_xsave_faults():
    """Stops at every second icount through the xsave guest's bad operands (#GP, #PF, #NM,
    #UD, raised by the core itself): both counters reach the same state at each, the
    handler's first instruction one count after the faulting XSAVE/XRSTOR."""
    from libkvmrr import Machine
    elf = guest("xsave").read_bytes()
    args = dict(mode="run", bootargs="timer_hz=0 iters=1")
    with Machine(elf, counter="step", **args) as m:
        start = 0
        for n in range(1, 20_000):
            m.run(stop_icount=n)
            r = m.regs()
            if m.read_virt(r["rip"], 3) == b"\x0f\xae\x27" and r["rdi"] % 64:
                start = n          # the misaligned XSAVE (%rdi): the faults follow
                break
    assert start, "the misaligned XSAVE was not found"

    def at(counter, icount):
        with Machine(elf, counter=counter, **args) as m:
            res = m.run(stop_icount=icount)
            return res.icount, m.regs()["rip"], m.state_hash()

    for icount in range(start - 2, start + 70, 2):
        assert at("fast", icount) == at("step", icount), icount
