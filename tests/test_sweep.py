"""The overhead sweep (issue 6): `make bench QUICK=1` runs and writes its report, so the
report code cannot rot; and the report follows the sweep's config, with no code edit."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.kafka


def _sweep(*args, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "bench.sweep", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_quick_sweep_writes_report_plots_and_results(tmp_path, kafka_jars):
    _sweep("--quick", "--out", tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    report = (tmp_path / "report.md").read_text()
    cfg = results["config"]
    s = results["sections"]
    # every point of the config, each repeated (the spread needs at least two samples)
    assert cfg["repeats"] >= 2
    assert len(s["counter_timer"]) == (cfg["repeats"] * len(cfg["counter_timer"]["counters"])
                                       * len(cfg["counter_timer"]["timer_hz"]))
    assert {r["txn_ms"] for r in s["txn_interval"]} == set(cfg["txn_interval"]["txn_ms"])
    assert all(r["plain_ips"] > 0 and r["replay_ips"] > 0 for r in s["counter_timer"])
    assert all(r["requests_per_s"] > 0 for r in s["txn_interval"] + s["commit_policy"])
    assert all(r["mbit_per_s"] > 0 for r in s["bandwidth"])
    for png in ("counter_timer", "txn_interval", "commit_policy", "snapshot_interval",
                "bandwidth"):
        data = (tmp_path / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"({png}.png)" in report
    assert "emulat" in report and results["machine"]["host"] in report
    assert "## Defaults chosen" in report and "- **Counter: `" in report


def test_report_follows_the_config(tmp_path):
    cfg = {"repeats": 2, "counter_timer": {"counters": ["fast"], "timer_hz": [37, 250],
                                           "instructions": {"fast": 60000}}}
    (tmp_path / "sweep.json").write_text(json.dumps(cfg))
    _sweep("--config", tmp_path / "sweep.json", "--out", tmp_path)
    report = (tmp_path / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| fast |")]
    assert [r.split("|")[2].strip() for r in rows] == ["37", "250"]
    assert "Transaction interval" not in report     # left out of the config
