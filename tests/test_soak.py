"""The soak script's short mode: proves the soak works (its long runs are in docs/operations.md)."""

import os
import re
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


def test_soak_with_a_budget_the_ledger_and_the_cache(tmp_path):
    """--usage: the same mix answered as expected with the three on, each of them at work. (Its RSS
    is judged over minutes, docs/performance.md: ten seconds are the cache filling.)"""
    result = subprocess.run(
        [sys.executable, "bench/soak.py", "--short", "--usage", "--log", str(tmp_path / "soak.log")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    out = result.stdout
    assert "| unexpected outcomes | 0 |" in out and "| tracebacks in the proxy log | 0 |" in out, out + result.stderr
    fails = [line for line in out.splitlines() if line.startswith("FAIL:") and "RSS grew" not in line]
    assert not fails, out
    cache = re.search(r"\| cache hits / misses \(whole run\) \| (\d+) / (\d+) \|", out)
    hits, misses = int(cache.group(1)), int(cache.group(2))
    assert hits > 0 and misses > 0
    assert float(re.search(r"\| USD charged to the budget \(whole run\) \| ([0-9.]+) \|", out).group(1)) > 0
    assert "| ledger rows dropped (whole run) | 0 |" in out
