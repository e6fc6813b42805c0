"""Mobile-Former: a MobileNet stream and a Transformer over a few global tokens, joined by a two-way bridge.

Paper: Yinpeng Chen, Xiyang Dai, Dongdong Chen, Mengchen Liu, Xiaoyi Dong, Lu Yuan, Zicheng Liu, "Mobile-Former:
Bridging MobileNet and Transformer", CVPR 2022, https://arxiv.org/abs/2108.05895.
The authors published no code; the structure here is the one of the only public release with ImageNet weights for
all seven models, https://github.com/AAboys/MobileFormer (PyTorch, timm 0.3.4 era), so that its checkpoints
convert exactly (:func:`checkpoint_filter_fn`).

Every Mobile-Former block runs, on a feature map x (B, C, H, W) and M global tokens z (B, M, d):

    z = LN(z + Proj(gate(z) · Attn(q = Wq z, k = v = x)))      # Mobile → Former (2 heads, no key/value projection)
    z = LN(z + Proj(Attn(q = Wq z, k = v = z)))                # Former: token self-attention (4 heads)
    z = LN(z + FFN(z))                                         #         FFN ×2, GELU
    y = Mobile(x; z[0])                                        # inverted bottleneck, dynamic ReLU from token 0
    x' = y + Attn(q = y, k = Wk z, v = Wv z)                   # Former → Mobile (2 heads)

The Mobile sub-block is pw → dw → pw at stride 1 (residual when the width is unchanged, added *before* Former →
Mobile) and dw(stride 2, expand) → pw → dw → pw when downsampling (a residual around the last dw → pw pair). Its
two-slope dynamic ReLU, ``max(a1 · x, a2 · x)`` per channel, takes its slopes from token 0 through
Linear(d → d/4) → ReLU → Linear → hard sigmoid, mapped to a1 ∈ [0, 2] and a2 ∈ [−1, 1].

The head concatenates the pooled map (1×1 conv to 6C + ReLU6, average pool, h-swish) with token 0 (after one more
Mobile → Former bridge) → Linear → BatchNorm1d → h-swish → dropout → Linear.

Where the release differs from the paper, we follow the release (its weights depend on it):

* Mobile → Former projects neither keys nor values of the map and scales its result with a learned gate
  (``gate``: Linear(d → C) + hard sigmoid, ×2) that the paper does not describe; the Former's attention projects
  only its queries (keys = values = tokens). The paper writes query, key and value projections on the token side.
* The FFN of the Former expands ×2 (the paper: ×2 as well for these models) and has no drop path.
* Post-norm LayerNorms (after each residual), not the pre-norm of the paper's figure.
* The first block of every model is convolution only (no tokens); here it is part of the ``stem``.

Layout for the timm API: ``stem`` (3×3/2 conv + BN + ReLU6 and the first, token-free block), then four
``stages`` that start where the map is downsampled, so the stage outputs have strides 4, 8, 16, 32. Each stage
passes ``(map, tokens)``; its ``map_output`` identity module is the node feature extractors take. The final
Mobile → Former bridge (that updates the tokens the head reads) sits where the other families have their final
norm (``norm``). :meth:`MobileFormer.forward_features` returns the last map with token 0 appended as extra
channels (broadcast over the map): (B, C + d, H, W), so ``num_features = C + d``; the head splits it again.

Any input of at least 32 px works, square or not: the bridges attend over however many positions the map has.
Batch-1 training: the head's BatchNorm1d uses its running statistics for a batch of one sample (it cannot
estimate a variance from one value); the 2-D BatchNorms need more than one value per channel, so at batch 1 the
input must be larger than 32 px (the last map is 1×1 at 32 px).

Example:
    >>> import timm, torch, dsnet
    >>> model = timm.create_model("mobile_former_26m").eval()
    >>> model(torch.randn(1, 3, 224, 224)).shape
    torch.Size([1, 1000])
    >>> [f.shape[1:] for f in model.forward_intermediates(torch.randn(1, 3, 64, 96), intermediates_only=True)]
    [torch.Size([12, 16, 24]), torch.Size([24, 8, 12]), torch.Size([64, 4, 6]), torch.Size([96, 2, 3])]
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ConvNormAct, DropPath, Mlp, get_device_dtype, register_notrace_function
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from dsnet.errors import DSNetError
from dsnet.layers.attention import attention
from dsnet.models._checkpoint import pretrained_file_kwargs, state_dict_of, verify_state_dict
from dsnet.models._paper import PAPER_FIGURES, PaperFigures
from dsnet.models._pretrained import pretrained_kwargs
from dsnet.models._stages import StagedBackboneMixin

__all__ = ["BlockArgs", "MobileFormer", "MobileFormerBlock", "checkpoint_filter_fn"]


class BlockArgs(NamedTuple):
    """One entry of a model's block list (the release's ``[block, e1, c, n, s, e2]`` rows, with n = 1 everywhere).

    Attributes:
        expansion: hidden width of the first conv, × the block's input channels.
        channels: output channels.
        stride: 1, or 2 for a downsampling block.
        expansion2: hidden width of the second dw conv of a downsampling block, × its output channels
            (0 marks the convolution-only first block).
    """

    expansion: int
    channels: int
    stride: int
    expansion2: int


# ----------------------------------------------------------------------------------------------------------------------
# Small layers
# ----------------------------------------------------------------------------------------------------------------------


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle of (B, C, H, W): C = groups·n channels reordered as (n, groups)."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


class DynamicReLU(nn.Module):
    """Two-slope dynamic ReLU ``max(a1·x, a2·x)`` whose per-channel slopes are computed from one global token.

    a = hard_sigmoid(Linear(ReLU(Linear(token)))) gives 2C values; a1 = 2(a − ½) + 1 ∈ [0, 2] (first C),
    a2 = 2(a − ½) ∈ [−1, 1] (last C).
    """

    def __init__(
        self,
        token_dim: int,
        channels: int,
        reduction: int = 4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(token_dim, token_dim // reduction, **dd)
        self.fc2 = nn.Linear(token_dim // reduction, 2 * channels, **dd)

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        coeffs = F.hardsigmoid(self.fc2(F.relu(self.fc1(token))))[:, :, None, None]  # (B, 2C, 1, 1)
        a1, a2 = coeffs.chunk(2, dim=1)
        a1 = (a1 - 0.5) * 2.0 + 1.0
        a2 = (a2 - 0.5) * 2.0
        return torch.maximum(x * a1, x * a2)


@register_notrace_function  # a Python branch on the batch size: a leaf for torch.fx
def head_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    training: bool,
    momentum: float,
    eps: float,
) -> torch.Tensor:
    """BatchNorm of (B, C); a training batch of one sample is normalised with the running statistics."""
    if training and x.shape[0] == 1:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    if training:
        num_batches_tracked.add_(1)
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


torch.fx.wrap("head_batch_norm")  # also a leaf for plain torch.fx / torchvision's feature extractor


class HeadBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that normalises a training batch of one sample with its running statistics (instead of failing).

    A single value per channel has no variance; ``nn.BatchNorm1d`` raises there, which would stop a training run
    whose last batch holds one image.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        momentum = 0.1 if self.momentum is None else self.momentum
        return head_batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            self.weight,
            self.bias,
            self.training,
            momentum,
            self.eps,
        )


# ----------------------------------------------------------------------------------------------------------------------
# The bridge and the Former
# ----------------------------------------------------------------------------------------------------------------------


class MobileToFormer(nn.Module):
    """Tokens (B, M, d) attend over the positions of the map (B, C, H, W); keys = values = the raw map.

    Args:
        dim: map channels C.
        token_dim: token width d.
        num_heads: attention heads (C splits into heads).
        drop_path: stochastic depth on the token update.
    """

    def __init__(
        self,
        dim: int,
        token_dim: int,
        num_heads: int = 2,
        drop_path: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % num_heads:
            raise DSNetError(f"Mobile→Former: width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(token_dim, dim, **dd)
        self.gate = nn.Linear(token_dim, dim, **dd)
        self.proj = nn.Linear(dim, token_dim, **dd)
        self.norm = nn.LayerNorm(token_dim, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        q = self.q(tokens).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, heads, M, C/heads)
        kv = x.flatten(2).unflatten(1, (self.num_heads, -1)).transpose(-1, -2)  # (B, heads, HW, C/heads)
        out = attention(q, kv, kv).transpose(1, 2).flatten(2)  # (B, M, C)
        out = out * (F.hardsigmoid(self.gate(tokens)) * 2.0)
        return self.norm(tokens + self.drop_path(self.proj(out)))  # (B, M, d)


class Former(nn.Module):
    """Self-attention over the tokens (only queries projected; keys = values = tokens), then an FFN; post-norm."""

    def __init__(
        self,
        token_dim: int,
        num_heads: int = 4,
        ffn_ratio: float = 2.0,
        drop_path: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if token_dim % num_heads:
            raise DSNetError(f"Former: token width {token_dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(token_dim, token_dim, **dd)
        self.proj = nn.Linear(token_dim, token_dim, **dd)
        self.norm1 = nn.LayerNorm(token_dim, **dd)
        self.mlp = Mlp(token_dim, int(token_dim * ffn_ratio), act_layer=nn.GELU, **dd)
        self.norm2 = nn.LayerNorm(token_dim, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q = self.q(tokens).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, heads, M, d/heads)
        kv = tokens.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        out = attention(q, kv, kv).transpose(1, 2).flatten(2)  # (B, M, d)
        tokens = self.norm1(tokens + self.drop_path(self.proj(out)))
        return self.norm2(tokens + self.mlp(tokens))


class FormerToMobile(nn.Module):
    """Every position of the map (B, C, H, W) attends over the tokens; queries = the raw map, keys/values projected."""

    def __init__(
        self,
        dim: int,
        token_dim: int,
        num_heads: int = 2,
        drop_path: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % num_heads:
            raise DSNetError(f"Former→Mobile: width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.k = nn.Linear(token_dim, dim, **dd)
        self.v = nn.Linear(token_dim, dim, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        q = x.flatten(2).unflatten(1, (self.num_heads, -1)).transpose(-1, -2)  # (B, heads, HW, C/heads)
        k = self.k(tokens).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, heads, M, C/heads)
        v = self.v(tokens).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        out = attention(q, k, v).transpose(-1, -2).reshape(x.shape)  # (B, C, H, W)
        return x + self.drop_path(out)


# ----------------------------------------------------------------------------------------------------------------------
# Mobile sub-blocks and the Mobile-Former block
# ----------------------------------------------------------------------------------------------------------------------


def _conv_bn(
    in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, groups: int = 1, **dd: Any
) -> ConvNormAct:
    """Conv (no bias) + BatchNorm, no activation."""
    return ConvNormAct(in_chs, out_chs, kernel_size, stride=stride, groups=groups, apply_act=False, **dd)


class ConvOnlyBlock(nn.Module):
    """The token-free first block: dw 3×3 (× expansion) + BN + ReLU6, pw + BN; residual if the shape is kept."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int,
        expansion: int,
        groups: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dw = ConvNormAct(in_chs, in_chs * expansion, 3, stride=stride, groups=in_chs, act_layer=nn.ReLU6, **dd)
        self.shuffle_groups = in_chs if groups > 1 else 1
        self.pw = _conv_bn(in_chs * expansion, out_chs, groups=groups, **dd)
        self.has_skip = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dw(x)
        if self.shuffle_groups > 1:
            out = channel_shuffle(out, self.shuffle_groups)
        out = self.pw(out)
        return out + x if self.has_skip else out


