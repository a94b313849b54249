"""The soak script's short mode: proves the soak works (its long runs are in docs/operations.md)."""

import os
import subprocess
import sys

from tests.procs import ROOT


def test_soak_short_mode_passes(tmp_path):
    result = subprocess.run(
        [sys.executable, "bench/soak.py", "--short", "--log", str(tmp_path / "soak.log")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "result: PASS" in result.stdout and "| unexpected outcomes | 0 |" in result.stdout
