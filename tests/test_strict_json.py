"""Every JSON the project writes or prints is strict JSON: an undefined metric is ``null``, never ``NaN``."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from dsnet._io import atomic_write_json, strict_json
from dsnet.engine.report import MetricsLog, format_metric


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
    atomic_write_json(tmp_path / "summary.json", {"bbox_APs": float("nan"), "bbox_AP": 0.25})
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


def test_one_atomic_writer_for_json_safetensors_and_downloads(tmp_path):
    """Every writer goes through dsnet._io: strict JSON, safetensors read back, a finished download moved in place."""
    import torch
    from safetensors.torch import load_file

    from dsnet import _io

    _io.atomic_write_json(tmp_path / "a.json", {"x": float("inf")}, indent=None)
    assert (tmp_path / "a.json").read_text() == '{"x": null}'
    base = torch.arange(6.0)
    weights = {"w": base.view(2, 3), "alias": base[:3]}  # shared storage: cloned, not refused
    _io.atomic_write_safetensors(tmp_path / "w.safetensors", weights, {"model": "m"})
    back = load_file(tmp_path / "w.safetensors")
    assert torch.equal(back["w"], weights["w"]) and torch.equal(back["alias"], weights["alias"])
    with pytest.raises(FileNotFoundError):
        _io.atomic_write_safetensors(tmp_path / "missing" / "w.safetensors", weights)
    partial = tmp_path / "w.bin.partial"
    partial.write_bytes(b"abc")
    _io.replace_atomically(partial, tmp_path / "w.bin")
    assert (tmp_path / "w.bin").read_bytes() == b"abc" and not partial.exists()
    with pytest.raises(OSError, match="cannot write"):
        _io.replace_atomically(tmp_path / "gone", tmp_path / "w2.bin")
    assert not list(tmp_path.glob(f".*{_io.TMP_MARK}*"))  # no temporary file left behind
