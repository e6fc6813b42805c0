"""``benchmarks/speed.py`` in quick mode: both frameworks measured, ratios from the measured numbers, table written.

Structure only: no figure is asserted against a time.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytestmark = pytest.mark.paddle

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def _load_script() -> ModuleType:
    """The benchmark is a script, not part of the package: import it by path."""
    if "dsnet_speed_benchmark" in sys.modules:
        return sys.modules["dsnet_speed_benchmark"]
    spec = importlib.util.spec_from_file_location("dsnet_speed_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


speed = _load_script()


def test_quick_run_measures_both_frameworks_and_writes_the_ratios(tmp_path, capsys):
    # the current torch thread count, so that the run leaves the session's threads as they were
    settings = replace(speed.QUICK, threads=torch.get_num_threads())
    output = tmp_path / "results" / "speed.md"
    rows, table = speed.run(["dsnet_tiny"], settings, output)

    assert [row.measure for row in rows] == ["eval b2", "eval latency b1", "train b2"]
    assert [row.unit for row in rows] == ["img/s", "ms", "img/s"]
    for row in rows:
        assert (row.model, row.reference) == ("dsnet_tiny", "DSNet_tiny")
        assert set(row.samples) == {"ours", "ours_cl", "ref"}
        for column, seconds in row.samples.items():
            assert len(seconds) == settings.repeats and all(s > 0 for s in seconds), column
        for column, figure in [("ours", row.ours), ("ours_cl", row.ours_cl), ("ref", row.ref)]:
            median = statistics.median(row.samples[column])
            expected = 1e3 * median if row.unit == "ms" else settings.batch / median
            assert figure == pytest.approx(expected, rel=1e-12), column
        assert row.ratio == pytest.approx(row.ours / row.ref, rel=1e-12)
        assert row.ratio_cl == pytest.approx(row.ours_cl / row.ref, rel=1e-12)
        line = next(line for line in table.splitlines() if f"| {row.measure} ({row.unit}) |" in line)
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        figures = (row.ours, row.ours_cl, row.ref)
        assert cells[3:] == [f"{f:.1f}" for f in figures] + [f"{row.ratio:.2f}", f"{row.ratio_cl:.2f}"]

    assert output.read_text() == table + "\n"
    assert table in capsys.readouterr().out
    # the two models were given the same weights: the logit check in the header is small
    check = float(table.split("batch 2: dsnet_tiny ")[1].split(")")[0])
    assert check < 1e-3


def test_cli_flags_reach_the_run(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(speed, "run", lambda models, settings, output: seen.update(locals()))
    speed.main(["--quick", "--models", "dsnet_small", "--batch", "3", "--size", "160", "--threads", "1"])
    assert seen["models"] == ["dsnet_small"]
    assert (seen["settings"].batch, seen["settings"].size, seen["settings"].threads) == (3, 160, 1)
    assert seen["settings"].repeats == speed.QUICK.repeats and seen["settings"].channels_last

    speed.main(["--repeats", "4", "--no-channels-last", "--output", str(tmp_path / "x.md")])
    assert seen["models"] == list(speed.DEFAULT_MODELS)
    assert (seen["settings"].batch, seen["settings"].size, seen["settings"].repeats) == (8, 224, 4)
    assert not seen["settings"].channels_last and seen["output"] == tmp_path / "x.md"
