"""MixFormer: window attention and depthwise convolution mixed across windows and dimensions.

Paper: Chen et al., "MixFormer: Mixing Features across Windows and Dimensions", CVPR 2022
(https://arxiv.org/abs/2204.02557). Official code: PaddleClas PR #1820 (Paddle only); this is our own
PyTorch implementation of the same model, so that converted official weights give the same outputs
(see :func:`checkpoint_filter_fn`).

A Mixing Block runs, on LN(x), local-window self-attention (on half the channels) in parallel with a
depthwise 3×3 convolution (on all channels), with two bi-directional interactions between the branches:

* channel interaction: the pooled convolution branch gates the *values* of the attention (SE-like),
* spatial interaction: the attention output gates every position of the convolution branch;

the two branches are concatenated and projected, then an MLP follows (both with pre-norm residuals).

Input sizes: any input of at least 32×32 px works. Three zero-paddings (bottom/right) make sizes fit:

1. the image is padded to a multiple of 4 before the stem (as the official code does);
2. inside every block, LN(x) is padded to a multiple of the window size (7) before the mixing and cropped back
   after it. As in the official code, padded positions are *not* masked: they take part in the window attention,
   the depthwise convolution and the channel-interaction pooling (so at sizes that are not multiples of 7 the
   output depends on the padding, exactly like the reference); a stage smaller than one window is one padded window;
3. before each 2×2 stride-2 downsampling, the batch-normalised map is padded to even height/width (the official
   code asserts even sizes instead), so a stage of size n becomes ceil(n / 2).

At multiples of 32 px (e.g. 224) paddings 1 and 3 do nothing.

Example:
    >>> import timm, torch, dsnet
    >>> model = timm.create_model("mixformer_b0").eval()
    >>> model(torch.randn(1, 3, 224, 224)).shape
    torch.Size([1, 1000])
    >>> [f.shape[1:] for f in model.forward_intermediates(torch.randn(1, 3, 64, 80), intermediates_only=True)]
    [torch.Size([24, 16, 20]), torch.Size([48, 8, 10]), torch.Size([96, 4, 5]), torch.Size([192, 2, 3])]
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ConvMlp,
    ConvNormAct,
    DropPath,
    Mlp,
    SelectAdaptivePool2d,
    calculate_drop_path_rates,
    get_device_dtype,
    register_notrace_function,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models.swin_transformer import get_relative_position_index, window_partition, window_reverse
from torch import nn

from dsnet.errors import DSNetError
from dsnet.layers.attention import attention
from dsnet.models._checkpoint import pretrained_file_kwargs, state_dict_of, verify_state_dict
from dsnet.models._paper import PAPER_FIGURES, PaperFigures
from dsnet.models._pretrained import pretrained_kwargs
from dsnet.models._stages import StagedBackboneMixin

__all__ = ["MixFormer", "MixingAttention", "MixingBlock", "checkpoint_filter_fn"]

_GLOBAL_POOLS = ("", "avg", "max", "avgmax", "catavgmax")


# --------------------------------------------------------------------------------------------------------------------
# Shape arithmetic (kept out of torch.fx graphs: the pad amounts depend on the input size)


@register_notrace_function
def pad_to_multiple(x: torch.Tensor, multiple: int, channels_last: bool) -> torch.Tensor:
    """Zero-pad the bottom and right of a feature map so that its height and width are multiples of ``multiple``.

    Args:
        x: (B, H, W, C) if ``channels_last`` else (B, C, H, W).
        multiple: the size both spatial dims must divide by.
        channels_last: layout of ``x``.
    """
    height, width = (x.shape[1], x.shape[2]) if channels_last else (x.shape[-2], x.shape[-1])
    # padded size = multiple · ceil(size / multiple), written as a product so that torch.export's symbolic shapes
    # see at once that it divides by ``multiple`` (a nested ``(m - n % m) % m`` after each stage does not simplify)
    pad_h = (height + multiple - 1) // multiple * multiple - height
    pad_w = (width + multiple - 1) // multiple * multiple - width
    if channels_last:
        return F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return F.pad(x, (0, pad_w, 0, pad_h))


@register_notrace_function
def crop_like(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Crop a (B, H', W', C) map to the height and width of the (B, H, W, C) ``reference`` (top-left corner)."""
    return x[:, : reference.shape[1], : reference.shape[2]]


# --------------------------------------------------------------------------------------------------------------------
# Blocks


