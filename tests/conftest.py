import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def kvmrr(*args, check=True, timeout=600):
    """Run the kvmrr CLI as a user would; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "kvmrr.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"kvmrr {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def kvmrr_json(*args, **kw):
    proc = kvmrr(*args, "--json", "--quiet", **kw)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def recordings(tmp_path_factory):
    """Recordings shared by the core tests: {(guest, counter, n): (path, summary)}."""
    return {}
