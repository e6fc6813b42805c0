"""Exported artefacts run by ONNX Runtime and OpenVINO: logits as eager PyTorch, int8 runs, the CLI round trip."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import dsnet  # noqa: F401
from _engine_helpers import fast_overrides, make_imagefolder
from dsnet.cli.main import main
from dsnet.deploy import fuse
from dsnet.deploy.runtime import OnnxRuntimeModel, OpenVINOModel, load_for_inference
from dsnet.engine.inference import CheckpointInfo
from dsnet.export.onnx import check_onnx, export_onnx
from dsnet.export.openvino import export_openvino


def _with_trained_like_norms(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) * 0.5 + 0.75)
    return model.eval()


@pytest.mark.slow
# one model of every zoo family, one block per stage where the family has stages of blocks
@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("dsnet_tiny", {"depths": (1, 1, 1, 1)}),
        ("transxnet_t", {"depths": (1, 1, 1, 1)}),
        ("mixformer_b0", {"depths": (1, 1, 1, 1)}),
        ("mobile_former_26m", {}),
    ],
)
def test_fp32_runtimes_agree_with_eager_at_two_shapes(name, kwargs, tmp_path):
    torch.manual_seed(0)
    eager = _with_trained_like_norms(timm.create_model(name, num_classes=7, **kwargs))
    onnx_path = tmp_path / "m.onnx"
    export_onnx(fuse(eager), onnx_path, image_size=(128, 128), dynamic_size=True)
    xml_path = export_openvino(onnx_path, tmp_path / "m.xml")
    shapes = [(1, 3, 128, 128), (4, 3, 96, 160)]
    for runner in (OnnxRuntimeModel(onnx_path, 1), OpenVINOModel(xml_path, 1)):
        checks = check_onnx(eager, onnx_path, shapes, runner=runner)  # against the unfused eager model
        assert [c.shape for c in checks] == shapes
        assert all(c.max_abs_diff <= 1e-4 for c in checks), (type(runner).__name__, checks)


def test_openvino_bf16_is_opt_in_and_checked(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(1)).eval()
    export_onnx(model, tmp_path / "m.onnx", image_size=(32, 32))
    with pytest.raises(ValueError, match="f32 or bf16"):
        OpenVINOModel(tmp_path / "m.onnx", precision="fp16")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A trained run, its fp32 ONNX, fp32 IR and int8 ONNX artefacts (through the CLI)."""
    root = make_imagefolder(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("runs")
    argv = ["train"] + [a for o in fast_overrides(root, out, **{"sched.epochs": 3}) for a in ("--set", o)]
    assert main(argv) == 0
    (run_dir,) = list(out.iterdir())
    work = tmp_path_factory.mktemp("artefacts")
    paths = {"onnx": work / "m.onnx", "xml": work / "m.xml", "int8": work / "m.int8.onnx"}
    assert main(["export", str(run_dir), str(paths["onnx"]), "--threads", "1"]) == 0
    assert main(["export", str(run_dir), str(paths["xml"]), "--threads", "1"]) == 0
    calib = ["--int8", "--calib", str(root / "train"), "--threads", "1"]
    assert main(["export", str(run_dir), str(paths["int8"]), *calib]) == 0
    return run_dir, root, paths


def _predict(capsys, *argv):
    assert main(["predict", *argv, "--json", "--threads", "1"]) == 0
    return {p["path"]: p for p in json.loads(capsys.readouterr().out)}


def test_predict_backends_give_the_torch_top1(exported, capsys):
    run_dir, root, paths = exported
    images = str(root / "val")
    eager = _predict(capsys, str(run_dir), images, "--no-fuse")
    for argv in (
        [str(run_dir), images],  # fused torch
        [str(paths["onnx"]), images],
        [str(paths["xml"]), images],
        [str(paths["onnx"]), images, "--backend", "openvino"],  # OpenVINO reads ONNX too
    ):
        got = _predict(capsys, *argv)
        assert got.keys() == eager.keys()
        for path, want in eager.items():
            assert got[path]["indices"][0] == want["indices"][0], argv
            assert got[path]["probs"][0] == pytest.approx(want["probs"][0], abs=1e-4), argv
            assert got[path]["labels"] == want["labels"]


def test_int8_artefact_runs_and_eval_reports_accuracy(exported, capsys, tmp_path):
    _, _, paths = exported
    sidecar = json.loads((paths["int8"].parent / "m.int8.onnx.json").read_text())
    assert sidecar["int8"] is True and sidecar["classes"] == ["circle", "square", "stripes"][: len(sidecar["classes"])]
    assert main(["eval", str(paths["int8"]), "--json", "--output", str(tmp_path / "ev")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_samples"] == 12 and 0 <= result["top1"] <= 100
    record = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert record["backend"] == "onnxruntime"
    model, info = load_for_inference(paths["int8"])
    assert isinstance(info, CheckpointInfo) and info.model == "test_convnext"
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 3)  # dynamic batch survived quantization


def test_backend_errors_are_one_line(exported, capsys, tmp_path):
    run_dir, root, paths = exported
    assert main(["predict", str(run_dir), str(root / "val"), "--backend", "onnxruntime"]) == 2
    assert "runs an exported .onnx or .xml file" in capsys.readouterr().err
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(paths["onnx"].read_bytes())
    assert main(["predict", str(lonely), str(root / "val")]) == 2
    assert "lonely.onnx.json" in capsys.readouterr().err
    assert main(["export", str(run_dir), str(tmp_path / "m.int8.onnx"), "--int8"]) == 2
    assert "--calib" in capsys.readouterr().err
    unreadable = tmp_path / "calib"
    unreadable.mkdir()
    (unreadable / "a.jpg").write_text("not an image")
    assert main(["export", str(run_dir), str(tmp_path / "m.int8.onnx"), "--int8", "--calib", str(unreadable)]) == 2
    assert "none of the 1 calibration images could be read" in capsys.readouterr().err
    assert not (tmp_path / "m.int8.onnx").exists()
    assert main(["export", str(run_dir), str(tmp_path / "m.pt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
