"""One logging path: processes log structured events through structlog (kvmrr.logsetup),
to stderr, JSON lines unless stderr is a terminal; stdout keeps results.  And the sweep's
progress (bench.progress): which point of how many, elapsed, an estimate of what is left."""
import ast
import json
import re

import structlog

from bench.progress import Progress, clock_text
from kvmrr.logsetup import configure
from kvmrr_log.paths import REPO


def test_events_are_json_lines_on_stderr(capsys):
    configure(console=False)
    structlog.get_logger().bind(role="t").info("something_happened", n=3)
    out, err = capsys.readouterr()
    assert out == ""
    ev = json.loads(err.strip().splitlines()[-1])
    assert ev["event"] == "something_happened" and ev["n"] == 3 and ev["role"] == "t"
    assert ev["level"] == "info" and ev["timestamp"].endswith("Z")


def test_console_rendering_for_a_terminal(capsys):
    configure(console=True)
    try:
        structlog.get_logger().info("something_happened", n=3)
        out, err = capsys.readouterr()
        err = re.sub(r"\x1b\[[0-9;]*m", "", err)          # the renderer's colours
        assert out == "" and "something_happened" in err and "n=3" in err
        assert not err.lstrip().startswith("{")
    finally:
        configure(console=False)


def test_no_module_prints_its_own_log_lines():
    """No say() helpers and no prints to stderr in the processes' code: they log events."""
    for pkg in ("bench", "harness", "kvmrr", "recorder", "replayer", "kvmrr_log"):
        for path in (REPO / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef):
                    assert node.name != "say", f"{path}: def say"
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and node.func.id == "print" and path.name != "cli.py"):
                    to = [k for k in node.keywords if k.arg == "file"]
                    assert not to, f"{path}:{node.lineno}: print(file=...) instead of an event"


def test_progress_counts_points_and_estimates_what_is_left():
    now = [100.0]
    with structlog.testing.capture_logs() as told:
        p = Progress({"fast": 2, "slow": 2, "none": 0}, event="sweep_point",
                     clock=lambda: now[0])
        assert p.total == 4 and p.eta_s() is None
        now[0] += 1
        p.point("fast", x=1)
        now[0] += 1
        p.point("fast")
        now[0] += 50
        p.between_points()                    # set-up: elapsed, but no point's time
        now[0] += 10
        info = p.point("slow")
        now[0] += 10
        last = p.point("slow")
    assert [t["point"] for t in told] == [1, 2, 3, 4] and {t["of"] for t in told} == {4}
    assert told[0]["x"] == 1 and told[0]["event"] == "sweep_point"
    # after "fast" (1 s a point): the 2 "slow" points to go at the overall mean, 1 s each
    assert told[1]["eta_s"] == 2.0
    # after one "slow" point of 10 s: the other one is charged 10 s
    assert info["eta_s"] == 10.0 and info["elapsed_s"] == 62.0 and info["elapsed"] == "1:02"
    assert last["eta_s"] == 0.0


def test_clock_text():
    assert clock_text(65) == "1:05" and clock_text(3723) == "1:02:03"
    assert clock_text(None) is None


def test_the_sweep_plans_every_point_of_its_config():
    from bench.sweep import CONFIG, load_config, plan
    cfg = load_config(CONFIG, quick=True)
    r = cfg["repeats"]
    p = plan(cfg)
    assert p["counter_timer"] == r * len(cfg["counter_timer"]["counters"]) * len(
        cfg["counter_timer"]["timer_hz"])
    assert p["txn_interval"] == r * (1 + len(cfg["txn_interval"]["txn_ms"]))
    assert set(p) == {k for k in cfg if k not in ("repeats",)} & set(p)
