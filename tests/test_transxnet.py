"""TransXNet-specific behaviour: sizes, the input-dependent conv, official checkpoint names, ONNX with dynamic batch.

The generic timm contract is checked for every zoo model in ``test_model_contract.py``. Output parity with the
official implementation cannot run here (it needs mmcv); it is measured outside the test suite, see the model
file. What CI checks instead is that every official parameter name and shape maps onto our model.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn.functional as F

import dsnet  # noqa: F401  (registers the models)
from _official_checkpoints import transxnet_t_official_state_dict
from dsnet.bench.complexity import count_macs, count_params
from dsnet.export.onnx import check_onnx, export_onnx
from dsnet.layers.per_sample_conv import (
    _grouped_conv,
    _scanned_conv,
    _tap_products,
    per_sample_depthwise_conv2d,
)
from dsnet.models.transxnet import TransXNet, checkpoint_filter_fn, resize_relative_pos_bias

# Parameter counts of the official models (LMMMEng/TransXNet, built with mmcv), in millions.
OFFICIAL_PARAMS_M = {"transxnet_t": 12.835, "transxnet_s": 26.864, "transxnet_b": 48.009}


def _small(**kwargs) -> TransXNet:
    """TransXNet-T widths with one block per stage: every code path of the family, a fraction of the cost."""
    torch.manual_seed(0)
    return timm.create_model("transxnet_t", depths=(1, 1, 1, 1), **kwargs).eval()


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values in every float tensor (also BN statistics, LayerScale, position bias): all paths matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.2)


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS_M))
def test_param_count_matches_official(name):
    model = timm.create_model(name, device="meta")
    assert count_params(model) / 1e6 == pytest.approx(OFFICIAL_PARAMS_M[name], rel=1e-3)


def test_macs_of_tiny_match_paper():
    model = timm.create_model("transxnet_t", device="meta")  # FLOPs are counted from shapes: no real compute
    assert count_macs(model) / 1e9 == pytest.approx(1.8, rel=0.05)


@pytest.mark.parametrize("size", [(32, 32), (50, 70)])
def test_any_input_size(size):
    model = _small(num_classes=5)
    _randomize(model)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        features = model.forward_intermediates(x, intermediates_only=True)
        logits = model(x)
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()
    expected = []
    h, w = -(-size[0] // 4), -(-size[1] // 4)
    for i, dim in enumerate((48, 96, 224, 448)):
        if i:
            h, w = -(-h // 2), -(-w // 2)
        expected.append((2, dim, h, w))
    assert [tuple(f.shape) for f in features] == expected


def test_relative_pos_bias_is_resized_to_the_token_grid():
    table = torch.randn(1, 2, 56 * 56, 7 * 7)
    at_224 = torch.zeros(1, 8, 56, 56)
    assert resize_relative_pos_bias(table, at_224, sr_ratio=8) is table  # trained size: used as is
    # 50×70 input → 13×18 tokens in stage 1 → 2×3 keys after the stride-8 overlapping reduction
    resized = resize_relative_pos_bias(table, torch.zeros(1, 8, 13, 18), sr_ratio=8)
    assert resized.shape == (1, 2, 13 * 18, 2 * 3)
    # the model's attention uses exactly that shape: kv grid of the real spatial reduction conv
    model = _small()
    osra = model.stages[0].blocks[0].mixer.osra
    assert osra.spatial_reduction(torch.zeros(1, 24, 13, 18)).shape[-2:] == (2, 3)


def test_per_sample_depthwise_conv_matches_one_conv_per_sample():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 9, 11, generator=gen)
    weight = torch.randn(3, 5, 7, 7, generator=gen)
    bias = torch.randn(3, 5, generator=gen)
    expected = torch.cat(
        [F.conv2d(x[b : b + 1], weight[b].unsqueeze(1), bias[b], padding=3, groups=5) for b in range(3)]
    )
    torch.testing.assert_close(per_sample_depthwise_conv2d(x, weight, bias), expected)
    # both export formulations (scan over the batch, one-hot tap products) agree, with and without bias
    for export_form in (_scanned_conv, _tap_products):
        torch.testing.assert_close(export_form(x, weight, bias), _grouped_conv(x, weight, bias))
        torch.testing.assert_close(export_form(x, weight, None), _grouped_conv(x, weight, None))


def test_idconv_kernels_depend_on_the_input():
    model = _small()
    _randomize(model)
    idconv = model.stages[0].blocks[0].mixer.idconv
    x = torch.randn(2, 24, 16, 16)
    with torch.no_grad():
        out_pair = idconv(x)
        out_single = idconv(x[:1])
        # the same sample gives the same output whatever else is in the batch (kernels are per sample)
        torch.testing.assert_close(out_pair[:1], out_single)
        # a static depth-wise conv would be linear in the input; IDConv is not (kernels change with x)
        assert not torch.allclose(idconv(2 * x) - idconv(torch.zeros_like(x)), 2 * (out_pair - idconv(0 * x)))


def _official_state_dict() -> dict[str, torch.Tensor]:
    return transxnet_t_official_state_dict()


def test_every_official_key_maps_with_matching_shape():
    official = _official_state_dict()
    assert len(official) == 1508
    model = timm.create_model("transxnet_t", device="meta")
    converted = checkpoint_filter_fn({"state_dict": official}, model)
    ours = model.state_dict()
    assert sorted(converted) == sorted(ours)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ours.items()}


def test_official_checkpoint_loads_and_maps_values(tmp_path):
    """Through timm's own pretrained path: a .pth.tar in official names, wrapped like the release."""
    official = _official_state_dict()
    gen = torch.Generator().manual_seed(0)
    for value in official.values():
        if value.is_floating_point():
            value.copy_(torch.randn(value.shape, generator=gen))
    path = tmp_path / "transx-t.pth.tar"
    torch.save({"state_dict": official, "epoch": 300}, path)
    model = timm.create_model("transxnet_t", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    ours = model.state_dict()
    block = "network.4.8.token_mixer"  # last block of stage 3 (network index 4)
    torch.testing.assert_close(
        ours["stages.2.blocks.8.mixer.idconv.kernel_bank"], official[f"{block}.local_unit.weight"]
    )
    torch.testing.assert_close(
        ours["stages.2.blocks.8.mixer.ste.norm2.running_var"], official[f"{block}.proj.5.running_var"]
    )
    torch.testing.assert_close(ours["stages.3.downsample.conv.weight"], official["network.5.proj.conv.weight"])
    torch.testing.assert_close(ours["stages.1.relative_pos_bias"], official["relative_pos_enc.1"])
    torch.testing.assert_close(
        ours["stages.0.blocks.2.layer_scale2.weight"].flatten(), official["network.0.2.layer_scale_2.weight"].flatten()
    )
    torch.testing.assert_close(ours["head.fc.weight"], official["classifier.2.weight"].flatten(1))
    torch.testing.assert_close(ours["norm.weight"], official["classifier.0.weight"])


def test_filter_passes_our_names_and_rejects_wrong_checkpoints():
    model = _small()
    ours = model.state_dict()
    assert checkpoint_filter_fn(ours, model).keys() == ours.keys()
    with pytest.raises(ValueError, match=r"stages\.0\.blocks\.0\.dpe\.weight"):
        checkpoint_filter_fn({**ours, "stages.0.blocks.0.dpe.weight": torch.zeros(48, 1, 3, 3)}, model)
    with pytest.raises(ValueError, match="match nothing"):
        checkpoint_filter_fn({**ours, "network.0.0.not_a_layer.weight": torch.zeros(1)}, model)


def test_filter_resizes_a_bias_table_trained_at_another_size():
    model = _small()  # tables for 224
    state_dict = dict(model.state_dict())
    state_dict["stages.0.relative_pos_bias"] = torch.randn(1, 1, 96 * 96, 12 * 12)  # the 384 px release
    converted = checkpoint_filter_fn(state_dict, model)
    assert converted["stages.0.relative_pos_bias"].shape == (1, 1, 56 * 56, 7 * 7)


def test_onnx_export_with_dynamic_batch(tmp_path):
    """One dynamo export (traced at batch 2), run by onnxruntime at batch 1 and 3."""
    model = _small(num_classes=10)
    _randomize(model)
    path = tmp_path / "transxnet.onnx"
    example = torch.randn(2, 3, 64, 64)
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(model, (example,), path, dynamo=True, dynamic_shapes=({0: batch},), input_names=["x"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch_size in (1, 3):
        x = torch.randn(batch_size, 3, 64, 64)
        with torch.no_grad():
            expected = model(x).numpy()
        (out,) = session.run(None, {"x": x.numpy()})
        assert out.shape == (batch_size, 10)
        assert np.abs(out - expected).max() <= 1e-4


def test_onnx_export_with_dynamic_size_is_exact_below_and_above_the_traced_size(tmp_path):
    """One export traced at 128², dynamic batch and size: smaller inputs used to hit baked-in pooling gathers."""
    model = _small(num_classes=10)
    _randomize(model)
    report = export_onnx(model, tmp_path / "transxnet.onnx", image_size=(128, 128), dynamic_size=True, check=False)
    checks = check_onnx(model, report.path, [(1, 3, 32, 32), (1, 3, 96, 160), (2, 3, 145, 137)])
    assert max(c.max_abs_diff for c in checks) <= 1e-4, checks