class MixingAttention(nn.Module):
    """The mixing of a Mixing Block: window attention ∥ depthwise conv with bi-directional interactions.

    Works on a (B, H, W, C) map whose H and W are multiples of ``window_size`` (the block pads).

    Args:
        dim: channels C. The attention branch works on C/2 channels, the convolution branch on C.
        num_heads: attention heads (on C/2 channels).
        window_size: side of the square attention windows.
        dwconv_kernel_size: kernel of the depthwise convolution.
        qkv_bias: bias of the q, k, v projection.
        attn_drop: dropout on attention weights (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        dwconv_kernel_size: int = 3,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        attn_dim = dim // 2
        if dim % 2 or attn_dim % num_heads or dim < 16:
            raise DSNetError(
                f"MixingAttention: dim={dim} must be even, at least 16, and dim/2 must divide by num_heads={num_heads}"
            )
        self.num_heads = num_heads
        self.head_dim = attn_dim // num_heads
        self.window_size = window_size
        self.attn_drop = attn_drop

        # Inputs of the two branches.
        self.attn_in_proj = nn.Linear(dim, attn_dim, **dd)
        self.attn_in_norm = nn.LayerNorm(attn_dim, **dd)
        self.conv_in_proj = nn.Linear(dim, dim, **dd)
        self.conv_in_norm = nn.LayerNorm(dim, **dd)

        # Convolution branch (across windows) and its channel interaction towards the attention values.
        self.depthwise_conv = ConvNormAct(dim, dim, dwconv_kernel_size, groups=dim, bias=True, act_layer=nn.GELU, **dd)
        self.channel_interaction = ConvMlp(dim, dim // 8, attn_dim, act_layer=nn.GELU, norm_layer=nn.BatchNorm2d, **dd)
        self.conv_out_proj = nn.Conv2d(dim, attn_dim, kernel_size=1, **dd)
        self.conv_out_norm = nn.BatchNorm2d(attn_dim, **dd)

        # Attention branch (within windows) and its spatial interaction towards the convolution branch.
        self.qkv = nn.Linear(attn_dim, 3 * attn_dim, bias=qkv_bias, **dd)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads, **dd))
        self.register_buffer(
            "relative_position_index",
            torch.empty(window_size**2, window_size**2, device=device, dtype=torch.long),
            persistent=False,
        )
        self.spatial_interaction = ConvMlp(attn_dim, dim // 16, 1, act_layer=nn.GELU, norm_layer=nn.BatchNorm2d, **dd)
        self.attn_out_norm = nn.LayerNorm(attn_dim, **dd)

        # Fusion of the concatenated branches.
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.init_non_persistent_buffers()

    def init_non_persistent_buffers(self) -> None:
        """Fill the relative position index (a buffer computed from the window size, not stored in checkpoints)."""
        index = get_relative_position_index(
            self.window_size, self.window_size, device=self.relative_position_index.device
        )
        self.relative_position_index.copy_(index)

    def _relative_position_bias(self) -> torch.Tensor:
        area = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (N·N, heads)
        # (1, heads, N, N): PyTorch's fused CPU attention kernel takes a 4-D mask; a 3-D one sends it to the math path
        return bias.view(area, area, -1).permute(2, 0, 1).unsqueeze(0)

    def _window_attention(self, x: torch.Tensor, value_gate: torch.Tensor) -> torch.Tensor:
        """Self-attention inside the windows of x (B, H, W, C/2), values scaled by value_gate (B, C/2, 1, 1)."""
        batch, height, width, channels = x.shape
        ws = self.window_size
        windows = window_partition(x, (ws, ws)).reshape(-1, ws * ws, channels)  # (B·nW, N, C/2)
        qkv = self.qkv(windows).reshape(-1, ws * ws, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B·nW, heads, N, head_dim)
        # channel interaction: the same gate for every window of an image
        gate = value_gate.reshape(batch, 1, self.num_heads, 1, self.head_dim)
        v = (v.reshape(batch, -1, self.num_heads, ws * ws, self.head_dim) * gate).flatten(0, 1)
        x = attention(
            q,
            k,
            v,
            attn_mask=self._relative_position_bias().to(q.dtype),
            dropout_p=self.attn_drop if self.training else 0.0,
        )  # (B·nW, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(-1, ws, ws, channels)  # (B·nW, ws, ws, C/2)
        return window_reverse(x, (ws, ws), height, width)  # (B, H, W, C/2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) with H, W multiples of the window size → (B, H, W, C)."""
        x_attn = self.attn_in_norm(self.attn_in_proj(x))  # (B, H, W, C/2)
        x_conv = self.conv_in_norm(self.conv_in_proj(x)).permute(0, 3, 1, 2)  # (B, C, H, W)

        x_conv = self.depthwise_conv(x_conv)
        value_gate = self.channel_interaction(x_conv.mean((2, 3), keepdim=True)).sigmoid()  # (B, C/2, 1, 1)
        x_conv = self.conv_out_proj(x_conv)  # (B, C/2, H, W)

        x_attn = self._window_attention(x_attn, value_gate)  # (B, H, W, C/2)
        position_gate = self.spatial_interaction(x_attn.permute(0, 3, 1, 2)).sigmoid()  # (B, 1, H, W)
        x_conv = self.conv_out_norm(x_conv * position_gate).permute(0, 2, 3, 1)  # (B, H, W, C/2)

        x = torch.cat([self.attn_out_norm(x_attn), x_conv], dim=-1)  # (B, H, W, C): attention first
        return self.proj_drop(self.proj(x))


