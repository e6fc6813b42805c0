"""``benchmarks/ablations.py`` on a tiny budget: each variant's switch reaches the model, seeds give mean ± std."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ablations.py"


@pytest.mark.slow
def test_tiny_budget_trains_the_variants_and_writes_the_table(tmp_path):
    out = tmp_path / "ablations.md"
    args = ["--tables", "3", "--only", "full", "no_fL", "--seeds", "0", "1", "--jobs", "2", "--threads", "1"]
    args += ["--train-samples", "64", "--updates", "1", "--val-samples", "32", "--set", "train.batch_size=32"]
    args += ["--output-dir", str(tmp_path / "runs"), "--out", str(out)]
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.read_text().splitlines() if "|" in line}
    assert set(rows) >= {"DS-Net-T*", "w/o f_L"} and "w/o f_G" not in rows
    assert rows["DS-Net-T*"][1] == "79.0" and rows["w/o f_L"][1] == "76.7"  # the paper's ImageNet figures
    assert "±" in rows["DS-Net-T*"][3] and rows["w/o f_L"][5].startswith(("+", "-"))
    # w/o f_L drops the local depth-wise conv and its norm: fewer parameters, and the switch is in the run's config
    assert float(rows["w/o f_L"][2]) < float(rows["DS-Net-T*"][2])
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").glob("*/*/summary.json"))]
    assert len(summaries) == 4 and all(s["updates"] == 1 and s["final"]["num_samples"] == 32 for s in summaries)
    configs = {p.parents[1].name: yaml.safe_load(p.read_text()) for p in (tmp_path / "runs").glob("*/*/config.yaml")}
    assert configs["no_fL-s1"]["model"]["kwargs"]["local_stream"] is False
    assert "local_stream" not in configs["full-s0"]["model"]["kwargs"]
    assert {c["train"]["seed"] for c in configs.values()} == {0, 1}
