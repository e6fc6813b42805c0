"""Every JSON the project writes or prints is strict JSON: an undefined metric is ``null``, never ``NaN``."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from dsnet.engine.report import MetricsLog, format_metric, strict_json
from dsnet.engine.trainer import atomic_json


def _strict_loads(text: str):
    """json.loads that rejects NaN/Infinity the way jq and JavaScript do."""

    def reject(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=reject)


@dataclasses.dataclass
class _Result:
    top1: float
    per_class: list


def test_undefined_numbers_become_null():
    value = {
        "bbox_APl": float("nan"),
        "inf": float("inf"),
        "ok": 0.5,
        "t": torch.tensor(2.0),
        "r": _Result(math.nan, [1.0]),
    }
    assert _strict_loads(strict_json(value)) == {
        "bbox_APl": None,
        "inf": None,
        "ok": 0.5,
        "t": 2.0,
        "r": {"top1": None, "per_class": [1.0]},
    }


def test_run_folder_files_are_strict(tmp_path):
    atomic_json(tmp_path / "summary.json", {"bbox_APs": float("nan"), "bbox_AP": 0.25})
    assert _strict_loads((tmp_path / "summary.json").read_text()) == {"bbox_APs": None, "bbox_AP": 0.25}
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write("eval", update=3, bbox_APl=float("nan"))
    log.write("eval", update=5, bbox_APl=0.1)
    log.truncate_after(4)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and _strict_loads(lines[0])["bbox_APl"] is None


@pytest.mark.parametrize(("value", "text"), [(float("nan"), "n/a"), (None, "n/a"), (0.12345, "0.123")])
def test_tables_show_na(value, text):
    assert format_metric(value) == text
