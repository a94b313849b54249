"""bench/scale.py's short mode (two instances behind nginx against one): proves it runs end to end.

Never a timing gate: the ratio is reported, not judged.
"""

import json
import subprocess
import sys

from tests.procs import ROOT


def test_scale_bench_short_mode(tmp_path):
    result = subprocess.run(
        [sys.executable, "bench/scale.py", "--short", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "scale-short.json").read_text())
    for mode in ("json", "sse"):
        row = results[mode]
        assert row["errors"] == 0, row
        for instances in ("one", "two"):
            assert row[instances]["rps"] > 0 and row[instances]["errors"] == 0
        assert row["ratio"] == round(row["two"]["rps"] / row["one"]["rps"], 2)
    report = (tmp_path / "scale-short.md").read_text()
    assert "| JSON | 2 |" in report and "| SSE 20 events | 1 |" in report
