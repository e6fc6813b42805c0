"""DS-Net specifics: published sizes, the paper's Table 2/3 options, input sizes, schedules, reference equivalence."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import DropPath
from torch import nn

import dsnet  # noqa: F401  (registers the models)
from dsnet.bench.complexity import count_macs, count_params
from dsnet.models import PAPER_FIGURES
from dsnet.models.dsnet import DSBlock, DSNet, checkpoint_filter_fn, resize_to_global_grid

# Targets: (params, GMACs at 224×224) of the DS-Net paper, Table 2, and of the PaddleClas release checkpoints;
# base_concat has no verified MAC figure.
TARGETS = {
    "dsnet_tiny": (10.534e6, 1.83),
    "dsnet_small": (23.005e6, 3.55),
    "dsnet_base": (49.344e6, 8.29),
    "dsnet_tiny_concat": (9.096e6, 1.58),
    "dsnet_small_concat": (19.609e6, 3.06),
    "dsnet_base_concat": (41.81e6, None),
}
# Paper Table 2 (DS-Net-T, concatenation only): α → params in millions.
TABLE2_PARAMS = {0.0: 8.6, 0.25: 8.7, 0.5: 9.1, 0.75: 9.8, 1.0: 10.7}
TABLE2_GFLOPS = {0.0: 1.573, 0.25: 1.578, 0.5: 1.592, 0.75: 1.615, 1.0: 1.647}
# One block per stage: every stage (and its global grid) is exercised at a fraction of the cost.
SHALLOW = dict(depths=(1, 1, 1, 1))


@functools.cache
def _tiny_eval() -> nn.Module:
    """dsnet_tiny in eval mode, shared by tests that only run inference."""
    torch.manual_seed(0)
    return timm.create_model("dsnet_tiny").eval()


def _blocks(model: nn.Module) -> list[DSBlock]:
    return [m for m in model.modules() if isinstance(m, DSBlock)]


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters, as trained weights have."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


# --- sizes --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_params_and_macs_match_verified_targets(name):
    params, gmacs = TARGETS[name]
    model = timm.create_model(name, device="meta")
    assert count_params(model) == pytest.approx(params, rel=1e-3)
    if gmacs is not None:
        assert count_macs(model) / 1e9 == pytest.approx(gmacs, rel=0.03)


@pytest.mark.parametrize(("alignment", "per_d2", "per_d"), [(True, 12.75, 35.5), (False, 10.75, 29.5)])
@pytest.mark.parametrize("dim", [64, 320])
def test_block_parameter_formula(alignment, per_d2, per_d, dim):
    """Counted from the block definition (PaddleClas dsnet.py): 12.75·d² + 35.5·d parameters per block with
    alignment, 10.75·d² + 29.5·d without."""
    block = DSBlock(dim, num_heads=dim // 64 or 1, global_stride=2, alignment=alignment, device="meta")
    assert count_params(block) == per_d2 * dim**2 + per_d * dim


def test_state_dict_names_follow_the_contract():
    model = timm.create_model("dsnet_tiny", device="meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    b = "stages.0.blocks.0."
    expected = {
        "stages.0.downsample.weight": (64, 3, 4, 4),
        "stages.1.downsample.weight": (128, 64, 2, 2),
        b + "pos_embed.weight": (64, 1, 3, 3),
        b + "norm1.running_var": (64,),
        b + "proj_in.weight": (64, 64, 1, 1),
        b + "local_norm.weight": (32,),
        b + "local_conv.weight": (32, 1, 3, 3),
        b + "global_norm.weight": (32,),
        b + "global_qkv.weight": (96, 32),
        b + "alignment.local_norm.running_mean": (32,),
        b + "alignment.local_qkv.weight": (96, 32, 1, 1),
        b + "alignment.global_norm.bias": (32,),
        b + "alignment.global_qkv.weight": (96, 32),
        b + "alignment.local_proj.weight": (32, 32),
        b + "alignment.global_proj.weight": (32, 32),
        b + "proj_out.weight": (64, 64, 1, 1),
        b + "norm2.weight": (64,),
        b + "mlp.fc1.weight": (256, 64, 1, 1),
        b + "mlp.fc2.weight": (64, 256, 1, 1),
        "norm.running_mean": (512,),
        "head.fc.weight": (1000, 512),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    assert model.stages[1].downsample.bias is not None
    assert model.stages[0].blocks[0].global_norm.eps == 1e-5
    concat_keys = set(timm.create_model("dsnet_tiny_concat", device="meta").state_dict())
    assert concat_keys == {k for k in shapes if ".alignment." not in k}


def test_paper_figures():
    assert PAPER_FIGURES["dsnet_tiny"].params_m == 10.5 and PAPER_FIGURES["dsnet_tiny"].top1 == 79.0
    assert PAPER_FIGURES["dsnet_small"].gmacs == 3.5 and PAPER_FIGURES["dsnet_small"].top1 == 82.3
    assert PAPER_FIGURES["dsnet_base"].params_m == 49.3 and PAPER_FIGURES["dsnet_base"].top1 == 83.1
    assert PAPER_FIGURES["dsnet_tiny_concat"].params_m == 9.1
    assert PAPER_FIGURES["dsnet_small_concat"].params_m == 19.7
    assert PAPER_FIGURES["dsnet_base_concat"].params_m == 48.8  # the open discrepancy: we build 41.81 M


# --- α (paper Table 2) ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", sorted(TABLE2_PARAMS))
def test_global_ratio_sweep_matches_table2(alpha):
    model = timm.create_model("dsnet_tiny_concat", global_ratio=alpha, device="meta")
    assert round(count_params(model) / 1e6, 1) == TABLE2_PARAMS[alpha]
    block = _blocks(model)[0]
    assert (block.global_qkv is None) == (alpha == 0.0)
    assert (block.local_conv is None) == (alpha == 1.0)
    assert block.global_dim == round(alpha * 64)
    # The paper's counter adds a constant ~0.013 G (ours: 1.579 G at α = 0.5); the change with α must agree.
    half = timm.create_model("dsnet_tiny_concat", device="meta")
    delta = (count_macs(model) - count_macs(half)) / 1e9
    assert delta == pytest.approx(TABLE2_GFLOPS[alpha] - TABLE2_GFLOPS[0.5], abs=0.002)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_single_stream_models_run(alpha):
    model = timm.create_model("dsnet_tiny_concat", global_ratio=alpha, num_classes=4, **SHALLOW)
    out = model(torch.randn(2, 3, 32, 48))
    out.sum().backward()
    assert out.shape == (2, 4)
    assert all(p.grad is not None for p in model.parameters())


def test_alignment_with_uneven_split():
    """α ≠ 0.5 with alignment: attention width = global width g, local q/k/v project l → 3g, G→L maps g → l."""
    model = timm.create_model("dsnet_tiny", global_ratio=0.25, num_classes=4, **SHALLOW)
    block = model.stages[0].blocks[0]
    assert (block.global_dim, block.local_dim) == (16, 48)
    assert block.alignment.local_qkv.weight.shape == (48, 48, 1, 1)  # 3g × l
    assert block.alignment.local_proj.weight.shape == (48, 16)  # l × g
    assert block.alignment.global_proj.weight.shape == (16, 16)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_alignment_needs_both_streams():
    with pytest.raises(ValueError, match="both streams"):
        timm.create_model("dsnet_tiny", global_ratio=0.0, device="meta")


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_global_ratio_out_of_range(bad):
    with pytest.raises(ValueError, match="global_ratio"):
        timm.create_model("dsnet_tiny_concat", global_ratio=bad, device="meta")


def test_heads_must_divide_global_width():
    # α = 0.3 → stage 3 global width round(0.3 · 320) = 96, not divisible by its 5 heads
    with pytest.raises(ValueError, match=r"96.*num_heads=5"):
        timm.create_model("dsnet_tiny_concat", global_ratio=0.3, device="meta")


# --- Table 3 ablations ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "absent"),
    [
        (dict(local_stream=False), ["local_conv", "local_norm"]),
        (dict(global_stream=False), ["global_qkv", "global_norm"]),
        (dict(global_to_local=False), ["alignment.local_proj"]),
        (dict(local_to_global=False), ["alignment.global_proj"]),
    ],
)
def test_table3_ablations(kwargs, absent):
    full = timm.create_model("dsnet_tiny", device="meta")
    assert count_params(timm.create_model("dsnet_tiny", device="meta", **kwargs)) < count_params(full)
    torch.manual_seed(0)
    model = timm.create_model("dsnet_tiny", num_classes=3, **kwargs, **SHALLOW)
    keys = set(model.state_dict())
    block_keys = {k.split("stages.0.blocks.0.", 1)[1] for k in keys if k.startswith("stages.0.blocks.0.")}
    for name in absent:
        assert not any(k.startswith(name + ".") for k in block_keys), name
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 3)
    assert all(p.grad is not None for p in model.parameters())  # one-direction alignment has no dead q/k/v


def test_one_direction_alignment_projects_only_what_it_uses():
    g2l = timm.create_model("dsnet_tiny", local_to_global=False, device="meta").stages[0].blocks[0].alignment
    assert g2l.local_qkv.out_channels == 32  # local queries only
    assert g2l.global_qkv.out_features == 64  # global keys and values
    l2g = timm.create_model("dsnet_tiny", global_to_local=False, device="meta").stages[0].blocks[0].alignment
    assert l2g.local_qkv.out_channels == 64 and l2g.global_qkv.out_features == 32


def test_without_both_directions_equals_concat_model():
    ablated = timm.create_model("dsnet_tiny", global_to_local=False, local_to_global=False, device="meta")
    concat = timm.create_model("dsnet_tiny_concat", device="meta")
    assert {k: v.shape for k, v in ablated.state_dict().items()} == {k: v.shape for k, v in concat.state_dict().items()}


# --- input sizes and the global grid --------------------------------------------------------------------------------


def _global_grids(model: nn.Module, size: tuple[int, int]) -> list[int]:
    """Global token count of the first block of each stage for an input of ``size`` (run on the meta device)."""
    tokens = []
    hooks = [
        stage.blocks[0].global_qkv.register_forward_hook(lambda m, inp, out: tokens.append(inp[0].shape[1]))
        for stage in model.stages
    ]
    model.eval()(torch.zeros(1, 3, *size, device="meta"))
    for h in hooks:
        h.remove()
    return tokens


def test_default_global_grid_follows_reference():
    model = timm.create_model("dsnet_tiny", device="meta")
    assert _global_grids(model, (224, 224)) == [49, 49, 49, 9]  # 7×7 ×3, then 3×3
    assert _global_grids(model, (33, 57)) == [1 * 1, 1 * 1, 1 * 1, 1]  # 8×14 → 1×1; clamped at least 1×1
    assert _global_grids(model, (256, 160)) == [8 * 5, 8 * 5, 8 * 5, 4 * 2]


def test_fixed_global_grid_sizes():
    model = timm.create_model("dsnet_tiny", global_grid_sizes=(4, (2, 3), 2, 1), device="meta")
    assert _global_grids(model, (224, 224)) == [16, 6, 4, 1]
    assert _global_grids(model, (64, 96)) == [16, 6, 4, 1]
    with pytest.raises(ValueError, match="global_grid_sizes"):
        timm.create_model("dsnet_tiny", global_grid_sizes=(4, 4), device="meta")
    with pytest.raises(ValueError, match="positive"):
        timm.create_model("dsnet_tiny", global_grid_sizes=(4, 4, 0, 1), device="meta")


def test_resize_to_global_grid():
    x = torch.randn(1, 2, 14, 15)
    assert resize_to_global_grid(x, 2, None).shape == (1, 2, 7, 7)
    assert resize_to_global_grid(x, 32, None).shape == (1, 2, 1, 1)
    assert resize_to_global_grid(x, 2, (3, 4)).shape == (1, 2, 3, 4)
    torch.testing.assert_close(resize_to_global_grid(x, 1, None), x)  # same size: bilinear is the identity


@pytest.mark.parametrize("size", [(32, 32), (33, 57), (50, 50), (224, 160)])
def test_any_input_size_from_32(size):
    model = _tiny_eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize("size", [(31, 64), (64, 16)])
def test_too_small_input_is_rejected(size):
    model = timm.create_model("dsnet_tiny", device="meta")
    with pytest.raises(ValueError, match=f"{size[0]}x{size[1]}"):
        model(torch.zeros(1, 3, *size, device="meta"))
    with pytest.raises(ValueError, match="at least 32"):
        model.forward_intermediates(torch.zeros(1, 3, *size, device="meta"))


# --- regularisation -------------------------------------------------------------------------------------------------


def _drop_path_rates(model: nn.Module) -> list[list[float]]:
    return [
        [b.drop_path1.drop_prob if isinstance(b.drop_path1, DropPath) else 0.0 for b in stage.blocks]
        for stage in model.stages
    ]


def test_drop_path_schedule_is_linear_over_all_blocks():
    model = timm.create_model("dsnet_tiny", drop_path_rate=0.1, device="meta")
    rates = [r for stage in _drop_path_rates(model) for r in stage]
    assert rates == pytest.approx([0.1 * i / 8 for i in range(9)])
    for block in _blocks(model):  # both residual branches of a block share its rate
        assert getattr(block.drop_path2, "drop_prob", 0.0) == getattr(block.drop_path1, "drop_prob", 0.0)


def test_drop_path_per_stage_reset_matches_reference():
    model = timm.create_model("dsnet_small", drop_path_rate=0.1, drop_path_per_stage_reset=True, device="meta")
    linear = [0.1 * i / 17 for i in range(18)]
    assert _drop_path_rates(model) == [pytest.approx(linear[:d]) for d in (3, 4, 8, 3)]
    assert all(isinstance(stage.blocks[0].drop_path1, nn.Identity) for stage in model.stages)


def test_no_drop_path_by_default():
    model = timm.create_model("dsnet_tiny", device="meta")
    assert not any(isinstance(m, DropPath) for m in model.modules())


def test_attention_dropout_default_and_option():
    model = timm.create_model("dsnet_tiny", device="meta")
    assert all(b.attn_drop == 0.1 and b.alignment.attn_drop == 0.1 for b in _blocks(model))  # reference value
    assert all(b.attn_drop == 0.0 for b in _blocks(timm.create_model("dsnet_tiny", attn_drop_rate=0, device="meta")))
    x = torch.randn(2, 64, 16, 16)
    torch.manual_seed(0)
    block = DSBlock(64, num_heads=1, global_stride=4).train()
    assert not torch.equal(block(x), block(x))  # attention dropout is active in training
    block.eval()
    with torch.no_grad():
        torch.testing.assert_close(block(x), block(x))
    no_drop = DSBlock(64, num_heads=1, global_stride=4, attn_drop=0.0).train()
    assert torch.equal(no_drop(x), no_drop(x))


# --- equivalence with the reference computation ----------------------------------------------------------------------


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return attn.softmax(dim=-1) @ v


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, 3, heads, c // 3 // heads).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, hd)


def _reference_block(block: DSBlock, x: torch.Tensor) -> torch.Tensor:
    """The released model's block, step by step as the PaddleClas code computes it, with explicit softmax."""
    x = x + block.pos_embed(x)
    b, c, h, w = x.shape
    residual = x
    x = block.proj_in(block.norm1(x))
    sa, conv = x[:, : c - c // 2], x[:, c - c // 2 :]  # global = first half
    conv = conv + block.local_conv(block.local_norm(conv))
    sa = F.interpolate(sa, size=(h // block.global_stride, w // block.global_stride), mode="bilinear")
    hd, wd = sa.shape[-2:]
    sa = sa.flatten(2).transpose(1, 2)
    q, k, v = _heads(block.global_qkv(block.global_norm(sa)), block.num_heads)
    sa = sa + _explicit_attention(q, k, v).transpose(1, 2).reshape(b, hd * wd, -1)
    if block.alignment is not None:
        a = block.alignment
        conv_qkv = a.local_qkv(a.local_norm(conv)).flatten(2).transpose(1, 2)
        cq, ck, cv = _heads(conv_qkv, block.num_heads)
        sq, sk, sv = _heads(a.global_qkv(a.global_norm(sa)), block.num_heads)
        g2l = _explicit_attention(cq, sk, sv).transpose(1, 2).reshape(b, h * w, -1)
        conv = conv + a.local_proj(g2l).reshape(b, h, w, -1).permute(0, 3, 1, 2)
        l2g = _explicit_attention(sq, ck, cv).transpose(1, 2).reshape(b, hd * wd, -1)
        sa = sa + a.global_proj(l2g)
    sa = sa.reshape(b, hd, wd, -1).permute(0, 3, 1, 2)
    sa = F.interpolate(sa, size=(h, w), mode="bilinear")
    x = residual + block.proj_out(torch.cat([conv, sa], dim=1))
    return x + block.mlp(block.norm2(x))


def _reference_forward(model: DSNet, x: torch.Tensor) -> torch.Tensor:
    for stage in model.stages:
        x = stage.downsample(x)
        for block in stage.blocks:
            x = _reference_block(block, x)
    return model.head.fc(model.norm(x).flatten(2).mean(-1))


@pytest.mark.parametrize("name", ["dsnet_tiny", "dsnet_tiny_concat"])
def test_matches_reference_computation(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **SHALLOW).eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 64, 80)  # non-square, grids with non-integer resize factors
    with torch.no_grad():
        ours = model(x)
        reference = _reference_forward(model, x)
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


# --- checkpoints and pretrained configs ------------------------------------------------------------------------------


def test_checkpoint_filter_passes_our_names_through():
    model = timm.create_model("dsnet_tiny_concat", device="meta")
    state = model.state_dict()
    for given in (state, {"state_dict": state}, {f"module.{k}": v for k, v in state.items()}):
        out = checkpoint_filter_fn(given, model)  # the same names, in order, holding the very same tensors
        assert list(out) == list(state) and all(out[k] is state[k] for k in state)


def test_checkpoint_filter_converts_reference_layout():
    from dsnet.convert.dsnet_reference import BLOCK_MODULE_MAP, TOP_MODULE_MAP

    torch.manual_seed(0)
    source = timm.create_model("dsnet_tiny", num_classes=10, **SHALLOW)
    _randomize_bn(source)
    # write our weights under the PyTorch reference's names
    ours_to_ref = {v: k for k, v in BLOCK_MODULE_MAP.items()}
    top_to_ref = {v: k for k, v in TOP_MODULE_MAP.items()}
    reference = {}
    for key, value in source.state_dict().items():
        if key.startswith("stages.") and ".downsample." in key:
            i, param = int(key.split(".")[1]), key.rsplit(".", 1)[1]
            reference[f"patch_embed{i + 1}.proj.{param}"] = value
        elif key.startswith("stages."):
            _, i, _, j, rest = key.split(".", 4)
            module, param = rest.rsplit(".", 1)
            reference[f"blocks{int(i) + 1}.{j}.{ours_to_ref[module]}.{param}"] = value
        else:
            module, param = key.rsplit(".", 1)
            reference[f"{top_to_ref[module]}.{param}"] = value
    target = timm.create_model("dsnet_tiny", num_classes=10, **SHALLOW)
    target.load_state_dict(checkpoint_filter_fn(reference, target))
    loaded = target.state_dict()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded[key], value, msg=key)


def test_pretrained_from_converted_file(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("dsnet_tiny_concat", **SHALLOW)
    path = tmp_path / "dsnet_tiny_concat.safetensors"
    save_file(source.state_dict(), path)
    model = timm.create_model(
        "dsnet_tiny_concat", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SHALLOW
    )
    loaded = model.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_pretrained_without_release_explains_conversion():
    with pytest.raises(ValueError, match=r"no weights were released .*dsnet convert paddle .*pretrained_cfg_overlay="):
        timm.create_model("dsnet_tiny_concat", pretrained=True)


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_pretrained_cfg_points_at_released_weights(size):
    cfg = timm.create_model(f"dsnet_{size}", device="meta").pretrained_cfg
    assert cfg["url"] == cfg["origin_url"]  # pretrained=True downloads and converts it (test_pretrained_download.py)
    assert cfg["origin_url"] == (
        f"https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/DSNet_{size}_pretrained.pdparams"
    )
    assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    assert cfg["first_conv"] == "stages.0.downsample" and cfg["classifier"] == "head.fc"
    assert cfg["license"] and "2105.14734" in cfg["paper_ids"]


def test_linear_init_is_truncated_normal():
    torch.manual_seed(0)
    model = timm.create_model("dsnet_tiny", **SHALLOW)
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, nn.Linear)])
    assert weights.std().item() == pytest.approx(0.02, rel=0.15)
    biases = [m.bias for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(torch.count_nonzero(b) == 0 for b in biases)
    assert math.isclose(model.stages[0].blocks[0].global_norm.eps, 1e-5)


def test_main_job_model_keeps_both_streams_at_its_input_size(monkeypatch):
    """The main job's recipe (configs/fashion_mnist/dsnet_tiny.yaml): at its input size, stages 1–3 have global grids
    of at least 2×2 tokens and stage 1's grid is coarser than its local map — read from the model and checked against
    the grids its forward pass really builds."""
    from dsnet.engine.config import load_config
    from dsnet.engine.trainer import build_model
    from dsnet.models import dsnet as dsnet_module

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist" / "dsnet_tiny.yaml")
    assert cfg.model.name == "dsnet_tiny"  # the released architecture, not a smaller network
    model = build_model(cfg, num_classes=10).eval()
    size = cfg.data.input_size
    shapes = model.stream_shapes(size)
    for shape in shapes[:3]:
        assert min(shape.global_grid) >= 2, shape
    assert shapes[0].global_grid[0] < shapes[0].local_map[0] and shapes[0].global_grid[1] < shapes[0].local_map[1]

    built = []
    original = dsnet_module.resize_to_global_grid

    def recording(x, stride, grid_size):
        out = original(x, stride, grid_size)
        built.append((tuple(x.shape[-2:]), tuple(out.shape[-2:])))
        return out

    monkeypatch.setattr(dsnet_module, "resize_to_global_grid", recording)
    with torch.no_grad():
        model(torch.zeros(1, cfg.model.in_chans, size, size))
    blocks_per_stage = [len(stage.blocks) for stage in model.stages]
    expected = [(shape.local_map, shape.global_grid) for shape, n in zip(shapes, blocks_per_stage) for _ in range(n)]
    assert built == expected
