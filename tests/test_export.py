"""ONNX export of every model family, checked in onnxruntime at other batch and image sizes than traced."""

from __future__ import annotations

import onnx
import pytest
import timm
import torch

import dsnet  # noqa: F401
from dsnet.cli.main import main
from dsnet.export.onnx import check_onnx, export_onnx

# The families whose ONNX graph stays exact at any input size from one export (MixFormer too, from 33 px, see
# test_mixformer_exports_with_a_dynamic_size).
DYNAMIC_SIZE_FAMILIES = ["dsnet_tiny", "dsnet_tiny_concat", "transxnet_t"]


@pytest.mark.slow
@pytest.mark.parametrize("name", DYNAMIC_SIZE_FAMILIES)
def test_export_dynamic_batch_and_size(name, tmp_path):
    torch.manual_seed(0)
    # one block per stage: every operator of the family is exported, at a fraction of the full model's cost
    model = timm.create_model(name, num_classes=7, depths=(1, 1, 1, 1))
    # 128 px: no feature map of the example has a dimension of 1 (torch.export would specialize it)
    report = export_onnx(model, tmp_path / f"{name}.onnx", image_size=(128, 128), dynamic_size=True)
    shapes = [c.shape for c in report.checks]
    # traced batch 2, another batch, another (odd) image size: none of them may be baked in
    assert shapes == [(2, 3, 128, 128), (3, 3, 128, 128), (2, 3, 145, 137)]
    assert report.max_abs_diff <= 1e-4, report.checks
    # sizes the parity check did not try, down to the smallest input the zoo accepts
    for check in check_onnx(model, report.path, [(1, 3, 96, 160), (1, 3, 32, 32)]):
        assert check.max_abs_diff <= 1e-4, check
    if name == "transxnet_t":
        # IDConv's per-sample kernels: one Scan of a depth-wise Conv per block, not K² tap products
        ops = [node.op_type for node in onnx.load(report.path).graph.node]
        assert ops.count("Scan") == 4, ops


@pytest.mark.slow
def test_mixformer_exports_with_a_dynamic_size(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("mixformer_b0", num_classes=7, depths=(1, 1, 1, 1)).eval()
    report = export_onnx(model, tmp_path / "mixformer_b0.onnx", image_size=(96, 80), dynamic_size=True)
    # traced at 256 px internally (every stage ≥ 2 windows per side); checked at the asked size and an odd one
    assert [c.shape for c in report.checks] == [(2, 3, 96, 80), (3, 3, 96, 80), (2, 3, 113, 89)]
    assert report.max_abs_diff <= 1e-4, report.checks
    # stage sides (after the stem's /4 and three ceil(/2)): 33 → 9, 5, 3, 2 (one window each, 2 px grids);
    # 224 → 56, 28, 14, 7 (no window padding at all); 77×51 → odd sizes padded at every downsampling;
    # 480×352 → several windows per side in every stage
    shapes = [(1, 3, 33, 40), (4, 3, 224, 224), (1, 3, 77, 51), (1, 3, 480, 352)]
    for check in check_onnx(model, report.path, shapes):
        assert check.max_abs_diff <= 1e-4, check
    with pytest.raises(ValueError, match="symbolic image size from 33 px"):
        export_onnx(model, tmp_path / "never.onnx", image_size=(32, 64), dynamic_size=True)


@pytest.mark.slow
def test_export_dynamic_batch_fixed_size(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("mixformer_b0", num_classes=7, depths=(1, 1, 1, 1))
    report = export_onnx(model, tmp_path / "mixformer_b0.onnx", image_size=(96, 80))
    assert [c.shape for c in report.checks] == [(2, 3, 96, 80), (3, 3, 96, 80)]
    assert report.max_abs_diff <= 1e-4, report.checks
    assert check_onnx(model, report.path, [(5, 3, 96, 80)])[0].max_abs_diff <= 1e-4


def test_export_refuses_a_symbolic_size_the_model_cannot_take(tmp_path):
    class FixedSize(torch.nn.Module):
        in_chans = 3
        onnx_dynamic_size = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)

    with pytest.raises(ValueError, match="does not export with a symbolic image size"):
        export_onnx(FixedSize(), tmp_path / "never.onnx", image_size=(32, 32), dynamic_size=True)


def test_export_reports_a_mismatch(tmp_path):
    """A model whose ONNX graph disagrees with PyTorch must not pass the check silently."""

    class Drifting(torch.nn.Module):
        in_chans = 3

        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).mean((2, 3))

    model = Drifting()
    path = tmp_path / "m.onnx"
    export_onnx(model, path, image_size=(32, 32), check=False)
    with torch.no_grad():
        model.conv.bias.add_(1.0)  # PyTorch now differs from the exported graph
    checks = check_onnx(model, path, [(2, 3, 32, 32)])
    assert checks[0].max_abs_diff == pytest.approx(1.0, abs=1e-5)


def test_export_rejects_tiny_example(tmp_path):
    with pytest.raises(ValueError, match="at least 32"):
        export_onnx(timm.create_model("resnet18"), tmp_path / "x.onnx", image_size=(16, 16))


def test_cli_export(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code = main(["export", "dsnet_tiny", str(out), "--image-size", "64x48", "--num-classes", "5"])
    assert code == 0
    assert out.stat().st_size > 1_000_000
    printed = capsys.readouterr().out
    assert "max abs diff" in printed and "(3, 3, 64, 48)" in printed


def test_cli_export_unknown_model(tmp_path, capsys):
    code = main(["export", "dsnet_tinny", str(tmp_path / "m.onnx")])
    assert code == 2
    assert "unknown model 'dsnet_tinny'" in capsys.readouterr().err
