"""The benchmark suite's short mode: proves it runs end to end (never a timing gate)."""

import json
import subprocess
import sys

from tests.procs import ROOT


def test_bench_short_mode(tmp_path):
    result = subprocess.run(
        [sys.executable, "bench/run.py", "--short", "--before", "HEAD", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "short.json").read_text())
    for mode, levels in (("json", ("c1", "c64")), ("sse", ("c64",))):
        for level in levels:
            row = results[mode][level]
            assert set(row) == {
                "direct",
                "nginx",
                "tornado, no upstream",
                "proxy /chat_complete",
                "proxy /v1/chat/completions",
                "previous (HEAD) /chat_complete",
                "previous (HEAD) /v1/chat/completions",
            }
            for subject, measured in row.items():
                assert measured["rps"] > 0 and measured["errors"] == 0, (mode, level, subject, measured)
    assert results["streams"]["open"] > 0 and results["streams"]["failed"] == 0
    for by_tree in results["ttft"].values():
        assert set(by_tree) == {"proxy", "previous (HEAD)"}
        assert all(t["proxy"]["failed"] == 0 and t["direct"]["failed"] == 0 for t in by_tree.values())
    assert (tmp_path / "short.png").stat().st_size > 10_000
    report = (tmp_path / "short.md").read_text()
    assert "| JSON c=64 | proxy /chat_complete |" in report
    assert "| proxy /chat_complete at c=64 (json) |" in report and "of Tornado's no-upstream ceiling" in report