class MixingBlock(nn.Module):
    """x += DropPath(Mixing(LN(x))); x += DropPath(MLP(LN(x))) on a (B, H, W, C) map of any size.

    LN(x) is zero-padded at the bottom/right to a multiple of the window size for the mixing and cropped back.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        dwconv_kernel_size: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.mixing = MixingAttention(
            dim, num_heads, window_size, dwconv_kernel_size, qkv_bias, attn_drop, proj_drop, **dd
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        mixed = self.mixing(pad_to_multiple(x, self.window_size, channels_last=True))  # (B, H', W', C)
        return crop_like(mixed, x)  # (B, H, W, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self._mix(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ConvStem(nn.Module):
    """Three 3×3 conv-BN-GELU (the first with stride 2, to C/2), a 2×2 stride-2 conv to C, LN: stride 4.

    Returns (B, C, H/4, W/4); the image is zero-padded at the bottom/right to a multiple of 4 first.
    """

    def __init__(
        self,
        in_chans: int,
        dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        hidden = dim // 2
        self.conv1 = ConvNormAct(in_chans, hidden, 3, stride=2, bias=True, act_layer=nn.GELU, **dd)
        self.conv2 = ConvNormAct(hidden, hidden, 3, bias=True, act_layer=nn.GELU, **dd)
        self.conv3 = ConvNormAct(hidden, hidden, 3, bias=True, act_layer=nn.GELU, **dd)
        self.proj = nn.Conv2d(hidden, dim, kernel_size=2, stride=2, **dd)
        self.norm = nn.LayerNorm(dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_multiple(x, 4, channels_last=False)
        x = self.proj(self.conv3(self.conv2(self.conv1(x))))  # (B, C, H/4, W/4)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvDownsample(nn.Module):
    """BN then a 2×2 stride-2 conv: (B, C, H, W) → (B, C_out, ceil(H/2), ceil(W/2)).

    Odd sizes are zero-padded at the bottom/right after the BN (the official code accepts even sizes only).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm = nn.BatchNorm2d(in_dim, **dd)
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(pad_to_multiple(self.norm(x), 2, channels_last=False))


# --------------------------------------------------------------------------------------------------------------------
# Stage, head, model


