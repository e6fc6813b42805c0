"""``benchmarks/fashion_mnist.py`` on a tiny budget: every run under sched.minutes, seeds, the table it writes.

Structure only: no figure is asserted against a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fashion_mnist.py"


@pytest.mark.slow
def test_tiny_budget_trains_each_model_under_the_time_budget_and_writes_the_table(tmp_path):
    out = tmp_path / "table.md"
    args = ["--minutes", "0.02", "--models", "dsnet_tiny", "resnet18", "--seed-models", "dsnet_tiny"]
    args += ["--seeds", "0", "1", "--val-samples", "64", "--threads", "1"]
    args += ["--output-dir", str(tmp_path / "runs"), "--out", str(out)]
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    table = out.read_text()
    assert "minutes trained" in table and "longest/shortest" in table
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "±" in rows["dsnet_tiny"] and "±" not in rows["resnet18"]  # two seeds vs one
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").glob("*/summary.json"))]
    assert sorted(s["model"] for s in summaries) == ["dsnet_tiny", "dsnet_tiny", "resnet18"]
    for summary in summaries:
        assert summary["final"]["num_samples"] == 64
    configs = {p.parent.name: p.read_text() for p in (tmp_path / "runs").glob("*/config.yaml")}
    assert all(("global_strides" in text) == ("dsnet" in name) for name, text in configs.items())
    assert all("minutes: 0.02" in text and "updates: null" in text for text in configs.values())  # time, not updates