class MobileSubBlock(nn.Module):
    """Stride-1 Mobile sub-block: pw (expand) + BN → dynamic ReLU → dw 3×3 + BN → dynamic ReLU → pw + BN.

    With ``groups`` > 1 (mobile_former_26m) the pw convs are grouped and followed by a channel shuffle.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        expansion: int,
        token_dim: int,
        groups: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        hidden = round(in_chs * expansion)
        self.groups = groups
        self.expand = _conv_bn(in_chs, hidden, groups=groups, **dd)
        self.dyrelu1 = DynamicReLU(token_dim, hidden, **dd)
        self.dw = _conv_bn(hidden, hidden, 3, groups=hidden, **dd)
        self.dyrelu2 = DynamicReLU(token_dim, hidden, **dd)
        self.project = _conv_bn(hidden, out_chs, groups=groups, **dd)

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        x = self.expand(x)
        if self.groups > 1:
            x = channel_shuffle(x, self.groups)
        x = self.dyrelu2(self.dw(self.dyrelu1(x, token)), token)
        x = self.project(x)
        if self.groups > 1:
            x = channel_shuffle(x, self.groups)
        return x


class DownsampleMobileSubBlock(nn.Module):
    """Stride-2 Mobile sub-block: dw 3×3/2 (expand) + BN → dynamic ReLU → pw + BN, then
    ``y + pw(dynamic ReLU(dw 3×3(y)))`` (dw expanding ×``expansion2``, each conv followed by BN).

    With ``groups`` > 1 the pw convs are grouped and each expanding dw conv is followed by a channel shuffle.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        expansion: int,
        expansion2: int,
        token_dim: int,
        groups: int = 1,
        drop_path: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        hidden1, hidden2 = round(in_chs * expansion), round(out_chs * expansion2)
        self.in_chs, self.out_chs, self.groups = in_chs, out_chs, groups
        self.dw_expand = _conv_bn(in_chs, hidden1, 3, stride=2, groups=in_chs, **dd)
        self.dyrelu1 = DynamicReLU(token_dim, hidden1, **dd)
        self.reduce = _conv_bn(hidden1, out_chs, groups=groups, **dd)
        self.dw = _conv_bn(out_chs, hidden2, 3, groups=out_chs, **dd)
        self.dyrelu2 = DynamicReLU(token_dim, hidden2, **dd)
        self.project = _conv_bn(hidden2, out_chs, groups=groups, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        x = self.dw_expand(x)
        if self.groups > 1:
            x = channel_shuffle(x, self.in_chs)
        x = self.reduce(self.dyrelu1(x, token))
        y = self.dw(x)
        if self.groups > 1:
            y = channel_shuffle(y, self.out_chs)
        y = self.project(self.dyrelu2(y, token))
        return x + self.drop_path(y)


class MobileFormerBlock(nn.Module):
    """Mobile → Former, Former, Mobile (dynamic ReLU from token 0), Former → Mobile (see the module docstring)."""

    def __init__(
        self,
        in_chs: int,
        args: BlockArgs,
        token_dim: int,
        groups: int = 1,
        bridge_heads: int = 2,
        former_heads: int = 4,
        drop_path: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        out_chs = args.channels
        self.mobile_to_former = MobileToFormer(in_chs, token_dim, bridge_heads, drop_path=drop_path, **dd)
        self.former = Former(token_dim, former_heads, drop_path=drop_path, **dd)
        self.mobile: MobileSubBlock | DownsampleMobileSubBlock
        if args.stride == 2:
            self.mobile = DownsampleMobileSubBlock(
                in_chs, out_chs, args.expansion, args.expansion2, token_dim, groups, drop_path=drop_path, **dd
            )
        elif args.stride == 1:
            self.mobile = MobileSubBlock(in_chs, out_chs, args.expansion, token_dim, groups, **dd)
        else:
            raise DSNetError(f"Mobile-Former blocks have stride 1 or 2, got {args.stride}")
        self.has_skip = args.stride == 1 and in_chs == out_chs
        self.drop_path = DropPath(drop_path) if drop_path > 0 and self.has_skip else nn.Identity()
        self.former_to_mobile = FormerToMobile(out_chs, token_dim, bridge_heads, drop_path=drop_path, **dd)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.former(self.mobile_to_former(x, tokens))  # (B, M, d)
        out = self.mobile(x, tokens[:, 0])  # (B, C', H', W')
        if self.has_skip:
            out = x + self.drop_path(out)
        return self.former_to_mobile(out, tokens), tokens


# ----------------------------------------------------------------------------------------------------------------------
# Stem, stage, head
# ----------------------------------------------------------------------------------------------------------------------


class MobileFormerStem(nn.Module):
    """3×3/2 conv + BN + ReLU6, then the token-free first block (stride 1 or 2)."""

    def __init__(
        self,
        in_chans: int,
        stem_chs: int,
        args: BlockArgs,
        groups: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv = ConvNormAct(in_chans, stem_chs, 3, stride=2, act_layer=nn.ReLU6, **dd)
        self.block = ConvOnlyBlock(stem_chs, args.channels, args.stride, args.expansion, groups, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.conv(x))


class MobileFormerStage(nn.Module):
    """Blocks from one downsampling to the next; passes (map, tokens)."""

    def __init__(self, blocks: Sequence[MobileFormerBlock]) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(blocks)
        self.map_output = nn.Identity()  # the node feature extractors (torch.fx) take as the stage's output

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x, tokens = checkpoint(block, x, tokens)
            else:
                x, tokens = block(x, tokens)
        return self.map_output(x), tokens


class MobileFormerHead(nn.Module):
    """Split (map ‖ token 0) features, 1×1 conv + BN + ReLU6 on the map, avg pool + h-swish, concat token 0,
    Linear + BatchNorm1d + h-swish (the pre-logits), dropout, classifier.

    With ``map_only`` (after :meth:`MobileFormer.prune_intermediate_layers`) the input is a plain map and the head
    only pools it.
    """

    def __init__(
        self,
        in_chs: int,
        token_dim: int,
        conv_chs: int,
        hidden_size: int,
        num_classes: int,
        groups: int = 1,
        drop_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.token_dim = token_dim
        self.groups = groups
        self.map_only = False
        self.conv = ConvNormAct(in_chs, conv_chs, 1, groups=groups, act_layer=nn.ReLU6, **dd)
        self.hidden_fc = nn.Linear(conv_chs + token_dim, hidden_size, **dd)
        self.hidden_norm = HeadBatchNorm1d(hidden_size, **dd)
        self.drop = nn.Dropout(drop_rate)
        self.hidden_size = hidden_size
        self.fc: nn.Module = nn.Linear(hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def reset(
        self,
        num_classes: int,
        pool_type: str | None = None,
        in_features: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """New classifier with ``num_classes`` outputs (0: none). Pooling is always average (``pool_type`` "avg",
        or None to keep it); ``in_features`` switches to ``map_only`` (pooling of a plain map, no classifier)."""
        if pool_type not in (None, "", "avg"):
            raise DSNetError(f"Mobile-Former's head pools by average only; global_pool={pool_type!r}")
        if in_features is not None:
            self.map_only = True
            self.fc = nn.Identity()
            return
        self.fc = nn.Linear(self.hidden_size, num_classes, device=device, dtype=dtype) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.map_only:
            return x.mean((2, 3))
        feature_map, token = x[:, : -self.token_dim], x[:, -self.token_dim :, 0, 0]  # (B, C, H, W), (B, d)
        if self.groups > 1:
            feature_map = channel_shuffle(feature_map, self.groups)
        pooled = F.hardswish(self.conv(feature_map).mean((2, 3)))  # (B, 6C)
        x = F.hardswish(self.hidden_norm(self.hidden_fc(torch.cat([pooled, token], dim=1))))  # (B, hidden)
        if pre_logits:
            return x
        return self.fc(self.drop(x))


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


class MobileFormer(StagedBackboneMixin, nn.Module):
    """Mobile-Former image classifier / backbone (see the module docstring).

    The timm API (``group_matcher``, ``prune_intermediate_layers``, ...) comes from
    :class:`~dsnet.models._stages.StagedBackboneMixin`; ``forward_intermediates`` is our own because stages pass
    (map, tokens).

    Args:
        blocks: the block list; the first entry is the token-free block of the stem (``expansion2 == 0``).
        in_chans: input image channels.
        num_classes: classifier outputs; 0 for no classifier.
        global_pool: only ``"avg"``.
        stem_chs: channels of the stem conv.
        token_num: number of global tokens M.
        token_dim: token width d.
        head_conv_ratio: the head's 1×1 conv widens the last map by this factor.
        head_hidden_size: width of the head's hidden layer (the pre-logits).
        groups: groups of the pointwise convs (4 in mobile_former_26m, with channel shuffles).
        bridge_heads: heads of Mobile → Former and Former → Mobile.
        former_heads: heads of the Former's self-attention.
        drop_rate: dropout before the classifier (0.3 in the release's recipe).
        drop_path_rate: stochastic depth; block i of L gets ``rate · (i + 1) / L`` as in the release, the final
            bridge the full rate.
        device, dtype: where and in which dtype to create parameters (``"meta"`` works).
    """

    _stem_group_regex = r"^(?:stem|global_tokens)"
    _stage_entry_regex = r"blocks\.0\."  # every stage starts with a block (no separate downsample)

    def __init__(
        self,
        blocks: Sequence[BlockArgs | Sequence[int]] = (),
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        stem_chs: int = 16,
        token_num: int = 6,
        token_dim: int = 192,
        head_conv_ratio: int = 6,
        head_hidden_size: int = 1920,
        groups: int = 1,
        bridge_heads: int = 2,
        former_heads: int = 4,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        block_args = [BlockArgs(*b) for b in blocks]
        if len(block_args) < 2 or block_args[0].expansion2 != 0 or any(b.expansion2 == 0 for b in block_args[1:]):
            raise DSNetError("MobileFormer: blocks must be a token-free first block (expansion2=0), then token blocks")
        if global_pool not in ("avg", ""):
            raise DSNetError(f"MobileFormer pools by average only; global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.token_dim = token_dim

        self.global_tokens = nn.Parameter(torch.empty(token_num, token_dim, **dd))
        self.stem = MobileFormerStem(in_chans, stem_chs, block_args[0], groups, **dd)
        reduction = 2 * block_args[0].stride
        in_chs = block_args[0].channels
        num_blocks = len(block_args)
        stages: list[list[MobileFormerBlock]] = [[]]
        self.feature_info = []
        for i, args in enumerate(block_args[1:], start=1):
            if args.stride == 2 and reduction >= 4:  # a new stage starts at every downsampling from stride 4 on
                stages.append([])
            reduction *= args.stride
            block = MobileFormerBlock(
                in_chs,
                args,
                token_dim,
                groups,
                bridge_heads,
                former_heads,
                drop_path=drop_path_rate * (i + 1) / num_blocks,
                **dd,
            )
            stages[-1].append(block)
            in_chs = args.channels
            if len(self.feature_info) < len(stages):
                self.feature_info.append({})
            self.feature_info[-1] = {
                "num_chs": in_chs,
                "reduction": reduction,
                "module": f"stages.{len(stages) - 1}.map_output",
            }
        self.stages = nn.Sequential(*(MobileFormerStage(s) for s in stages))
        self.norm = MobileToFormer(in_chs, token_dim, bridge_heads, drop_path=drop_path_rate, **dd)
        self.num_features = in_chs + token_dim
        self.head_hidden_size = head_hidden_size
        self.head = MobileFormerHead(
            in_chs, token_dim, in_chs * head_conv_ratio, head_hidden_size, num_classes, groups, drop_rate, **dd
        )
        self.apply(self._init_weights)
        nn.init.normal_(self.global_tokens)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """As the release: convs N(0, 2 / (k·k·out)), Linear N(0, 0.01²) with zero bias."""
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The global tokens (learned embeddings, like a ViT's class token)."""
        return {"global_tokens"}

    # --- the mixin's hooks, with tokens ---------------------------------------------------------------------------

    def _forward_stem(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        # a copy, not a view: views of a parameter taken under no_grad keep requires_grad without a grad_fn
        tokens = self.global_tokens.unsqueeze(0).repeat(x.shape[0], 1, 1)  # (B, M, d)
        return self.stem(x), tokens

    def _final_norm(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """Final Mobile → Former bridge, then token 0 appended to the map as channels: (B, C + d, H, W)."""
        if isinstance(self.norm, nn.Identity) or tokens is None:
            return x
        token = self.norm(x, tokens)[:, 0, :, None, None]  # (B, d, 1, 1)
        return torch.cat([x, token.expand(-1, -1, x.shape[2], x.shape[3])], dim=1)

    def _prune_head(self) -> None:
        self.num_classes = 0
        if isinstance(self.norm, nn.Identity):  # features are a plain map now
            self.head_hidden_size = self.num_features
            self.head.reset(0, "", in_features=self.num_features)
        else:
            self.head.reset(0, **get_device_dtype(self))

    # --- timm API -----------------------------------------------------------------------------------------------------

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage output maps (strides 4, 8, 16, 32) and the final features, as in timm.

        ``norm=True`` turns the last stage's map into the final features (bridge + token 0 appended).
        """
        if output_fmt != "NCHW":
            raise DSNetError(f"MobileFormer features are NCHW; output_fmt={output_fmt!r} is not supported")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        x, tokens = self._forward_stem(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
        intermediates = []
        feat_idx = 0
        for feat_idx, stage in enumerate(stages):
            x, tokens = stage(x, tokens)
            if feat_idx in take_indices:
                intermediates.append(self._final_norm(x, tokens) if norm and feat_idx == last_idx else x)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self._final_norm(x, tokens)
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) → (B, C + d, H/32, W/32): the last map with token 0 appended (broadcast)."""
        x, tokens = self._forward_stem(x)
        for stage in self.stages:
            x, tokens = stage(x, tokens)
        return self._final_norm(x, tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------------------------------
# Released checkpoints (AAboys/MobileFormer)
# ----------------------------------------------------------------------------------------------------------------------

# Release module path → ours, inside one block (``features.{i}.`` prefix removed).
_BRIDGE = {"local_global.q": "mobile_to_former.q", "local_global.alpha.0": "mobile_to_former.gate"}
_BRIDGE |= {"local_global.proj": "mobile_to_former.proj", "local_global.layer_norm": "mobile_to_former.norm"}
_FORMER = {
    "global_block.q": "former.q",
    "global_block.channel_mlp": "former.proj",
    "global_block.layer_norm": "former.norm1",
    "global_block.ffn.0": "former.mlp.fc1",
    "global_block.ffn.2": "former.mlp.fc2",
    "global_block.ffn_norm": "former.norm2",
    "global_local.k": "former_to_mobile.k",
    "global_local.proj": "former_to_mobile.v",
}
_MOBILE_STRIDE1 = {
    "conv1.0": "expand.conv",
    "conv1.1": "expand.bn",
    "hyper1.hyper.0": "dyrelu1.fc1",
    "hyper1.hyper.2": "dyrelu1.fc2",
    "conv2.0": "dw.conv",
    "conv2.1": "dw.bn",
    "hyper2.hyper.0": "dyrelu2.fc1",
    "hyper2.hyper.2": "dyrelu2.fc2",
    "conv3.0": "project.conv",
    "conv3.1": "project.bn",
}
_MOBILE_STRIDE2 = {
    "conv1.0": "dw_expand.conv",
    "conv1.1": "dw_expand.bn",
    "hyper1.hyper.0": "dyrelu1.fc1",
    "hyper1.hyper.2": "dyrelu1.fc2",
    "conv2.0": "reduce.conv",
    "conv2.1": "reduce.bn",
    "conv3.0": "dw.conv",
    "conv3.1": "dw.bn",
    "hyper3.hyper.0": "dyrelu2.fc1",
    "hyper3.hyper.2": "dyrelu2.fc2",
    "conv4.0": "project.conv",
    "conv4.1": "project.bn",
}
_OUTSIDE_BLOCKS = {
    "stem.0": "stem.conv.conv",
    "stem.1": "stem.conv.bn",
    "features.0.conv.0": "stem.block.dw.conv",
    "features.0.conv.1": "stem.block.dw.bn",
    "features.0.conv.4": "stem.block.pw.conv",
    "features.0.conv.5": "stem.block.pw.bn",
    "local_global.q": "norm.q",
    "local_global.alpha.0": "norm.gate",
    "local_global.proj": "norm.proj",
    "local_global.layer_norm": "norm.norm",
    "classifier.conv.1": "head.conv.conv",
    "classifier.conv.2": "head.conv.bn",
    "classifier.fc.0": "head.hidden_fc",
    "classifier.fc.1": "head.hidden_norm",
    "classifier.classifier.1": "head.fc",
}
_RELEASE_BLOCK = re.compile(r"^features\.(\d+)\.(.+)$")


def release_key_to_ours(key: str, block_paths: Sequence[tuple[str, bool]]) -> str:
    """One key of an AAboys/MobileFormer state dict → our name.

    Args:
        key: e.g. ``features.3.global_local.k.weight``.
        block_paths: for the release's ``features.{i}`` with i ≥ 1, our block path and whether it downsamples.

    Raises:
        DSNetError: a key that is not part of that release's models.
    """
    if key == "tokens.weight":
        return "global_tokens"
    module, _, param = key.rpartition(".")
    if module in _OUTSIDE_BLOCKS:
        return f"{_OUTSIDE_BLOCKS[module]}.{param}"
    match = _RELEASE_BLOCK.match(module)
    if match and 1 <= int(match[1]) <= len(block_paths):
        path, downsamples = block_paths[int(match[1]) - 1]
        rest = match[2]
        if rest in _BRIDGE or rest in _FORMER:
            return f"{path}.{_BRIDGE.get(rest) or _FORMER[rest]}.{param}"
        mobile = _MOBILE_STRIDE2 if downsamples else _MOBILE_STRIDE1
        if rest in mobile:
            return f"{path}.mobile.{mobile[rest]}.{param}"
    raise DSNetError(f"{key!r} is not a parameter of an AAboys/MobileFormer model of this size")


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: MobileFormer) -> dict[str, torch.Tensor]:
    """Convert an AAboys/MobileFormer checkpoint (``mobile-former-*.pth.tar``) to ``model``'s names.

    Accepts the bare state dict or a training checkpoint, unwrapped by the package's one rule
    (:func:`dsnet.models._checkpoint.choose_entry`: ``state_dict`` before ``state_dict_ema``; ``module.``
    prefixes are stripped). Only names change (no tensor is reshaped); every key and shape is checked against
    ``model``. Classifier weights of another class count are passed through for timm to drop. A state dict
    already in our names passes through unchanged.

    Raises:
        DSNetError: a key the release's models do not have, or keys/shapes that do not fit ``model``.
    """
    state_dict = state_dict_of(state_dict)
    if "global_tokens" in state_dict:
        return dict(state_dict)
    block_paths = [
        (f"stages.{s}.blocks.{b}", isinstance(block.mobile, DownsampleMobileSubBlock))
        for s, stage in enumerate(model.stages)
        for b, block in enumerate(stage.blocks)
    ]
    out = {release_key_to_ours(k, block_paths): v for k, v in state_dict.items()}
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.num_classes != out.get("head.fc.weight", torch.empty(0, 0)).shape[0]:
        expected |= {k: out[k].shape for k in ("head.fc.weight", "head.fc.bias") if k in out}  # timm drops them
    verify_state_dict(
        out,
        expected,
        source="AAboys/MobileFormer state dict",
        target=type(model).__name__,
        hint="Is it the same model size (26m … 508m)?",
    )
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------------


def _create_mobile_former(variant: str, pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    kwargs = pretrained_kwargs(variant, pretrained, kwargs, layout="torch", no_release=_NO_RELEASE)
    kwargs = pretrained_file_kwargs(variant, pretrained, checkpoint_filter_fn, kwargs)  # the entry rule
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        MobileFormer,
        variant,
        pretrained,
        feature_cfg={"out_indices": out_indices, "feature_cls": "getter"},
        **kwargs,
    )


def _cfg(drive_id: str, **kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv.conv",
        "classifier": "head.fc",
        "paper_ids": "arXiv:2108.05895",
        "paper_name": "Mobile-Former: Bridging MobileNet and Transformer",
        # a Google Drive page, not a file: download by hand, then `dsnet convert torch`
        "origin_url": f"https://drive.google.com/file/d/{drive_id}/view",
        **kwargs,
    }


_NO_RELEASE = (
    "the release (AAboys/MobileFormer) is a Google Drive page, not a direct URL, so it cannot be downloaded for you; "
    "the file behind it is the release's .pth.tar training checkpoint"
)
# Google Drive ids of the release's weights (its README, commit f447310).
default_cfgs = generate_default_cfgs(
    {
        "mobile_former_508m.in1k": _cfg("1bqLIcpbCaxK-Eb4wcxk0iJpFJ1nXfGuF"),
        "mobile_former_294m.in1k": _cfg("1JBSM7NJ60fN9TgT5sMnbhmbZwrzcBd0r"),
        "mobile_former_214m.in1k": _cfg("13MOjdIMMBJgqyq_ld-grRhBBHOFU5Ggd"),
        "mobile_former_151m.in1k": _cfg("1w4QO-zhJ8QI1zGu7iOZ7lXxYJ5G1VXdF"),
        "mobile_former_96m.in1k": _cfg("1kMbRceswujtliCHKr-nxMFsrkvBrEfrW"),
        "mobile_former_52m.in1k": _cfg("1ekq_FPl57gjIlYX16Ll0nBuEyB0pjgGt"),
        "mobile_former_26m.in1k": _cfg("15uWYzx2VWWUjacZQHB56vOHzKxQDlp5O"),
    }
)

_SOURCE = "Mobile-Former paper (CVPR 2022), Table 8 / AAboys/MobileFormer README"
PAPER_FIGURES.update(
    {
        "mobile_former_26m": PaperFigures(3.2, 0.026, 64.0, _SOURCE + " (26M)"),
        "mobile_former_52m": PaperFigures(3.5, 0.052, 68.7, _SOURCE + " (52M)"),
        "mobile_former_96m": PaperFigures(4.6, 0.096, 72.8, _SOURCE + " (96M)"),
        "mobile_former_151m": PaperFigures(7.6, 0.151, 75.2, _SOURCE + " (151M)"),
        "mobile_former_214m": PaperFigures(9.4, 0.214, 76.7, _SOURCE + " (214M)"),
        "mobile_former_294m": PaperFigures(11.4, 0.294, 77.9, _SOURCE + " (294M)"),
        "mobile_former_508m": PaperFigures(14.0, 0.508, 79.3, _SOURCE + " (508M)"),
    }
)

# (expansion, channels, stride, expansion2) per block, as the release lists them; first row: the stem's block.
_BLOCKS_26M_52M = (
    (3, 12, 2, 0), (3, 12, 1, 3), (6, 24, 2, 4), (3, 24, 1, 3), (6, 48, 2, 4),
    (4, 48, 1, 4), (6, 64, 1, 4), (6, 96, 2, 4), (6, 96, 1, 4),
)  # fmt: skip
_BLOCKS_96M = (
    (2, 12, 1, 0), (6, 16, 2, 4), (6, 32, 2, 4), (3, 32, 1, 3), (6, 64, 2, 4),
    (4, 64, 1, 4), (6, 88, 1, 4), (6, 128, 2, 4), (6, 128, 1, 4),
)  # fmt: skip


def _twelve_blocks(stem: int, c1: int, c2: int, c3: int, c4: int, c5: int, c6: int, e: tuple[int, ...]) -> tuple:
    """The 12-block list of the 151m … 508m models; ``e`` = (e1, e2) of blocks 3 and 5 and e1 of block 7."""
    return (
        (2, stem, 1, 0), (6, c1, 2, 4), (e[0], c1, 1, e[1]), (6, c2, 2, 4), (e[2], c2, 1, e[3]),
        (6, c3, 2, 4), (4, c3, 1, 4), (6, c4, 1, 4), (6, c4, 1, 4), (6, c5, 2, 4), (6, c6, 1, 4), (6, c6, 1, 4),
    )  # fmt: skip


_MODELS: dict[str, dict[str, Any]] = {
    "mobile_former_26m": dict(blocks=_BLOCKS_26M_52M, stem_chs=8, token_num=3, token_dim=128, head_hidden_size=1024,
                              groups=4),
    "mobile_former_52m": dict(blocks=_BLOCKS_26M_52M, stem_chs=8, token_num=3, token_dim=128, head_hidden_size=1024),
    "mobile_former_96m": dict(blocks=_BLOCKS_96M, stem_chs=12, token_num=4, token_dim=128, head_hidden_size=1280),
    "mobile_former_151m": dict(blocks=_twelve_blocks(12, 16, 32, 64, 88, 128, 128, (3, 3, 3, 3)), stem_chs=12,
                               head_hidden_size=1280),
    "mobile_former_214m": dict(blocks=_twelve_blocks(12, 20, 40, 80, 112, 160, 160, (3, 4, 4, 4)), stem_chs=12,
                               head_hidden_size=1600),
    "mobile_former_294m": dict(blocks=_twelve_blocks(16, 24, 48, 96, 128, 192, 192, (4, 4, 4, 4)), stem_chs=16,
                               head_hidden_size=1920),
    "mobile_former_508m": dict(blocks=_twelve_blocks(24, 40, 72, 128, 176, 240, 240, (3, 3, 3, 3)), stem_chs=24,
                               head_hidden_size=1920),
}  # fmt: skip


@register_model
def mobile_former_26m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Mobile-Former-26M: 3.2 M params, 26 M MAdds, 64.0 % ImageNet top-1 (grouped pw convs + channel shuffle)."""
    return _create_mobile_former("mobile_former_26m", pretrained, **dict(_MODELS["mobile_former_26m"], **kwargs))


@register_model
def mobile_former_52m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Mobile-Former-52M: 3.5 M params, 52 M MAdds, 68.7 % ImageNet top-1."""
    return _create_mobile_former("mobile_former_52m", pretrained, **dict(_MODELS["mobile_former_52m"], **kwargs))


@register_model
def mobile_former_96m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Mobile-Former-96M: 4.6 M params, 96 M MAdds, 72.8 % ImageNet top-1."""
    return _create_mobile_former("mobile_former_96m", pretrained, **dict(_MODELS["mobile_former_96m"], **kwargs))


@register_model
def mobile_former_151m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Mobile-Former-151M: 7.6 M params, 151 M MAdds, 75.2 % ImageNet top-1."""
    return _create_mobile_former("mobile_former_151m", pretrained, **dict(_MODELS["mobile_former_151m"], **kwargs))


@register_model
def mobile_former_214m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Mobile-Former-214M: 9.4 M params, 214 M MAdds, 76.7 % ImageNet top-1."""
    return _create_mobile_former("mobile_former_214m", pretrained, **dict(_MODELS["mobile_former_214m"], **kwargs))


@register_model
def mobile_former_294m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Mobile-Former-294M: 11.4 M params, 294 M MAdds, 77.9 % ImageNet top-1."""
    return _create_mobile_former("mobile_former_294m", pretrained, **dict(_MODELS["mobile_former_294m"], **kwargs))


@register_model
def mobile_former_508m(pretrained: bool = False, **kwargs: Any) -> MobileFormer:
    """Mobile-Former-508M: 14.0 M params, 508 M MAdds, 79.3 % ImageNet top-1."""
    return _create_mobile_former("mobile_former_508m", pretrained, **dict(_MODELS["mobile_former_508m"], **kwargs))