class MixFormerStage(nn.Module):
    """An optional downsampling (BN + 2×2 stride-2 conv) followed by Mixing Blocks: (B, C, H, W) in and out.

    The blocks work channels-last inside the stage.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        downsample: bool,
        window_size: int = 7,
        dwconv_kernel_size: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: list[float] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        drop_path = drop_path or [0.0] * depth
        self.grad_checkpointing = False
        self.downsample = ConvDownsample(in_dim, dim, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *[
                MixingBlock(
                    dim,
                    num_heads,
                    window_size,
                    dwconv_kernel_size,
                    mlp_ratio,
                    qkv_bias,
                    proj_drop,
                    attn_drop,
                    drop_path[i],
                    **dd,
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


class MixFormerHead(nn.Module):
    """Per-token Linear(C → hidden) + GELU, global pooling, dropout, Linear(hidden → classes).

    Takes (B, C, H, W) (LN already applied). Without pooling (``pool_type=''``) the output stays a map,
    (B, classes, H, W). With ``hidden_size=0`` the projection is left out (a pruned head).
    """

    def __init__(
        self,
        in_features: int,
        hidden_size: int,
        num_classes: int,
        pool_type: str = "avg",
        drop_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_features = hidden_size or in_features
        self.proj = nn.Linear(in_features, hidden_size, **dd) if hidden_size else nn.Identity()
        self.act = nn.GELU() if hidden_size else nn.Identity()
        self.drop = nn.Dropout(drop_rate)
        self.reset(num_classes, pool_type, **dd)

    def reset(
        self,
        num_classes: int,
        pool_type: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Replace the classifier (and the pooling when ``pool_type`` is given)."""
        if pool_type is not None:
            if pool_type not in _GLOBAL_POOLS:
                raise DSNetError(f"global_pool={pool_type!r} is not one of {_GLOBAL_POOLS}")
            self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type), input_fmt="NHWC")
        in_features = self.num_features * self.global_pool.feat_mult()
        self.fc = nn.Linear(in_features, num_classes, device=device, dtype=dtype) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.act(self.proj(x.permute(0, 2, 3, 1)))  # (B, H, W, hidden)
        x = self.drop(self.global_pool(x))  # (B, hidden), or (B, H, W, hidden) without pooling
        if not pre_logits:
            x = self.fc(x)
        if self.global_pool.is_identity():
            x = x.permute(0, 3, 1, 2)  # (B, ·, H, W)
        return x


