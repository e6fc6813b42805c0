"""``benchmarks/detection.py`` runs end to end on its tiny budget and reports what its runs measured.

The README's FPN vs DS-FPN table comes from this script (``--budget full``), so it must keep working; the tiny
budget trains each neck for one epoch on 48 images (AP stays near 0 — this checks the bookkeeping, not accuracy).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "detection.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("_bench_detection", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_budget_table_matches_its_runs(bench, tmp_path):
    table = bench.run_budget("tiny", tmp_path / "data", tmp_path / "runs", ["fpn", "lateral_extra"], [0, 1], 1)
    runs = sorted((tmp_path / "runs").iterdir())
    assert [r.name.rsplit("-", 2)[0] for r in runs] == [
        "tiny-fpn-seed0",
        "tiny-fpn-seed1",
        "tiny-lateral_extra-seed0",
        "tiny-lateral_extra-seed1",
    ]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith(("| fpn |", "| lateral_extra |"))]
    per_run = rows[:4]
    for row, run in zip(per_run, runs):
        summary = json.loads((run / "summary.json").read_text())
        assert row[1] == run.name.split("seed")[1].split("-")[0]  # the seed column names the run's seed
        assert row[3] == f"{summary['train_seconds'] / 60:.1f}"  # training minutes from the run's own summary
        assert row[7] == f"{100 * summary['bbox_AP']:.1f}"  # final AP from the run's own summary
    # FPN and DS-FPN parameter counts of this 10-class RetinaNet differ by the DS-Blocks of the neck
    assert float(per_run[0][2]) < float(per_run[2][2])
    means = rows[4:]
    assert [m[0] for m in means] == ["| fpn", "| lateral_extra"]  # mean over the two seeds per neck
