"""MixFormer-specific behaviour: sizes of the variants, any input size, the mixing maths, Paddle weight conversion.

The generic model contract (meta device, forward_intermediates, FX, ...) is in test_model_contract.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import get_relative_position_index
from torch import nn

import dsnet  # noqa: F401  (registers the models)
from _official_checkpoints import mixformer_b0_to_paddle, official_keys, write_pdparams
from dsnet.bench.complexity import count_macs, count_params
from dsnet.convert.checkpoint import CheckpointMismatchError
from dsnet.convert.pickle_safe import load_pdparams
from dsnet.models.mixformer import ConvDownsample, MixingAttention, checkpoint_filter_fn, paddle_key_to_ours

FIXTURE = Path(__file__).parent / "fixtures" / "mixformer_b0_paddle_keys.txt"

# Parameters (M) counted from the official model (PaddleClas mixformer.py), and the paper's FLOPs (G, = MACs)
# at 224×224.
TARGET_PARAMS_M = {"b0": 5.10, "b1": 7.89, "b2": 9.89, "b3": 16.75, "b4": 34.80, "b5": 61.69, "b6": 119.51}


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random parameters and BN statistics, so that no term of the maths is trivially zero or one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype.is_floating_point:
                noise = torch.randn(t.shape, generator=g) * 0.2
                t.copy_(noise.abs() + 0.5 if name.endswith("running_var") else noise + (t == 1).float())
    return module.eval()


def _official_keys() -> dict[str, tuple[tuple[int, ...], str]]:
    """key → (shape, dtype) of the official PaddleClas MixFormer-B0 state dict (generated from the official code)."""
    return official_keys(FIXTURE)


def _fake_paddle_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays in the official layout (what ``paddle.save`` would store), with the real position index."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, (shape, dtype) in _official_keys().items():
        if key.endswith("relative_position_index"):
            out[key] = get_relative_position_index(7, 7).numpy().astype(dtype)
        elif key.endswith("_variance"):
            out[key] = rng.uniform(0.5, 1.5, shape).astype(dtype)
        else:
            out[key] = rng.standard_normal(shape).astype(dtype) * 0.1
    return out


@pytest.mark.parametrize("variant", sorted(TARGET_PARAMS_M))
def test_parameter_count_matches_the_official_model(variant):
    params = count_params(timm.create_model(f"mixformer_{variant}", device="meta")) / 1e6
    assert abs(params / TARGET_PARAMS_M[variant] - 1) < 0.005, params


def test_macs_of_b0_match_the_paper():
    macs = count_macs(timm.create_model("mixformer_b0")) / 1e9
    assert abs(macs / 0.4 - 1) < 0.05, macs


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (70, 45)])
def test_any_input_size_works_with_ceil_sizes_per_stage(size):
    torch.manual_seed(0)
    model = timm.create_model("mixformer_b0").eval()
    with torch.no_grad():
        features = model.forward_intermediates(torch.randn(2, 3, *size), intermediates_only=True)
        logits = model(torch.randn(2, 3, *size))
    h, w = math.ceil(size[0] / 4), math.ceil(size[1] / 4)
    for i, f in enumerate(features):
        assert f.shape == (2, 24 * 2**i, h, w)
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()


def test_downsampling_pads_odd_sizes_after_the_norm():
    down = _randomise(ConvDownsample(8, 16))
    x = torch.randn(2, 8, 5, 7)
    normalised = F.batch_norm(x, down.norm.running_mean, down.norm.running_var, down.norm.weight, down.norm.bias)
    expected = F.conv2d(F.pad(normalised, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    with torch.no_grad():
        torch.testing.assert_close(down(x), expected)
    assert down(x).shape == (2, 16, 3, 4)


def _naive_mixing(m: MixingAttention, x: torch.Tensor) -> torch.Tensor:
    """The Mixing Block's mixing written out window by window and head by head (x: (B, H, W, C), eval mode)."""
    batch, height, width, channels = x.shape
    ws, heads, hd = m.window_size, m.num_heads, m.head_dim
    x_attn = m.attn_in_norm(m.attn_in_proj(x))
    x_conv = m.depthwise_conv(m.conv_in_norm(m.conv_in_proj(x)).permute(0, 3, 1, 2))
    value_gate = torch.sigmoid(m.channel_interaction(x_conv.mean((2, 3), keepdim=True))).flatten(1)  # (B, C/2)
    x_conv = m.conv_out_proj(x_conv)
    cells = [(i, j) for i in range(ws) for j in range(ws)]
    table = m.relative_position_bias_table
    bias = torch.stack(
        [
            torch.stack([table[(p[0] - q[0] + ws - 1) * (2 * ws - 1) + p[1] - q[1] + ws - 1] for q in cells])
            for p in cells
        ]
    )  # (N, N, heads)
    attended = torch.zeros(batch, height, width, channels // 2)
    for b in range(batch):
        for top in range(0, height, ws):
            for left in range(0, width, ws):
                tokens = x_attn[b, top : top + ws, left : left + ws].reshape(ws * ws, -1)
                q, k, v = m.qkv(tokens).chunk(3, dim=-1)
                v = v * value_gate[b]
                outs = []
                for h in range(heads):
                    part = slice(h * hd, (h + 1) * hd)
                    weights = (q[:, part] @ k[:, part].T / math.sqrt(hd) + bias[:, :, h]).softmax(-1)
                    outs.append(weights @ v[:, part])
                attended[b, top : top + ws, left : left + ws] = torch.cat(outs, -1).reshape(ws, ws, -1)
    position_gate = torch.sigmoid(m.spatial_interaction(attended.permute(0, 3, 1, 2)))
    x_conv = m.conv_out_norm(x_conv * position_gate).permute(0, 2, 3, 1)
    return m.proj(torch.cat([m.attn_out_norm(attended), x_conv], dim=-1))


def test_mixing_attention_matches_a_window_by_window_reference():
    torch.manual_seed(0)
    mixing = _randomise(MixingAttention(dim=32, num_heads=2, window_size=7))
    x = torch.randn(2, 14, 21, 32)
    with torch.no_grad():
        torch.testing.assert_close(mixing(x), _naive_mixing(mixing, x), atol=1e-5, rtol=1e-4)


def test_stochastic_depth_rises_linearly_over_all_blocks():
    model = timm.create_model("mixformer_b6", device="meta", drop_path_rate=0.5)
    blocks = [b for stage in model.stages for b in stage.blocks]
    assert isinstance(blocks[0].drop_path1, nn.Identity)
    assert blocks[-1].drop_path1.drop_prob == pytest.approx(0.5)
    assert blocks[17].drop_path2.drop_prob == pytest.approx(0.5 * 17 / 33)


def test_unpooled_head_gives_a_logit_map_and_bad_pool_is_refused():
    model = timm.create_model("mixformer_b0", num_classes=5, global_pool="").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 96)).shape == (2, 5, 2, 3)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(5, global_pool="median")


