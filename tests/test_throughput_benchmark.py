"""``benchmarks/throughput.py`` on tiny settings: every model × path × batch measured, table and samples written.

Structure only: no figure is asserted against a time, only against the run's own measurements.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from dsnet.engine.runtime import configure_memory

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


def _load_script() -> ModuleType:
    """The benchmark is a script, not part of the package: import it by path."""
    if "dsnet_throughput_benchmark" in sys.modules:
        return sys.modules["dsnet_throughput_benchmark"]
    spec = importlib.util.spec_from_file_location("dsnet_throughput_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


throughput = _load_script()


def _tiny(**changes) -> object:
    # the session's thread count, so that the run leaves torch's threads as they were
    base = throughput.Settings(
        batches=(1,), size=32, threads=torch.get_num_threads(), repeats=1, warmup=0, min_time=0.0, settle=0.0
    )
    return throughput.replace(base, gemm_size=64, calib_batches=1, **changes)


def _rows(table: str) -> list[list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_tiny_run_measures_every_path_and_writes_the_table(tmp_path, capsys):
    settings = _tiny(batches=(1, 2), repeats=2)
    output = tmp_path / "results" / "throughput.md"
    ours, peers = ("eager", "fused", "channels_last", "math_attention"), ("eager", "onnxruntime", "openvino", "int8")
    artefacts = tmp_path / "artefacts"
    result, table = throughput.run(["dsnet_tiny"], ["test_convnext"], settings, ours, peers, output, artefacts)
    assert sorted(p.name for p in artefacts.iterdir()) == ["test_convnext_32px.int8.onnx", "test_convnext_32px.onnx"]

    header, *rows = _rows(table)
    assert header == [
        "model",
        "group",
        "path",
        "GMACs",
        "img/s b1",
        "img/s b2",
        "% GEMM b1",
        "% GEMM b2",
        "× eager b2",
    ]
    expected = [("dsnet_tiny", "ours", v) for v in ours] + [("test_convnext", "peer", v) for v in peers]
    assert [tuple(row[:3]) for row in rows] == expected
    assert "Paths that could not run" not in table
    for row in rows:
        name, _, variant = row[:3]
        cells = [result.cell(name, variant, b) for b in (1, 2)]
        for cell in cells:
            assert cell.error is None and len(cell.seconds) == settings.repeats and min(cell.seconds) > 0
        rates = [b / statistics.median(cell.seconds) for b, cell in zip((1, 2), cells, strict=True)]
        shares = [100 * 2 * result.macs[name] * rate / result.gemm_flops for rate in rates]
        eager = result.cell(name, "eager", 2)
        assert row[4:] == [f"{r:.1f}" for r in rates] + [f"{s:.0f}" for s in shares] + [
            f"{rates[1] / eager.images_per_second:.2f}"
        ]
        assert row[3] == f"{result.macs[name] / 1e9:.2f}"
    assert len(result.gemm_seconds) == settings.repeats
    assert f"64² fp32 matmul at {result.gemm_flops / 1e9:.1f} GFLOP/s" in table
    assert "Load average (1 min) before / after" in table

    assert output.read_text() == table + "\n"
    assert table in capsys.readouterr().out
    samples = json.loads(output.with_suffix(".json").read_text())
    assert len(samples["cells"]) == len(rows) * 2 and samples["macs"] == result.macs


def test_a_path_that_cannot_be_built_is_reported_and_the_rest_measured(tmp_path, monkeypatch):
    import dsnet.export.onnx

    def broken(*args, **kwargs):
        raise RuntimeError("exporter says no\nsecond line")

    monkeypatch.setattr(dsnet.export.onnx, "export_onnx", broken)
    variants = ("eager", "onnxruntime", "int8", "paddleclas")
    result, table = throughput.run(["test_convnext"], [], _tiny(), variants, (), tmp_path / "t.md")
    rows = {row[2]: row for row in _rows(table)[1:]}
    assert list(rows) == list(variants)
    assert rows["eager"][4] != "—" and result.cell("test_convnext", "eager", 1).seconds
    for variant in ("onnxruntime", "int8", "paddleclas"):
        assert rows[variant][4:] == ["—", "—", "—"]
        assert not result.cell("test_convnext", variant, 1).seconds
    assert "- test_convnext onnxruntime: RuntimeError: ONNX export failed (RuntimeError: exporter says no)" in table
    assert "- test_convnext paddleclas: no PaddleClas reference for test_convnext" in table


def test_unknown_path_is_refused():
    with pytest.raises(ValueError, match="unknown path"):
        throughput.run(["dsnet_tiny"], [], _tiny(), ("eager", "tensorrt"), (), None)


def test_cli_flags_reach_the_run(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(throughput, "run", lambda *args: seen.update(args=args))
    throughput.main(["--models", "dsnet_tiny", "--peers", "--variants", "eager", "fused", "--size", "64"])
    models, peers, settings, variants, peer_variants, output, artefacts, memory = seen["args"]
    assert (models, peers, variants, artefacts) == (["dsnet_tiny"], [], ["eager", "fused"], None)
    assert memory == configure_memory("hugepages")  # the dsnet command's default, named in the table header
    assert (settings.size, settings.threads, settings.batches, settings.repeats) == (64, 2, (1, 16), 5)
    assert output == throughput.RESULTS / "throughput.md"

    argv = ["--batches", "4", "--threads", "1", "--repeats", "3", "--compile", "--paddle", "--output", str(tmp_path)]
    throughput.main([*argv, "--artefacts", str(tmp_path / "a"), "--malloc", "libc"])
    models, peers, settings, variants, peer_variants, output, artefacts, memory = seen["args"]
    assert (artefacts, memory) == (tmp_path / "a", "C library default")
    assert (models, peers) == (list(throughput.OURS), list(throughput.PEERS))
    assert variants == [*throughput.DEFAULT_VARIANTS, "compile", "paddleclas"]
    assert peer_variants == [*throughput.DEFAULT_PEER_VARIANTS, "compile"]
    assert (settings.batches, settings.threads, settings.repeats, output) == ((4,), 1, 3, tmp_path)


@pytest.mark.paddle
def test_paddle_path_times_the_reference_with_our_weights(tmp_path):
    # 128 px: the smallest size at which PaddleClas and ours compute the same function (see the README)
    settings = _tiny(size=128, batches=(2,))
    result, table = throughput.run(["dsnet_tiny"], [], settings, ("eager", "paddleclas"), (), tmp_path / "t.md")
    assert [row[2] for row in _rows(table)[1:]] == ["eager", "paddleclas"]
    assert result.cell("dsnet_tiny", "paddleclas", 2).seconds and result.settings.settle == throughput.PADDLE_SETTLE
    assert result.checks["dsnet_tiny"] < 1e-3
    assert f"dsnet_tiny {result.checks['dsnet_tiny']:.1e}" in table


def test_an_artefacts_folder_is_reused(tmp_path, monkeypatch):
    import dsnet.export.onnx

    artefacts = tmp_path / "artefacts"
    throughput.run(["test_convnext"], [], _tiny(), ("onnxruntime",), (), None, artefacts)
    monkeypatch.setattr(dsnet.export.onnx, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    result, _ = throughput.run(["test_convnext"], [], _tiny(), ("onnxruntime",), (), None, artefacts)
    assert result.cell("test_convnext", "onnxruntime", 1).seconds
