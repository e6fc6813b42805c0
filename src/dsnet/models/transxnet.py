"""TransXNet: a hybrid CNN-Transformer backbone with a dual dynamic token mixer.

Paper: "TransXNet: Learning Both Global and Local Dynamics with a Dual Dynamic Token Mixer for Visual
Recognition", Meng Lou, Shu Zhang, Hong-Yu Zhou, Sibei Yang, Chuan Wu, Yizhou Yu (IEEE TNNLS 2025),
https://arxiv.org/abs/2310.19380
Official code and weights: https://github.com/LMMMEng/TransXNet (PyTorch + mmcv).

Four stages (stem 7×7/4 conv + BN, then 3×3/2 conv + BN downsamples). Every block is

    x = x + DPE(x)                                  # dynamic position encoding: depth-wise 7×7 conv
    x = x + DropPath(LayerScale(D-Mixer(GN(x))))    # dual dynamic token mixer
    x = x + DropPath(LayerScale(MS-FFN(GN(x))))     # multi-scale feed-forward network

The D-Mixer sends half of the channels through IDConv (an input-dependent depth-wise conv) and the other
half through OSRA (attention over an overlapping spatially reduced key/value map, plus a learned relative
position bias per stage), concatenates them and refines the result with the squeezed token enhancer (STE).

The relative position bias tables are sized for ``img_size`` (224 for the released weights). Other input
sizes (any size ≥ 32, not only multiples of 32) work: the table is resized bicubically to the actual
(query tokens, key tokens) shape. Like the official code, the resize treats the (N, M) table as one image
(not as two separate 2-D grids), so converted weights behave exactly as they do in the official model.

Example:
    >>> import timm, torch, dsnet
    >>> model = timm.create_model("transxnet_t").eval()
    >>> model(torch.randn(1, 3, 224, 224)).shape
    torch.Size([1, 1000])
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ClassifierHead,
    ConvNormAct,
    DropPath,
    GroupNorm1,
    calculate_drop_path_rates,
    register_notrace_function,
    to_2tuple,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from torch import nn

from dsnet.errors import DSNetError
from dsnet.layers.adaptive_avg_pool import AdaptiveAvgPool2d
from dsnet.layers.attention import attention
from dsnet.layers.per_sample_conv import per_sample_depthwise_conv2d
from dsnet.models._checkpoint import pretrained_file_kwargs, state_dict_of
from dsnet.models._paper import PAPER_FIGURES, PaperFigures
from dsnet.models._pretrained import pretrained_kwargs
from dsnet.models._stages import StagedBackboneMixin

__all__ = ["TransXNet", "checkpoint_filter_fn"]


# ----------------------------------------------------------------------------------------------------------------------
# Shape helpers (Python arithmetic on tensor shapes, kept out of torch.fx graphs)
# ----------------------------------------------------------------------------------------------------------------------


def _reduced_size(size: int, sr_ratio: int) -> int:
    """Side of the key/value grid after OSRA's spatial reduction (kernel sr+3, stride sr, padding (sr+3)//2)."""
    # ceil(size / sr_ratio), written with non-negative operands: ONNX integer division truncates toward zero
    return (size + sr_ratio - 1) // sr_ratio


@register_notrace_function
def resize_relative_pos_bias(bias: torch.Tensor, x: torch.Tensor, sr_ratio: int) -> torch.Tensor:
    """Fit a stage's relative position bias (1, heads, N, M) to the token grid of ``x`` (B, C, H, W).

    N = H·W query tokens, M = key tokens after spatial reduction by ``sr_ratio``. A table of another shape is
    resized bicubically over its (N, M) plane, exactly like the official implementation.
    """
    height, width = x.shape[-2:]
    size = (height * width, _reduced_size(height, sr_ratio) * _reduced_size(width, sr_ratio))
    if tuple(bias.shape[-2:]) == size and not torch.compiler.is_exporting():
        return bias  # when exporting, always resize (identity at the trained size) so no input size is baked in
    return F.interpolate(bias, size=size, mode="bicubic", align_corners=False)