class MixFormer(StagedBackboneMixin, nn.Module):
    """MixFormer (CVPR 2022): a 4-stage pyramid of Mixing Blocks (strides 4, 8, 16, 32; channels C, 2C, 4C, 8C).

    The timm API (``forward_intermediates``, ``prune_intermediate_layers``, ``group_matcher``, ...) comes from
    :class:`~dsnet.models._stages.StagedBackboneMixin`; the final norm is a channels-last LayerNorm and the head
    is MixFormer's own (per-token projection before pooling).

    Args:
        in_chans: image channels.
        num_classes: classes of the classifier (0: no classifier).
        global_pool: ``'avg'`` (paper), ``'max'``, ``'avgmax'``, ``'catavgmax'`` or ``''`` (no pooling).
        embed_dim: C, the channels of the first stage (doubled at each stage).
        depths: Mixing Blocks per stage.
        num_heads: attention heads per stage (on half of the channels).
        window_size: attention window side (7 in the paper, no shift).
        dwconv_kernel_size: kernel of the depthwise convolution branch.
        mlp_ratio: MLP hidden width / channels.
        qkv_bias: bias of the q, k, v projections.
        head_hidden_size: width of the per-token projection before pooling (1280).
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after the mixing projection and in the MLPs.
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic depth, linearly increasing over all blocks up to this rate.
        device, dtype: where and how to create the parameters (``device="meta"`` allocates nothing).

    Training needs at least 2 images per device: the channel interaction batch-normalises one pooled
    vector per image (as the official model does).

    ONNX: exports with a symbolic batch, height and width (from 33 px: at 32 the last stage is 1×1, a size
    torch.export specializes). The example is traced at ≥ 256 px, where every stage has at least two windows per
    side, and through deferred runtime assertions, see :mod:`dsnet.export.onnx`.
    """

    #: Read by :func:`dsnet.export.onnx.export_onnx` for a dynamic-size export (see that module).
    onnx_min_size: int = 33
    onnx_trace_size: int = 256
    onnx_deferred_asserts: bool = True

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 32,
        depths: tuple[int, ...] = (1, 2, 6, 6),
        num_heads: tuple[int, ...] = (2, 4, 8, 16),
        window_size: int = 7,
        dwconv_kernel_size: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        head_hidden_size: int = 1280,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if len(depths) != len(num_heads):
            raise DSNetError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have the same length")
        if global_pool not in _GLOBAL_POOLS:
            raise DSNetError(f"global_pool={global_pool!r} is not one of {_GLOBAL_POOLS}")
        if window_size < 1:
            raise DSNetError(f"window_size={window_size} must be at least 1")
        num_stages = len(depths)
        dims = [embed_dim * 2**i for i in range(num_stages)]
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_features = dims[-1]
        self.head_hidden_size = head_hidden_size
        self.drop_rate = drop_rate

        self.stem = ConvStem(in_chans, dims[0], **dd)
        rates = calculate_drop_path_rates(drop_path_rate, sum(depths))
        stages, self.feature_info, start = [], [], 0
        for i in range(num_stages):
            stages.append(
                MixFormerStage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    depths[i],
                    num_heads[i],
                    downsample=i > 0,
                    window_size=window_size,
                    dwconv_kernel_size=dwconv_kernel_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rates[start : start + depths[i]],
                    **dd,
                )
            )
            start += depths[i]
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features, **dd)
        self.head = MixFormerHead(self.num_features, head_hidden_size, num_classes, global_pool, drop_rate, **dd)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Relative position bias tables (1-D parameters and biases are excluded by timm's optimizer factory)."""
        return {name for name, _ in self.named_parameters() if name.endswith("relative_position_bias_table")}

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifier for ``num_classes`` (0: none); ``global_pool`` as in the constructor, None keeps it."""
        super().reset_classifier(num_classes, global_pool)
        if global_pool is not None:
            self.global_pool = global_pool

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LN over the channels of (B, C, H, W)

    def _prune_head(self) -> None:
        """A head without projection, pooling and classifier: forward_head passes the features through."""
        self.head = MixFormerHead(self.num_features, 0, 0, "", **get_device_dtype(self))
        self.num_classes, self.global_pool, self.head_hidden_size = 0, "", self.num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in_chans, H, W) → normalised last-stage features (B, 8C, H/32, W/32)."""
        return self._final_norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Features (B, 8C, h, w) → logits (B, classes), or (B, head_hidden_size) with ``pre_logits``."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------------------------------------------------
# Official (PaddleClas) weights → ours

# Module paths of the official model (patch_embed.*, layers.i.blocks.j.attn.*, last_proj, ...) → ours.
_PADDLE_STEM = {
    "patch_embed.stem.0": "stem.conv1.conv",
    "patch_embed.stem.1": "stem.conv1.bn",
    "patch_embed.stem.3": "stem.conv2.conv",
    "patch_embed.stem.4": "stem.conv2.bn",
    "patch_embed.stem.6": "stem.conv3.conv",
    "patch_embed.stem.7": "stem.conv3.bn",
    "patch_embed.proj": "stem.proj",
    "patch_embed.norm": "stem.norm",
    "norm": "norm",
    "last_proj": "head.proj",
    "head": "head.fc",
}
_PADDLE_MIXING = {
    "proj_attn": "attn_in_proj",
    "proj_attn_norm": "attn_in_norm",
    "proj_cnn": "conv_in_proj",
    "proj_cnn_norm": "conv_in_norm",
    "dwconv3x3.0": "depthwise_conv.conv",
    "dwconv3x3.1": "depthwise_conv.bn",
    "channel_interaction.0": "channel_interaction.fc1",
    "channel_interaction.1": "channel_interaction.norm",
    "channel_interaction.3": "channel_interaction.fc2",
    "projection": "conv_out_proj",
    "conv_norm": "conv_out_norm",
    "qkv": "qkv",
    "spatial_interaction.0": "spatial_interaction.fc1",
    "spatial_interaction.1": "spatial_interaction.norm",
    "spatial_interaction.3": "spatial_interaction.fc2",
    "attn_norm": "attn_out_norm",
    "proj": "proj",
}
_PADDLE_PARAM = {"_mean": "running_mean", "_variance": "running_var"}


def paddle_key_to_ours(key: str) -> str | None:
    """Our state-dict key for a key of the official PaddleClas MixFormer, or None for keys we do not store.

    Raises:
        DSNetError: the key is not part of the official model.
    """
    module, _, param = key.rpartition(".")
    param = _PADDLE_PARAM.get(param, param)
    if module in _PADDLE_STEM:
        return f"{_PADDLE_STEM[module]}.{param}"
    match = re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)", module)
    if match:
        stage, block, rest = match.groups()
        prefix = f"stages.{stage}.blocks.{block}"
        if rest == "attn" and param == "relative_position_index":  # computed from the window size, not stored
            return None
        if rest == "attn" and param == "relative_position_bias_table":
            return f"{prefix}.mixing.{param}"
        if rest.startswith("attn.") and rest[len("attn.") :] in _PADDLE_MIXING:
            return f"{prefix}.mixing.{_PADDLE_MIXING[rest[len('attn.') :]]}.{param}"
        if rest in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            return f"{prefix}.{rest}.{param}"
    match = re.fullmatch(r"layers\.(\d+)\.downsample\.(norm|reduction)", module)
    if match:
        # the official stage i ends with the downsampling that our stage i + 1 starts with
        stage, part = int(match.group(1)) + 1, {"norm": "norm", "reduction": "conv"}[match.group(2)]
        return f"stages.{stage}.downsample.{part}.{param}"
    raise DSNetError(f"{key!r} is not a parameter of the official PaddleClas MixFormer")


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: MixFormer) -> dict[str, torch.Tensor]:
    """Map an official PaddleClas MixFormer state dict (numpy arrays or tensors) to ``model``'s keys.

    Renames keys (:func:`paddle_key_to_ours`), transposes Linear weights (Paddle stores them [in, out]),
    renames BN statistics (``_mean`` / ``_variance`` → ``running_mean`` / ``running_var``), adds
    ``num_batches_tracked``, checks that the stored relative position index is the one we compute, and
    verifies that the result has exactly the model's keys and shapes. A state dict already in our layout
    is returned unchanged.

    Raises:
        DSNetError: unknown keys, or keys/shapes that do not fit ``model`` (all differences listed).

    Example:
        >>> from dsnet.convert.pickle_safe import load_pdparams  # doctest: +SKIP
        >>> model = timm.create_model("mixformer_b1")  # doctest: +SKIP
        >>> paddle_weights = load_pdparams("MixFormer_B1_pretrained.pdparams")  # doctest: +SKIP
        >>> state_dict = checkpoint_filter_fn(paddle_weights, model)  # doctest: +SKIP
        >>> model.load_state_dict(state_dict)  # doctest: +SKIP
    """
    state_dict = state_dict_of(state_dict)
    if "stem.proj.weight" in state_dict:
        return dict(state_dict)
    targets = model.state_dict()
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    batch_norms = {name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    window = next(m for m in model.modules() if isinstance(m, MixingAttention)).window_size
    index = get_relative_position_index(window, window)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not hasattr(value, "shape"):  # Paddle metadata such as "StructuredToParameterName@@"
            continue
        tensor = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(value)
        new_key = paddle_key_to_ours(key)
        if new_key is None:  # a relative position index: must be the one of our window size
            if tensor.shape != index.shape or not torch.equal(tensor.long(), index):
                raise DSNetError(f"{key}: the relative position index does not belong to a {window}×{window} window")
            continue
        module = new_key.rpartition(".")[0]
        if module in linears and new_key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor.t()
        out[new_key] = tensor.contiguous()
    for name in batch_norms:
        if f"{name}.running_mean" in out:
            out[f"{name}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    verify_state_dict(
        out,
        {k: v.shape for k, v in targets.items()},
        source="PaddleClas MixFormer state dict",
        target=type(model).__name__,
        hint="Is it the same variant (B0…B6) and number of classes?",
    )
    return out


# --------------------------------------------------------------------------------------------------------------------
# Configurations and builders


def _create_mixformer(variant: str, pretrained: bool = False, **kwargs: Any) -> MixFormer:
    kwargs = pretrained_kwargs(variant, pretrained, kwargs, layout="paddle", no_release=_NO_RELEASE)
    kwargs = pretrained_file_kwargs(variant, pretrained, checkpoint_filter_fn, kwargs)  # the entry rule
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        MixFormer,
        variant,
        pretrained,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


_PADDLE_WEIGHTS = "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/MixFormer_{}_pretrained.pdparams"
_NO_RELEASE = (
    "PaddleClas published no MixFormer weights (its model doc, docs/zh_CN/models/ImageNet1k/MixFormer.md, lists no "
    "measured accuracy and says the models will be provided later; nothing shows the URLs in its code, origin_url, "
    "to be a release)"
)


def _cfg(origin_url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",  # no PyTorch weights are published; the Paddle files (origin_url) need converting
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,  # resize 256 → center crop 224
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1.conv",
        "classifier": "head.fc",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2204.02557",
        "paper_name": "MixFormer: Mixing Features across Windows and Dimensions",
        "origin_url": origin_url or "https://github.com/PaddlePaddle/PaddleClas",
        **kwargs,
    }


# PaddleClas lists ImageNet weights for B1-B4 and B6 (commit 60239c9 of its repository); none for B0 and B5.
default_cfgs = generate_default_cfgs(
    {
        "mixformer_b0": _cfg(),
        "mixformer_b1": _cfg(_PADDLE_WEIGHTS.format("B1")),
        "mixformer_b2": _cfg(_PADDLE_WEIGHTS.format("B2")),
        "mixformer_b3": _cfg(_PADDLE_WEIGHTS.format("B3")),
        "mixformer_b4": _cfg(_PADDLE_WEIGHTS.format("B4")),
        "mixformer_b5": _cfg(),
        "mixformer_b6": _cfg(_PADDLE_WEIGHTS.format("B6")),
    }
)

_SOURCE = "MixFormer paper (CVPR 2022), ImageNet-1k results; params as counted from the official code"
PAPER_FIGURES.update(
    {
        "mixformer_b0": PaperFigures(params_m=5.10, gmacs=0.4, top1=76.5, source=_SOURCE + " (B0)"),
        "mixformer_b1": PaperFigures(params_m=7.89, gmacs=0.7, top1=78.9, source=_SOURCE + " (B1)"),
        "mixformer_b2": PaperFigures(params_m=9.89, gmacs=0.9, top1=80.0, source=_SOURCE + " (B2)"),
        "mixformer_b3": PaperFigures(params_m=16.75, gmacs=1.9, top1=81.7, source=_SOURCE + " (B3)"),
        "mixformer_b4": PaperFigures(params_m=34.80, gmacs=3.6, top1=83.0, source=_SOURCE + " (B4)"),
        "mixformer_b5": PaperFigures(params_m=61.69, gmacs=6.8, top1=83.5, source=_SOURCE + " (B5)"),
        "mixformer_b6": PaperFigures(params_m=119.51, gmacs=12.7, top1=83.8, source=_SOURCE + " (B6)"),
    }
)


@register_model
def mixformer_b0(pretrained: bool = False, **kwargs: Any) -> MixFormer:
    """MixFormer-B0: C=24, depths 1-2-6-6, heads 3-6-12-24."""
    args = dict(embed_dim=24, depths=(1, 2, 6, 6), num_heads=(3, 6, 12, 24))
    return _create_mixformer("mixformer_b0", pretrained, **dict(args, **kwargs))


@register_model
def mixformer_b1(pretrained: bool = False, **kwargs: Any) -> MixFormer:
    """MixFormer-B1: C=32, depths 1-2-6-6, heads 2-4-8-16."""
    args = dict(embed_dim=32, depths=(1, 2, 6, 6), num_heads=(2, 4, 8, 16))
    return _create_mixformer("mixformer_b1", pretrained, **dict(args, **kwargs))


@register_model
def mixformer_b2(pretrained: bool = False, **kwargs: Any) -> MixFormer:
    """MixFormer-B2: C=32, depths 2-2-8-8, heads 2-4-8-16."""
    args = dict(embed_dim=32, depths=(2, 2, 8, 8), num_heads=(2, 4, 8, 16))
    return _create_mixformer("mixformer_b2", pretrained, **dict(args, **kwargs))


@register_model
def mixformer_b3(pretrained: bool = False, **kwargs: Any) -> MixFormer:
    """MixFormer-B3: C=48, depths 2-2-8-6, heads 3-6-12-24."""
    args = dict(embed_dim=48, depths=(2, 2, 8, 6), num_heads=(3, 6, 12, 24))
    return _create_mixformer("mixformer_b3", pretrained, **dict(args, **kwargs))


@register_model
def mixformer_b4(pretrained: bool = False, **kwargs: Any) -> MixFormer:
    """MixFormer-B4: C=64, depths 2-2-8-8, heads 4-8-16-32."""
    args = dict(embed_dim=64, depths=(2, 2, 8, 8), num_heads=(4, 8, 16, 32))
    return _create_mixformer("mixformer_b4", pretrained, **dict(args, **kwargs))


@register_model
def mixformer_b5(pretrained: bool = False, **kwargs: Any) -> MixFormer:
    """MixFormer-B5: C=96, depths 1-2-8-6, heads 6-12-24-48."""
    args = dict(embed_dim=96, depths=(1, 2, 8, 6), num_heads=(6, 12, 24, 48))
    return _create_mixformer("mixformer_b5", pretrained, **dict(args, **kwargs))


@register_model
def mixformer_b6(pretrained: bool = False, **kwargs: Any) -> MixFormer:
    """MixFormer-B6: C=96, depths 2-4-16-12, heads 6-12-24-48."""
    args = dict(embed_dim=96, depths=(2, 4, 16, 12), num_heads=(6, 12, 24, 48))
    return _create_mixformer("mixformer_b6", pretrained, **dict(args, **kwargs))