def test_official_keys_map_onto_b0_with_transposed_linears():
    paddle = _fake_paddle_state_dict()
    model = timm.create_model("mixformer_b0")
    converted = checkpoint_filter_fn(paddle, model)
    model.load_state_dict(converted, strict=True)  # exactly our keys
    ours = model.state_dict()
    # Linear weights are stored [in, out] by Paddle; a square one proves the transpose is applied
    square = paddle["layers.0.blocks.0.attn.proj.weight"]
    assert square.shape[0] == square.shape[1]
    assert torch.equal(ours["stages.0.blocks.0.mixing.proj.weight"], torch.from_numpy(square).T)
    assert torch.equal(ours["head.fc.weight"], torch.from_numpy(paddle["head.weight"]).T)
    assert torch.equal(ours["head.proj.weight"], torch.from_numpy(paddle["last_proj.weight"]).T)
    # convolutions keep their layout; official stage i's downsampling starts our stage i + 1
    assert torch.equal(
        ours["stages.1.downsample.conv.weight"], torch.from_numpy(paddle["layers.0.downsample.reduction.weight"])
    )
    assert torch.equal(
        ours["stages.3.blocks.5.mixing.depthwise_conv.bn.running_var"],
        torch.from_numpy(paddle["layers.3.blocks.5.attn.dwconv3x3.1._variance"]),
    )
    assert paddle_key_to_ours("layers.2.blocks.0.attn.relative_position_index") is None


def test_pdparams_round_trip_through_the_restricted_unpickler(tmp_path):
    torch.manual_seed(0)
    model = _randomise(timm.create_model("mixformer_b0"))
    path = write_pdparams(tmp_path / "MixFormer_B0.pdparams", mixformer_b0_to_paddle(model))

    restored = timm.create_model("mixformer_b0").eval()
    restored.load_state_dict(checkpoint_filter_fn(load_pdparams(path), restored), strict=True)
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x), atol=0, rtol=0)


def test_conversion_refuses_foreign_keys_shapes_and_position_indices():
    model = timm.create_model("mixformer_b0", device="meta")
    paddle = _fake_paddle_state_dict()
    with pytest.raises(ValueError, match="not a parameter of the official"):
        checkpoint_filter_fn({**paddle, "layers.0.blocks.0.attn.extra.weight": np.zeros(3)}, model)
    wrong_shape = {**paddle, "head.weight": np.zeros((1280, 10), np.float32)}
    with pytest.raises(CheckpointMismatchError, match=r"head\.fc\.weight"):
        checkpoint_filter_fn(wrong_shape, model)
    missing = {k: v for k, v in paddle.items() if k != "norm.bias"}
    with pytest.raises(CheckpointMismatchError, match=r"missing keys.*\n.*norm\.bias"):
        checkpoint_filter_fn(missing, model)
    shuffled = dict(paddle)
    shuffled["layers.1.blocks.1.attn.relative_position_index"] = np.zeros((49, 49), np.int64)
    with pytest.raises(ValueError, match="relative position index"):
        checkpoint_filter_fn(shuffled, model)


def test_weights_provenance_without_download_url():
    cfg = timm.models.get_pretrained_cfg("mixformer_b1")
    assert not cfg.url and cfg.origin_url.endswith("MixFormer_B1_pretrained.pdparams")
    assert cfg.mean == (0.485, 0.456, 0.406) and cfg.interpolation == "bicubic" and cfg.crop_pct == 0.875
    with pytest.raises(ValueError, match=r"no MixFormer weights.*dsnet convert paddle .*--model mixformer_b1"):
        timm.create_model("mixformer_b1", pretrained=True)