# Plain torch.fx.symbolic_trace (not only timm's tracer) keeps these as leaves.
torch.fx.wrap("resize_relative_pos_bias")
torch.fx.wrap("per_sample_depthwise_conv2d")


# ----------------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------------


class IDConv(nn.Module):
    """Input-dependent depth-wise convolution (paper §3.2, Fig. 2b).

    An adaptive average pool to K×K and two 1×1 convs predict, for every channel and kernel tap, a softmax
    over ``num_groups`` attention groups; the per-sample kernel is the attention-weighted sum of ``num_groups``
    learned kernel banks. The bias is mixed the same way from global-average-pooled features.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        num_groups: int = 2,
        reduction: int = 4,
        act_layer: type[nn.Module] = nn.GELU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if num_groups < 2:
            raise DSNetError(f"IDConv needs num_groups >= 2 (a softmax over one group is constant), got {num_groups}")
        self.num_groups = num_groups
        self.kernel_bank = nn.Parameter(torch.empty(num_groups, dim, kernel_size, kernel_size, **dd))
        self.bias_bank = nn.Parameter(torch.empty(num_groups, dim, **dd))
        self.pool = AdaptiveAvgPool2d(kernel_size)  # exports with a dynamic input size
        self.attn = nn.Sequential(
            ConvNormAct(dim, dim // reduction, 1, act_layer=act_layer, **dd),
            nn.Conv2d(dim // reduction, dim * num_groups, 1, **dd),
        )
        trunc_normal_(self.kernel_bank, std=0.02)
        trunc_normal_(self.bias_bank, std=0.02)

    def _group_softmax(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn(x).unflatten(1, (self.num_groups, -1))  # (B, G, C, h, w)
        return attn.softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel_attn = self._group_softmax(self.pool(x))  # (B, G, C, K, K)
        kernels = (kernel_attn * self.kernel_bank).sum(dim=1)  # (B, C, K, K)
        bias_attn = self._group_softmax(x.mean(dim=(2, 3), keepdim=True)).flatten(2)  # (B, G, C)
        bias = (bias_attn * self.bias_bank).sum(dim=1)  # (B, C)
        return per_sample_depthwise_conv2d(x, kernels, bias)


class OSRA(nn.Module):
    """Overlapping spatial reduction attention (paper §3.2, Fig. 2c).

    Keys and values come from the input reduced by a depth-wise conv of kernel ``sr_ratio + 3`` and stride
    ``sr_ratio`` (overlapping patches) followed by a depth-wise 1×1 conv, plus a depth-wise 3×3 "local" conv
    with residual. The attention logits get the stage's relative position bias.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        sr_ratio: int = 1,
        act_layer: type[nn.Module] = nn.GELU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % num_heads:
            raise DSNetError(f"OSRA width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q = nn.Conv2d(dim, dim, 1, **dd)
        self.kv = nn.Conv2d(dim, dim * 2, 1, **dd)
        if sr_ratio > 1:
            k = sr_ratio + 3
            self.spatial_reduction = nn.Sequential(
                ConvNormAct(dim, dim, k, stride=sr_ratio, padding=k // 2, groups=dim, act_layer=act_layer, **dd),
                ConvNormAct(dim, dim, 1, groups=dim, apply_act=False, **dd),
            )
        else:
            self.spatial_reduction = nn.Identity()
        self.local_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)

    def forward(self, x: torch.Tensor, pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        q = self.q(x).unflatten(1, (self.num_heads, -1)).flatten(3).transpose(-1, -2)  # (B, heads, N, d)
        kv = self.spatial_reduction(x)
        kv = self.local_conv(kv) + kv  # (B, C, h, w)
        k, v = (
            self.kv(kv).unflatten(1, (2, self.num_heads, -1)).flatten(4).transpose(-1, -2).unbind(1)
        )  # (B, heads, M, d)
        out = attention(q, k, v, attn_mask=pos_bias)  # (B, heads, N, d)
        return out.transpose(-1, -2).reshape(x.shape)  # (B, C, H, W)


class SqueezedTokenEnhancer(nn.Module):
    """STE (paper §3.2, Fig. 2d): depth-wise 3×3 conv, then a squeeze/expand pair of 1×1 convs, with residual."""

    def __init__(
        self,
        dim: int,
        reduction: int = 8,
        min_dim: int = 16,
        act_layer: type[nn.Module] = nn.GELU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        inner_dim = max(min_dim, dim // reduction)
        self.local_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.act = act_layer()
        self.norm1 = nn.BatchNorm2d(dim, **dd)
        self.squeeze = nn.Conv2d(dim, inner_dim, 1, **dd)
        self.norm2 = nn.BatchNorm2d(inner_dim, **dd)
        self.expand = nn.Conv2d(inner_dim, dim, 1, **dd)
        self.norm3 = nn.BatchNorm2d(dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(self.act(self.local_conv(x)))
        y = self.norm2(self.act(self.squeeze(y)))
        return self.norm3(self.expand(y)) + x


class DMixer(nn.Module):
    """Dual dynamic token mixer: IDConv on one half of the channels, OSRA on the other, then STE."""

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        num_groups: int = 2,
        num_heads: int = 1,
        sr_ratio: int = 1,
        act_layer: type[nn.Module] = nn.GELU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % 2:
            raise DSNetError(f"D-Mixer splits channels in two halves; width {dim} is odd")
        self.idconv = IDConv(dim // 2, kernel_size=kernel_size, num_groups=num_groups, act_layer=act_layer, **dd)
        self.osra = OSRA(dim // 2, num_heads=num_heads, sr_ratio=sr_ratio, act_layer=act_layer, **dd)
        self.ste = SqueezedTokenEnhancer(dim, act_layer=act_layer, **dd)

    def forward(self, x: torch.Tensor, pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        local_half, global_half = x.chunk(2, dim=1)  # 2 × (B, C/2, H, W)
        x = torch.cat([self.idconv(local_half), self.osra(global_half, pos_bias)], dim=1)  # (B, C, H, W)
        return self.ste(x)


class MultiScaleDWConv(nn.Module):
    """Parallel depth-wise convs of kernel sizes ``scales`` on consecutive channel slices (MS-FFN, Fig. 3).

    The first slice takes the remainder when ``dim`` does not divide evenly.
    """

    def __init__(
        self,
        dim: int,
        scales: Sequence[int] = (1, 3, 5, 7),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        n = len(scales)
        self.splits = [dim - dim // n * (n - 1)] + [dim // n] * (n - 1)
        self.convs = nn.ModuleList(
            nn.Conv2d(c, c, k, padding=k // 2, groups=c, device=device, dtype=dtype)
            for c, k in zip(self.splits, scales)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.split(self.splits, dim=1)  # indexed, not iterated: torch.fx cannot iterate a traced tuple
        return torch.cat([conv(parts[i]) for i, conv in enumerate(self.convs)], dim=1)


class MultiScaleFFN(nn.Module):
    """MS-FFN: 1×1 expand (+GELU, BN), multi-scale depth-wise conv with residual (+GELU, BN), 1×1 reduce (+BN)."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1, bias=False, **dd)
        self.act = act_layer()
        self.norm1 = nn.BatchNorm2d(hidden_dim, **dd)
        self.ms_dwconv = MultiScaleDWConv(hidden_dim, **dd)
        self.norm2 = nn.BatchNorm2d(hidden_dim, **dd)
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1, bias=False, **dd)
        self.norm3 = nn.BatchNorm2d(dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.act(self.fc1(x)))
        x = self.norm2(self.act(self.ms_dwconv(x) + x))
        x = self.norm3(self.fc2(self.drop(x)))
        return self.drop(x)


class LayerScale(nn.Module):
    """Per-channel affine ``weight · x + bias`` on (B, C, H, W), initialised to a small scale and zero shift.

    ``weight`` is stored as (C, 1, 1), not (C,): timm's optimizer factory then applies weight decay to it, as it
    does to the reference implementation (whose scale is a 1×1 depth-wise conv weight).
    """

    def __init__(
        self,
        dim: int,
        init_value: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.init_value = init_value
        self.weight = nn.Parameter(torch.full((dim, 1, 1), init_value, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias[:, None, None], x, self.weight)


class TransXNetBlock(nn.Module):
    """DPE → GN → D-Mixer → LayerScale, then GN → MS-FFN → LayerScale, each with a residual."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        num_groups: int = 2,
        sr_ratio: int = 1,
        mlp_ratio: float = 4.0,
        kernel_size: int = 7,
        layer_scale_init_value: float | None = 1e-5,
        drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = GroupNorm1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dpe = nn.Conv2d(dim, dim, 7, padding=3, groups=dim, **dd)
        self.norm1 = norm_layer(dim, **dd)
        self.mixer = DMixer(
            dim,
            kernel_size=kernel_size,
            num_groups=num_groups,
            num_heads=num_heads,
            sr_ratio=sr_ratio,
            act_layer=act_layer,
            **dd,
        )
        self.layer_scale1 = LayerScale(dim, layer_scale_init_value, **dd) if layer_scale_init_value else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.ffn = MultiScaleFFN(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop, **dd)
        self.layer_scale2 = LayerScale(dim, layer_scale_init_value, **dd) if layer_scale_init_value else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dpe(x)
        x = x + self.drop_path1(self.layer_scale1(self.mixer(self.norm1(x), pos_bias)))
        x = x + self.drop_path2(self.layer_scale2(self.ffn(self.norm2(x))))
        return x


class TransXNetStage(nn.Module):
    """Optional 3×3/2 conv + BN downsample, the stage's relative position bias, then ``depth`` blocks."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        grid_size: tuple[int, int],
        downsample: bool = True,
        num_heads: int = 1,
        num_groups: int = 2,
        sr_ratio: int = 1,
        mlp_ratio: float = 4.0,
        kernel_size: int = 7,
        layer_scale_init_value: float | None = 1e-5,
        drop: float = 0.0,
        drop_path_rates: Sequence[float] | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = GroupNorm1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.sr_ratio = sr_ratio
        self.grad_checkpointing = False
        if downsample:
            self.downsample = ConvNormAct(in_dim, dim, 3, stride=2, padding=1, apply_act=False, **dd)
        else:
            self.downsample = nn.Identity()
        height, width = grid_size
        num_keys = _reduced_size(height, sr_ratio) * _reduced_size(width, sr_ratio)
        self.relative_pos_bias = nn.Parameter(torch.zeros(1, num_heads, height * width, num_keys, **dd))
        drop_path_rates = drop_path_rates or [0.0] * depth
        self.blocks = nn.ModuleList(
            TransXNetBlock(
                dim,
                num_heads=num_heads,
                num_groups=num_groups,
                sr_ratio=sr_ratio,
                mlp_ratio=mlp_ratio,
                kernel_size=kernel_size,
                layer_scale_init_value=layer_scale_init_value,
                drop=drop,
                drop_path=drop_path_rates[i],
                act_layer=act_layer,
                norm_layer=norm_layer,
                **dd,
            )
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        pos_bias = resize_relative_pos_bias(self.relative_pos_bias, x, self.sr_ratio)  # (1, heads, N, M)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, pos_bias)
            else:
                x = block(x, pos_bias)
        return x


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


class TransXNet(StagedBackboneMixin, nn.Module):
    """TransXNet image classifier / backbone.

    The timm API (``forward_intermediates``, ``prune_intermediate_layers``, ``group_matcher``, ...) comes from
    :class:`~dsnet.models._stages.StagedBackboneMixin`.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs; 0 for no classifier.
        global_pool: pooling before the classifier (timm ``SelectAdaptivePool2d`` type).
        depths: blocks per stage.
        dims: channels per stage.
        num_heads: OSRA heads per stage.
        num_groups: IDConv attention groups per stage.
        mlp_ratios: MS-FFN expansion per stage.
        sr_ratios: OSRA spatial reduction per stage.
        kernel_size: IDConv kernel size.
        img_size: input size the relative position bias tables are sized for (other sizes are interpolated).
        layer_scale_init_value: initial LayerScale, or None to disable LayerScale.
        drop_rate: dropout before the classifier and inside MS-FFN.
        drop_path_rate: stochastic depth, increasing linearly over all blocks.
        device, dtype: where and in which dtype to create parameters (``"meta"`` works).
    """

    _stage_entry_regex = r"(?:downsample|relative_pos_bias)"  # grouped with the stage's first block

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (48, 96, 224, 448),
        num_heads: Sequence[int] = (1, 2, 4, 8),
        num_groups: Sequence[int] = (2, 2, 2, 2),
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        kernel_size: int = 7,
        img_size: int | tuple[int, int] = 224,
        layer_scale_init_value: float | None = 1e-5,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        num_stages = len(depths)
        for name, value in (
            ("dims", dims),
            ("num_heads", num_heads),
            ("num_groups", num_groups),
            ("mlp_ratios", mlp_ratios),
            ("sr_ratios", sr_ratios),
        ):
            if len(value) != num_stages:
                raise DSNetError(f"TransXNet: {name}={tuple(value)} has {len(value)} entries, depths has {num_stages}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = dims[-1]

        self.stem = ConvNormAct(in_chans, dims[0], 7, stride=4, padding=3, apply_act=False, **dd)
        height, width = (math.ceil(s / 4) for s in to_2tuple(img_size))
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        self.feature_info = []
        stages = []
        for i in range(num_stages):
            if i > 0:
                height, width = math.ceil(height / 2), math.ceil(width / 2)
            stages.append(
                TransXNetStage(
                    dims[i - 1] if i > 0 else dims[0],
                    dims[i],
                    depths[i],
                    grid_size=(height, width),
                    downsample=i > 0,
                    num_heads=num_heads[i],
                    num_groups=num_groups[i],
                    sr_ratio=sr_ratios[i],
                    mlp_ratio=mlp_ratios[i],
                    kernel_size=kernel_size,
                    layer_scale_init_value=layer_scale_init_value,
                    drop=drop_rate,
                    drop_path_rates=dpr[i],
                    **dd,
                )
            )
            self.feature_info.append({"num_chs": dims[i], "reduction": 4 * 2**i, "module": f"stages.{i}"})
        self.stages = nn.Sequential(*stages)
        self.norm = GroupNorm1(dims[-1], **dd)
        self.head = ClassifierHead(dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # no_weight_decay: nothing beyond timm's 1-D exemptions (mixin default), as in the official recipe; the
    # relative position biases are decayed.

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, C0, H/4, W/4)
        x = self.stages(x)  # (B, C3, H/32, W/32)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------------------------------
# Official checkpoints
# ----------------------------------------------------------------------------------------------------------------------

# Official (mmcv-style) name → our name; applied in order to each key.
_OFFICIAL_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^patch_embed\.proj\.", "stem."),
    (r"^relative_pos_enc\.(\d+)$", r"stages.\1.relative_pos_bias"),
    (r"\.pos_embed\.", ".dpe."),
    (r"\.token_mixer\.local_unit\.weight$", ".mixer.idconv.kernel_bank"),
    (r"\.token_mixer\.local_unit\.bias$", ".mixer.idconv.bias_bank"),
    (r"\.token_mixer\.local_unit\.proj\.", ".mixer.idconv.attn."),
    (r"\.token_mixer\.global_unit\.sr\.", ".mixer.osra.spatial_reduction."),
    (r"\.token_mixer\.global_unit\.", ".mixer.osra."),
    (r"\.token_mixer\.proj\.0\.", ".mixer.ste.local_conv."),
    (r"\.token_mixer\.proj\.2\.", ".mixer.ste.norm1."),
    (r"\.token_mixer\.proj\.3\.", ".mixer.ste.squeeze."),
    (r"\.token_mixer\.proj\.5\.", ".mixer.ste.norm2."),
    (r"\.token_mixer\.proj\.6\.", ".mixer.ste.expand."),
    (r"\.token_mixer\.proj\.7\.", ".mixer.ste.norm3."),
    (r"\.mlp\.fc1\.0\.", ".ffn.fc1."),
    (r"\.mlp\.fc1\.2\.", ".ffn.norm1."),
    (r"\.mlp\.dwconv\.proj\.", ".ffn.ms_dwconv.convs."),
    (r"\.mlp\.norm\.", ".ffn.norm2."),
    (r"\.mlp\.fc2\.0\.", ".ffn.fc2."),
    (r"\.mlp\.fc2\.1\.", ".ffn.norm3."),
    (r"\.layer_scale_(\d)\.", r".layer_scale\1."),
    (r"^classifier\.0\.", "norm."),
    (r"^classifier\.2\.", "head.fc."),
)
# The official ``network`` list interleaves stages and downsamples: 0, 2, 4, 6 are stages, 1, 3, 5 downsamples.
_NETWORK_BLOCK = re.compile(r"^network\.(\d+)\.(\d+)\.")
_NETWORK_DOWNSAMPLE = re.compile(r"^network\.(\d+)\.proj\.")


def _rename_official_key(key: str) -> str:
    if match := _NETWORK_BLOCK.match(key):
        key = f"stages.{int(match[1]) // 2}.blocks.{match[2]}." + key[match.end() :]
    elif match := _NETWORK_DOWNSAMPLE.match(key):
        key = f"stages.{(int(match[1]) + 1) // 2}.downsample." + key[match.end() :]
    for pattern, replacement in _OFFICIAL_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def checkpoint_filter_fn(state_dict: dict[str, Any], model: TransXNet) -> dict[str, torch.Tensor]:
    """Convert an official TransXNet checkpoint (``transx-{t,s,b}.pth.tar``) to ``model``'s parameter names.

    Accepts the bare state dict or a training checkpoint, unwrapped by the package's one rule
    (:func:`dsnet.models._checkpoint.choose_entry`: ``'state_dict'`` before ``'state_dict_ema'``; ``'module.'``
    prefixes are stripped). Keys are renamed, LayerScale weights (C, 1, 1, 1) → (C, 1, 1) and the 1×1-conv classifier
    (K, C, 1, 1) → (K, C) are reshaped, and every shape is checked against ``model``. Relative position
    bias tables trained at another image size (e.g. the 384 px release) are resized bicubically, as the
    official model would do at run time. Classifier weights of another class count are passed through for
    timm to drop. A state dict already in our names passes through unchanged.

    Raises:
        DSNetError: a key that does not belong to the model, or a shape that does not match it.
    """
    state_dict = state_dict_of(state_dict)
    targets = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key not in targets:
            key = _rename_official_key(key)
        if key.endswith((".layer_scale1.weight", ".layer_scale2.weight")) and value.ndim == 4:
            value = value.flatten(1).unsqueeze(-1)  # (C, 1, 1, 1) → (C, 1, 1)
        elif key == "head.fc.weight" and value.ndim == 4:
            value = value.flatten(1)  # 1×1 conv (K, C, 1, 1) → linear (K, C)
        if key not in targets:
            if key.startswith("head."):
                out[key] = value  # classifier of a model built with num_classes=0; timm drops it
                continue
            unknown.append(key)
            continue
        expected = targets[key].shape
        if key.endswith(".relative_pos_bias") and value.shape != expected and value.shape[:2] == expected[:2]:
            value = F.interpolate(value.float(), size=tuple(expected[-2:]), mode="bicubic", align_corners=False)
        if value.shape != expected and not key.startswith("head."):
            raise DSNetError(
                f"TransXNet checkpoint: {key} has shape {tuple(value.shape)}, model expects {tuple(expected)}"
            )
        out[key] = value
    if unknown:
        raise DSNetError(f"TransXNet checkpoint: {len(unknown)} keys match nothing in the model, e.g. {unknown[:5]}")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------------


def _create_transxnet(variant: str, pretrained: bool = False, **kwargs: Any) -> TransXNet:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    kwargs = pretrained_kwargs(variant, pretrained, kwargs, layout="torch")  # the GitHub release → a local file
    return build_model_with_cfg(
        TransXNet,
        variant,
        pretrained,
        feature_cfg={"out_indices": out_indices, "feature_cls": "getter"},
        **pretrained_file_kwargs(variant, pretrained, checkpoint_filter_fn, kwargs),
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv",
        "classifier": "head.fc",
        "paper_ids": "arXiv:2310.19380",
        "license": "apache-2.0",
        **kwargs,
    }


_RELEASE = "https://github.com/LMMMEng/TransXNet/releases/download/v1.0"


def _release(name: str) -> dict[str, str]:
    # The official README's links (its table "Main Results on ImageNet with Pretrained Models"); it lists no hash.
    return {"url": f"{_RELEASE}/{name}", "origin_url": f"{_RELEASE}/{name}"}


# The official weights are timm training checkpoints (.pth.tar, weights in entry "state_dict") in the authors' names:
# pretrained=True downloads one and converts it with checkpoint_filter_fn (models/_pretrained.py); a file fetched by
# hand loads with ``pretrained_cfg_overlay={"file": path}``, converted on the fly.
default_cfgs = generate_default_cfgs(
    {
        "transxnet_t.in1k": _cfg(**_release("transx-t.pth.tar"), crop_pct=0.9),
        "transxnet_s.in1k": _cfg(**_release("transx-s.pth.tar"), crop_pct=0.9),
        "transxnet_b.in1k": _cfg(**_release("transx-b.pth.tar"), crop_pct=0.95),
    }
)

PAPER_FIGURES.update(
    {
        "transxnet_t": PaperFigures(12.8, 1.8, 81.6, "TransXNet paper, Table 2 / official README (TransXNet-T)"),
        "transxnet_s": PaperFigures(26.9, 4.5, 83.8, "TransXNet paper, Table 2 / official README (TransXNet-S)"),
        "transxnet_b": PaperFigures(48.0, 8.3, 84.6, "TransXNet paper, Table 2 / official README (TransXNet-B)"),
    }
)


@register_model
def transxnet_t(pretrained: bool = False, **kwargs: Any) -> TransXNet:
    """TransXNet-T: 12.8 M params, 1.8 GMACs, 81.6 % ImageNet top-1."""
    args = {
        "depths": (3, 3, 9, 3),
        "dims": (48, 96, 224, 448),
        "num_heads": (1, 2, 4, 8),
        "num_groups": (2, 2, 2, 2),
        "mlp_ratios": (4, 4, 4, 4),
    }
    return _create_transxnet("transxnet_t", pretrained, **dict(args, **kwargs))


@register_model
def transxnet_s(pretrained: bool = False, **kwargs: Any) -> TransXNet:
    """TransXNet-S: 26.9 M params, 4.5 GMACs, 83.8 % ImageNet top-1."""
    args = {
        "depths": (4, 4, 12, 4),
        "dims": (64, 128, 320, 512),
        "num_heads": (1, 2, 5, 8),
        "num_groups": (2, 2, 3, 4),
        "mlp_ratios": (6, 6, 4, 4),
    }
    return _create_transxnet("transxnet_s", pretrained, **dict(args, **kwargs))


@register_model
def transxnet_b(pretrained: bool = False, **kwargs: Any) -> TransXNet:
    """TransXNet-B: 48.0 M params, 8.3 GMACs, 84.6 % ImageNet top-1."""
    args = {
        "depths": (4, 4, 21, 4),
        "dims": (76, 152, 336, 672),
        "num_heads": (2, 4, 8, 16),
        "num_groups": (2, 2, 4, 4),
        "mlp_ratios": (8, 8, 4, 4),
    }
    return _create_transxnet("transxnet_b", pretrained, **dict(args, **kwargs))
