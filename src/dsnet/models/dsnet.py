"""DS-Net: Dual-stream Network for Visual Recognition.

Paper: Mao et al., "Dual-stream Network for Visual Recognition", NeurIPS 2021 (arXiv:2105.14734).
Released weights: PaddleClas ``DSNet_{tiny,small,base}_pretrained.pdparams`` (a port of SteveTsui/DS-Net).

Every DS-Block splits its channels into a *local* stream (high resolution, 3×3 depth-wise convolution) and a
*global* stream (a low-resolution token grid, multi-head self-attention): the paper's Intra-scale Propagation.
The starred models (``dsnet_tiny``, ``dsnet_small``, ``dsnet_base``) then exchange information between the two
streams by co-attention, the paper's Inter-scale Alignment; the ``*_concat`` models only concatenate the streams.

The default configuration reproduces the released model exactly, including three things the paper does not
describe: a depth-wise 3×3 conditional position encoding at the start of every block, a 1×1 convolution before
the channel split, and no output projection after the intra-scale self-attention. Converted released weights
therefore load without any change of structure.

Global token grid: the global stream of stage ``i`` is bilinearly resized to ``(H_i // s_i, W_i // s_i)`` with
``s = (8, 4, 2, 2)`` (7×7, 7×7, 7×7, 3×3 at 224×224 input) and clamped to at least 1×1, so any input of at least
32×32 pixels works, square or not, divisible by 32 or not. ``global_grid_sizes`` fixes the grids instead.

Small inputs: with the reference strides every grid has a side of one token below 128 px (at 32 px all four are
1×1: the self-attention then attends over one token and the co-attention has one key). The rule for inputs of
32–127 px is :data:`SMALL_INPUT_GLOBAL_STRIDES` ``= (2, 2, 1, 1)``: the global grid is half the local map in stages 1
and 2 and equal to it in stages 3 and 4, which keeps the paper's dual resolution in stage 1 (at 32 px: local 8×8 and
global 4×4, then 4×4/2×2, 2×2/2×2, 1×1/1×1). Only the token grid changes, not a single parameter, so the model is the
same DS-Net (and loads the same weights). :meth:`DSNet.stream_shapes` lists the local map and global grid of every
stage for an input size (``dsnet info --models dsnet_tiny --input-size 32 --set global_strides=[2,2,1,1]``).
The model traces with torch.fx and exports to ONNX with dynamic batch/height/width; export with an example input
whose every global grid side is at least 2 (e.g. 224×224, batch 2), since torch.export specialises sizes of 1.

State-dict names (a contract: ``dsnet.convert`` maps the reference names onto them)::

    stages.{i}.downsample                  Conv2d(in, d, kernel=stride, stride=stride), no norm
    stages.{i}.blocks.{j}.pos_embed        depth-wise 3×3 Conv2d(d, d)
    stages.{i}.blocks.{j}.norm1 / proj_in  BatchNorm2d(d) / Conv2d(d, d, 1)
    stages.{i}.blocks.{j}.local_norm / local_conv     BatchNorm2d(l) / depth-wise 3×3 Conv2d(l, l)
    stages.{i}.blocks.{j}.global_norm / global_qkv    LayerNorm(g) / Linear(g, 3g)
    stages.{i}.blocks.{j}.alignment.{local_norm, local_qkv, global_norm, global_qkv, local_proj, global_proj}
    stages.{i}.blocks.{j}.proj_out         Conv2d(d, d, 1)
    stages.{i}.blocks.{j}.norm2 / mlp.fc1 / mlp.fc2
    norm                                   BatchNorm2d(512)
    head.fc                                Linear(512, num_classes)

(``d`` block width, ``g`` global width, ``l = d - g`` local width; ``g = l = d / 2`` by default.)

Figures at 224×224 (MACs counted with :func:`dsnet.bench.complexity.count_macs`, attention included):

=====================  =========  ======  ===========================================
model                  params     GMACs   paper (Table 4)
=====================  =========  ======  ===========================================
dsnet_tiny             10.534 M   1.83    DS-Net-T*  10.5 M  1.8 G  79.0 %
dsnet_small            23.005 M   3.55    DS-Net-S*  23.0 M  3.5 G  82.3 %
dsnet_base             49.344 M   8.29    DS-Net-B*  49.3 M  8.4 G  83.1 %
dsnet_tiny_concat       9.096 M   1.58    DS-Net-T    9.1 M  1.6 G  78.1 %
dsnet_small_concat     19.609 M   3.06    DS-Net-S   19.7 M  3.0 G  81.9 %
dsnet_base_concat      41.814 M   7.18    DS-Net-B   48.8 M  7.6 G  82.8 %
=====================  =========  ======  ===========================================

Open discrepancy: the paper's DS-Net-B (48.8 M parameters) does not follow from the depths [3, 4, 28, 3] of
DS-Net-B*: removing the alignment from the released base model gives 41.81 M. We keep the depths and report
the difference instead of inventing a configuration.

Example:
    >>> import timm, torch, dsnet
    >>> model = timm.create_model("dsnet_tiny").eval()
    >>> model(torch.randn(1, 3, 224, 224)).shape
    torch.Size([1, 1000])
    >>> [f.shape[1:] for f in model.forward_intermediates(torch.randn(1, 3, 64, 96), intermediates_only=True)]
    [torch.Size([64, 16, 24]), torch.Size([128, 8, 12]), torch.Size([320, 4, 6]), torch.Size([512, 2, 3])]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.fx
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ClassifierHead,
    ConvMlp,
    DropPath,
    calculate_drop_path_rates,
    register_notrace_function,
    trunc_normal_,
)
from timm.models import (
    build_model_with_cfg,
    checkpoint_seq,
    generate_default_cfgs,
    register_model,
)
from torch import nn

from dsnet.errors import DSNetError
from dsnet.layers.attention import attention
from dsnet.models._checkpoint import pretrained_file_kwargs, state_dict_of
from dsnet.models._dsnet_keys import reference_to_dsnet
from dsnet.models._paper import PAPER_FIGURES, PaperFigures
from dsnet.models._pretrained import pretrained_kwargs
from dsnet.models._stages import StagedBackboneMixin

__all__ = [
    "SMALL_INPUT_GLOBAL_STRIDES",
    "DSBlock",
    "DSNet",
    "DSStage",
    "InterScaleAlignment",
    "StreamShape",
    "checkpoint_filter_fn",
    "global_grid_shape",
]

#: Smallest input side: four downsamplings (4, 2, 2, 2) must leave at least one pixel.
MIN_INPUT_SIZE = 32

#: ``global_strides`` for inputs of 32–127 px (see the module docstring): both streams stay at work.
SMALL_INPUT_GLOBAL_STRIDES = (2, 2, 1, 1)

GridSize = tuple[int, int]


def global_grid_shape(height: int, width: int, stride: int, grid_size: GridSize | None = None) -> GridSize:
    """The global token grid of a stage whose local map is ``height × width``: ``grid_size`` when fixed, else
    ``(height // stride, width // stride)`` with each side at least 1 (what :func:`resize_to_global_grid` does)."""
    if grid_size is not None:
        return grid_size
    return max(1, height // stride), max(1, width // stride)


# --- shape arithmetic kept out of torch.fx graphs ---------------------------------------------------------------
# Python control flow on tensor sizes cannot be traced symbolically; these functions become graph leaves for timm's
# tracer (register_notrace_function) and for plain torch.fx / torchvision (torch.fx.wrap).


@register_notrace_function
def check_input_size(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` unchanged, or raise ``DSNetError`` if its spatial size is below 32×32."""
    height, width = x.shape[-2:]
    if height < MIN_INPUT_SIZE or width < MIN_INPUT_SIZE:
        raise DSNetError(
            f"DS-Net needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels, got {height}x{width} "
            f"(input shape {tuple(x.shape)})"
        )
    return x


@register_notrace_function
def resize_to_global_grid(x: torch.Tensor, stride: int, grid_size: GridSize | None) -> torch.Tensor:
    """Bilinearly resize ``x`` (B, C, H, W) to the global token grid of its stage.

    The grid is ``grid_size`` when given, else ``(H // stride, W // stride)``; each side is at least 1.
    A side of 1 samples the centre (PyTorch's half-pixel rule); PaddleClas' resize takes the first row/column
    there instead, so the two differ for inputs whose grid has a 1-token side (below 128 px), never at 224 px.
    """
    if grid_size is None:  # torch.sym_max keeps the size symbolic under torch.export (dynamic ONNX shapes)
        grid_size = (torch.sym_max(1, x.shape[-2] // stride), torch.sym_max(1, x.shape[-1] // stride))
    return F.interpolate(x, size=grid_size, mode="bilinear", align_corners=False)


@register_notrace_function
def resize_like(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Bilinearly resize ``x`` (B, C, h, w) to the spatial size of ``reference`` (B, *, H, W)."""
    return F.interpolate(x, size=reference.shape[-2:], mode="bilinear", align_corners=False)


torch.fx.wrap("check_input_size")
torch.fx.wrap("resize_to_global_grid")
torch.fx.wrap("resize_like")


def _split_heads(x: torch.Tensor, num_parts: int, num_heads: int) -> tuple[torch.Tensor, ...]:
    """Split projected tokens (B, N, num_parts * C) laid out as (part, head, head_dim) into per-part heads."""
    batch, tokens, channels = x.shape
    x = x.reshape(batch, tokens, num_parts, num_heads, channels // (num_parts * num_heads))
    return x.permute(2, 0, 3, 1, 4).unbind(0)  # num_parts × (B, heads, N, head_dim)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, head_dim) → (B, N, heads * head_dim)."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


# --- blocks -------------------------------------------------------------------------------------------------------


class InterScaleAlignment(nn.Module):
    """Inter-scale Alignment (paper §3.3): co-attention between local pixels and global tokens.

    Both streams are projected to queries, keys and values of the attention width ``global_dim`` (the local
    stream through a 1×1 convolution on its batch-normed map, the global stream through a Linear on its
    layer-normed tokens). Global→local: local queries attend to global keys/values and a Linear maps the result
    back to ``local_dim``; local→global: global queries attend to local keys/values, followed by a Linear. Both
    results are added residually. A direction that is switched off (paper Table 3 ablations) has no projection
    parameters at all, so every parameter of the module receives gradients.

    Args:
        local_dim: channels of the local stream ``l``.
        global_dim: channels of the global stream ``g``, also the attention width.
        num_heads: attention heads; must divide ``global_dim``.
        global_to_local: keep the G→L direction.
        local_to_global: keep the L→G direction.
        attn_drop: dropout on the attention weights during training.
    """

    def __init__(
        self,
        local_dim: int,
        global_dim: int,
        num_heads: int,
        global_to_local: bool = True,
        local_to_global: bool = True,
        attn_drop: float = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if not (global_to_local or local_to_global):
            raise DSNetError("InterScaleAlignment needs at least one of global_to_local / local_to_global")
        self.num_heads = num_heads
        self.global_to_local = global_to_local
        self.local_to_global = local_to_global
        self.attn_drop = attn_drop
        # Which of (q, k, v) each side needs: G→L uses local q and global k, v; L→G uses global q and local k, v.
        self.local_parts = int(global_to_local) + 2 * int(local_to_global)
        self.global_parts = int(local_to_global) + 2 * int(global_to_local)
        self.local_norm = nn.BatchNorm2d(local_dim, **dd)
        self.local_qkv = nn.Conv2d(local_dim, self.local_parts * global_dim, 1, **dd)
        self.global_norm = nn.LayerNorm(global_dim, eps=1e-5, **dd)
        self.global_qkv = nn.Linear(global_dim, self.global_parts * global_dim, **dd)
        self.local_proj = nn.Linear(global_dim, local_dim, **dd) if global_to_local else None
        self.global_proj = nn.Linear(global_dim, global_dim, **dd) if local_to_global else None

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dropout_p = self.attn_drop if self.training else 0.0
        return _merge_heads(attention(q, k, v, dropout_p=dropout_p))

    def forward(self, local: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Align ``local`` (B, l, H, W) and global ``tokens`` (B, N, g); returns both updated, same shapes."""
        batch, local_dim, height, width = local.shape
        local_qkv = self.local_qkv(self.local_norm(local)).flatten(2).transpose(1, 2)  # (B, H*W, parts * g)
        local_qkv = _split_heads(local_qkv, self.local_parts, self.num_heads)
        global_qkv = _split_heads(self.global_qkv(self.global_norm(tokens)), self.global_parts, self.num_heads)
        new_local, new_tokens = local, tokens
        if self.local_proj is not None:  # G→L: local queries, global keys and values
            global_k, global_v = global_qkv[-2:]
            h_local = self.local_proj(self._attention(local_qkv[0], global_k, global_v))  # (B, H*W, l)
            new_local = local + h_local.transpose(1, 2).reshape(batch, local_dim, height, width)
        if self.global_proj is not None:  # L→G: global queries, local keys and values
            local_k, local_v = local_qkv[-2:]
            new_tokens = tokens + self.global_proj(self._attention(global_qkv[0], local_k, local_v))  # (B, N, g)
        return new_local, new_tokens


class DSBlock(nn.Module):
    """Dual-stream Block: conditional position encoding, Intra-scale Propagation, Inter-scale Alignment, FFN.

    On ``x`` (B, d, H, W)::

        x = x + dwconv3x3(x)
        local, global = split(conv1x1(BN(x)))       # global = first g channels, local = last l channels
        local  = local + dwconv3x3(BN(local))         # local stream f_L
        tokens = resize(global, grid); tokens = tokens + MHSA(LN(tokens))   # global stream f_G, no out-proj
        local, tokens = InterScaleAlignment(local, tokens)                   # starred models only
        x = x + DropPath(conv1x1(cat[local, upsample(tokens)]))
        x = x + DropPath(MLP(BN(x)))

    Args:
        dim: block width ``d``.
        num_heads: heads of both attentions; must divide the global width.
        global_stride: the global grid is ``(H // global_stride, W // global_stride)``, at least 1×1 ...
        global_grid_size: ... unless this fixes it to ``(h, w)``.
        mlp_ratio: hidden width of the FFN relative to ``dim``.
        global_ratio: α, the share of channels sent to the global stream (0 = local only, 1 = global only).
            The global width is ``round(α · d)``, the local width the rest.
        alignment: add Inter-scale Alignment (needs both streams to be non-empty).
        local_stream: keep the depth-wise convolution of the local stream (False: paper's "w/o f_L").
        global_stream: keep the self-attention of the global stream (False: paper's "w/o f_G").
        global_to_local: with ``alignment``, keep the G→L co-attention.
        local_to_global: with ``alignment``, keep the L→G co-attention.
        attn_drop: dropout on attention weights during training (the reference hard-wires 0.1).
        proj_drop: dropout inside the FFN.
        drop_path: stochastic depth rate of both residual branches.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        global_stride: int,
        global_grid_size: GridSize | None = None,
        mlp_ratio: float = 4.0,
        global_ratio: float = 0.5,
        alignment: bool = True,
        local_stream: bool = True,
        global_stream: bool = True,
        global_to_local: bool = True,
        local_to_global: bool = True,
        attn_drop: float = 0.1,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if not 0.0 <= global_ratio <= 1.0:
            raise DSNetError(f"global_ratio must lie in [0, 1], got {global_ratio}")
        self.global_dim = round(global_ratio * dim)
        self.local_dim = dim - self.global_dim
        if self.global_dim and self.global_dim % num_heads:
            raise DSNetError(
                f"global width {self.global_dim} (= round(global_ratio {global_ratio} x dim {dim})) is not divisible "
                f"by num_heads={num_heads}"
            )
        use_alignment = alignment and (global_to_local or local_to_global)
        if use_alignment and not (self.global_dim and self.local_dim):
            raise DSNetError(
                f"Inter-scale alignment needs both streams, but global_ratio={global_ratio} leaves "
                f"local width {self.local_dim} and global width {self.global_dim}; use alignment=False "
                "(the *_concat models) for a single-stream block"
            )
        self.num_heads = num_heads
        self.global_stride = global_stride
        self.global_grid_size = global_grid_size
        self.attn_drop = attn_drop

        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.norm1 = nn.BatchNorm2d(dim, **dd)
        self.proj_in = nn.Conv2d(dim, dim, 1, **dd)
        # Intra-scale Propagation: local stream f_L
        has_local_conv = local_stream and self.local_dim > 0
        ldim = self.local_dim
        self.local_norm = nn.BatchNorm2d(ldim, **dd) if has_local_conv else None
        self.local_conv = nn.Conv2d(ldim, ldim, 3, padding=1, groups=ldim, **dd) if has_local_conv else None
        # Intra-scale Propagation: global stream f_G (multi-head self-attention without output projection)
        has_attention = global_stream and self.global_dim > 0
        gdim = self.global_dim
        self.global_norm = nn.LayerNorm(gdim, eps=1e-5, **dd) if has_attention else None
        self.global_qkv = nn.Linear(gdim, 3 * gdim, **dd) if has_attention else None
        # Inter-scale Alignment
        self.alignment = (
            InterScaleAlignment(ldim, gdim, num_heads, global_to_local, local_to_global, attn_drop, **dd)
            if use_alignment
            else None
        )
        self.proj_out = nn.Conv2d(dim, dim, 1, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim, **dd)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def _self_attention(self, tokens: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention of the global tokens (B, N, g) with no output projection."""
        q, k, v = _split_heads(self.global_qkv(self.global_norm(tokens)), 3, self.num_heads)
        dropout_p = self.attn_drop if self.training else 0.0
        return _merge_heads(attention(q, k, v, dropout_p=dropout_p))  # (B, N, g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        shortcut = x
        x = self.proj_in(self.norm1(x))
        streams = []
        local = None
        if self.local_dim:
            local = x[:, self.global_dim :]  # (B, l, H, W)
            if self.local_conv is not None:
                local = local + self.local_conv(self.local_norm(local))
        if self.global_dim:
            grid = resize_to_global_grid(x[:, : self.global_dim], self.global_stride, self.global_grid_size)
            batch, channels, grid_h, grid_w = grid.shape
            tokens = grid.flatten(2).transpose(1, 2)  # (B, N, g)
            if self.global_qkv is not None:
                tokens = tokens + self._self_attention(tokens)
            if self.alignment is not None:
                local, tokens = self.alignment(local, tokens)
            grid = tokens.transpose(1, 2).reshape(batch, channels, grid_h, grid_w)  # (B, g, h, w)
            streams.append(resize_like(grid, x))
        if local is not None:
            streams.insert(0, local)
        x = torch.cat(streams, dim=1) if len(streams) > 1 else streams[0]  # (B, d, H, W), order [local, global]
        x = shortcut + self.drop_path1(self.proj_out(x))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


# --- stage ----------------------------------------------------------------------------------------------------------


class DSStage(nn.Module):
    """A non-overlapping patch-embedding convolution (kernel = stride, with bias, no norm) and DS-Blocks."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        depth: int,
        stride: int,
        num_heads: int,
        global_stride: int,
        global_grid_size: GridSize | None = None,
        drop_path_rates: Sequence[float] = (),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **block_kwargs: Any,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = nn.Conv2d(in_chs, out_chs, kernel_size=stride, stride=stride, **dd)
        rates = list(drop_path_rates) or [0.0] * depth
        self.blocks = nn.Sequential(
            *[
                DSBlock(
                    out_chs,
                    num_heads,
                    global_stride,
                    global_grid_size,
                    drop_path=rates[j],
                    **block_kwargs,
                    **dd,
                )
                for j in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


# --- model ----------------------------------------------------------------------------------------------------------


def _grid_sizes(global_grid_sizes: Sequence[int | Sequence[int]] | None, num_stages: int) -> list[GridSize | None]:
    if global_grid_sizes is None:
        return [None] * num_stages
    if len(global_grid_sizes) != num_stages:
        raise DSNetError(f"global_grid_sizes needs {num_stages} entries (one per stage), got {global_grid_sizes}")
    sizes = []
    for size in global_grid_sizes:
        pair = (size, size) if isinstance(size, int) else tuple(size)
        if len(pair) != 2 or not all(isinstance(s, int) and s >= 1 for s in pair):
            raise DSNetError(f"each global grid size must be a positive int or (h, w) pair, got {size!r}")
        sizes.append(pair)
    return sizes


class StreamShape(NamedTuple):
    """The sizes of the two streams in one stage (see :meth:`DSNet.stream_shapes`)."""

    stage: int  # 1-based, as in the paper
    local_map: GridSize  # (H, W) of the local stream: the stage's resolution
    global_grid: GridSize | None  # (h, w) of the global tokens; None when the stage has no global stream


class DSNet(StagedBackboneMixin, nn.Module):
    """Dual-stream Network (DS-Net).

    The timm API (``forward_intermediates``, ``prune_intermediate_layers``, ``group_matcher``, ...) comes from
    :class:`~dsnet.models._stages.StagedBackboneMixin`; the stem group is stage 0's patch embedding.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs; 0 removes the classifier.
        global_pool: pooling before the classifier (timm pool type, e.g. ``"avg"``; ``""`` for none).
        depths: DS-Blocks per stage.
        embed_dims: channels per stage.
        num_heads: attention heads per stage (head width 32 on the global half by default).
        mlp_ratio: FFN hidden width relative to the block width.
        global_ratio: α, share of channels given to the global stream (paper Table 2). 0 = local stream only,
            1 = global stream only (both need ``alignment=False``). With alignment, the co-attention width is the
            global width ``g``: the local stream is projected ``l → 3g`` and the G→L result mapped back ``g → l``.
        global_strides: per stage, the global grid is the stage resolution divided by this (floored, at least 1).
        global_grid_sizes: optional fixed global grid per stage (an int or ``(h, w)`` each), independent of the
            input size (the paper's "W/32 × H/32" reading at one resolution).
        alignment: Inter-scale Alignment (co-attention) in every block: the paper's starred models.
        local_stream: keep the local depth-wise convolution (False: Table 3 "w/o f_L").
        global_stream: keep the global self-attention (False: Table 3 "w/o f_G").
        global_to_local: keep the G→L co-attention (False: Table 3 "w/o G→L").
        local_to_global: keep the L→G co-attention (False: Table 3 "w/o L→G"; both False = no alignment).
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout inside the FFNs.
        attn_drop_rate: dropout on attention weights (self- and co-attention) during training. Default 0.1, the
            value the reference hard-wires (it ignores its own ``attn_drop_rate`` argument), so training from
            scratch follows the recipe of the released weights. No effect in eval mode.
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks of the network.
        drop_path_per_stage_reset: reference compatibility: block ``j`` of every stage takes rate ``j`` of the
            network-wide schedule, i.e. the index restarts at every stage (first block of each stage never drops).
        device, dtype: where and in which dtype to create the parameters (``"meta"`` works).
    """

    _stem_group_regex = r"^stages\.0\.downsample"  # no stem module: stage 0's patch embedding

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: Sequence[int] = (2, 2, 4, 1),
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratio: float = 4.0,
        global_ratio: float = 0.5,
        global_strides: Sequence[int] = (8, 4, 2, 2),
        global_grid_sizes: Sequence[int | Sequence[int]] | None = None,
        alignment: bool = True,
        local_stream: bool = True,
        global_stream: bool = True,
        global_to_local: bool = True,
        local_to_global: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.1,
        drop_path_rate: float = 0.0,
        drop_path_per_stage_reset: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        num_stages = len(depths)
        if not (len(embed_dims) == len(num_heads) == len(global_strides) == num_stages):
            raise DSNetError(
                f"depths, embed_dims, num_heads and global_strides need one entry per stage, got {len(depths)}, "
                f"{len(embed_dims)}, {len(num_heads)}, {len(global_strides)}"
            )
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = embed_dims[-1]
        grid_sizes = _grid_sizes(global_grid_sizes, num_stages)

        rates = calculate_drop_path_rates(drop_path_rate, sum(depths))  # linear over all blocks
        stage_rates, start = [], 0
        for depth in depths:
            stage_rates.append(rates[:depth] if drop_path_per_stage_reset else rates[start : start + depth])
            start += depth

        stages, self.feature_info = [], []
        in_chs, reduction = in_chans, 1
        for i in range(num_stages):
            stride = 4 if i == 0 else 2
            reduction *= stride
            stages.append(
                DSStage(
                    in_chs,
                    embed_dims[i],
                    depths[i],
                    stride,
                    num_heads[i],
                    global_strides[i],
                    grid_sizes[i],
                    drop_path_rates=stage_rates[i],
                    mlp_ratio=mlp_ratio,
                    global_ratio=global_ratio,
                    alignment=alignment,
                    local_stream=local_stream,
                    global_stream=global_stream,
                    global_to_local=global_to_local,
                    local_to_global=local_to_global,
                    attn_drop=attn_drop_rate,
                    proj_drop=proj_drop_rate,
                    **dd,
                )
            )
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f"stages.{i}"))
            in_chs = embed_dims[i]
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(self.num_features, **dd)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # As the reference: truncated normal (std .02) Linear weights, zero biases; convolutions keep PyTorch's
        # default (Kaiming-uniform) initialisation, which the PyTorch original also leaves untouched.
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # no_weight_decay: nothing beyond timm's 1-D exemptions (mixin default). DS-Net has no position-embedding
    # tokens; its ``pos_embed`` is a depth-wise convolution that was trained with weight decay.

    def stream_shapes(self, height: int, width: int | None = None) -> list[StreamShape]:
        """Per stage, the local map and the global token grid for a ``height × width`` input (width defaults to
        height), read from the stages' patch embeddings and blocks."""
        width = height if width is None else width
        shapes = []
        for index, stage in enumerate(self.stages):
            stride = stage.downsample.stride[0]
            height, width = height // stride, width // stride
            block = stage.blocks[0]
            grid = global_grid_shape(height, width, block.global_stride, block.global_grid_size)
            shapes.append(StreamShape(index + 1, (height, width), grid if block.global_dim else None))
        return shapes

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """No stem module: stage 0's patch embedding is the stem; only the input size is checked here."""
        return check_input_size(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) → normalised last-stage features (B, 512, H/32, W/32)."""
        x = check_input_size(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the features and classify them (``pre_logits=True``: stop after pooling)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- checkpoints ----------------------------------------------------------------------------------------------------


def checkpoint_filter_fn(state_dict: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Bring a checkpoint into this module's names.

    Our own names pass through unchanged (after unwrapping a training checkpoint by the package's one rule,
    :func:`dsnet.models._checkpoint.choose_entry`); a checkpoint in the reference layout (PaddleClas / SteveTsui
    names such as ``patch_embed1.proj.weight``) goes through :func:`dsnet.models._dsnet_keys.reference_to_dsnet`.
    """
    state_dict = state_dict_of(state_dict)
    if "patch_embed1.proj.weight" in state_dict:
        return reference_to_dsnet(state_dict)
    return state_dict


def _create_dsnet(variant: str, pretrained: bool = False, **kwargs: Any) -> DSNet:
    kwargs = pretrained_kwargs(variant, pretrained, kwargs, layout="paddle")  # the PaddleClas file → a local file
    kwargs = pretrained_file_kwargs(variant, pretrained, checkpoint_filter_fn, kwargs)  # the entry rule
    return build_model_with_cfg(
        DSNet,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


def _cfg(origin_url: str | None = None, **kwargs: Any) -> dict[str, Any]:
    return {
        "url": origin_url or "",  # a Paddle file: pretrained=True downloads and converts it (models/_pretrained.py)
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stages.0.downsample",
        "classifier": "head.fc",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2105.14734",
        "paper_name": "Dual-stream Network for Visual Recognition",
        "origin_url": origin_url,
        **kwargs,
    }


_PADDLE_URL = "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/DSNet_{}_pretrained.pdparams"
# PaddleClas publishes no hash for its files (so the URLs carry no #sha256=); the conversion checks every key/shape.
_PADDLE_NOTE = (
    "PaddleClas weights: pretrained=True downloads and converts them (or by hand: `dsnet convert paddle`, then "
    "pretrained_cfg_overlay=dict(file=...))",
)

default_cfgs = generate_default_cfgs(
    {
        "dsnet_tiny.paddle_in1k": _cfg(origin_url=_PADDLE_URL.format("tiny"), notes=_PADDLE_NOTE),
        "dsnet_small.paddle_in1k": _cfg(origin_url=_PADDLE_URL.format("small"), notes=_PADDLE_NOTE),
        "dsnet_base.paddle_in1k": _cfg(origin_url=_PADDLE_URL.format("base"), notes=_PADDLE_NOTE),
        "dsnet_tiny_concat": _cfg(),
        "dsnet_small_concat": _cfg(),
        "dsnet_base_concat": _cfg(),
    }
)

PAPER_FIGURES.update(
    {
        "dsnet_tiny": PaperFigures(10.5, 1.8, 79.0, "DS-Net paper, Table 4 (DS-Net-T*)"),
        "dsnet_small": PaperFigures(23.0, 3.5, 82.3, "DS-Net paper, Table 4 (DS-Net-S*)"),
        "dsnet_base": PaperFigures(49.3, 8.4, 83.1, "DS-Net paper, Table 4 (DS-Net-B*)"),
        "dsnet_tiny_concat": PaperFigures(9.1, 1.6, 78.1, "DS-Net paper, Table 4 (DS-Net-T)"),
        "dsnet_small_concat": PaperFigures(19.7, 3.0, 81.9, "DS-Net paper, Table 4 (DS-Net-S)"),
        "dsnet_base_concat": PaperFigures(
            48.8, 7.6, 82.8, "DS-Net paper, Table 4 (DS-Net-B); 48.8M does not follow from depths [3,4,28,3]"
        ),
    }
)


# --- builders -------------------------------------------------------------------------------------------------------

_TINY = dict(depths=(2, 2, 4, 1))
_SMALL = dict(depths=(3, 4, 8, 3))
_BASE = dict(depths=(3, 4, 28, 3))


@register_model
def dsnet_tiny(pretrained: bool = False, **kwargs: Any) -> DSNet:
    """DS-Net-T*: depths 2-2-4-1 with Inter-scale Alignment (released weights)."""
    return _create_dsnet("dsnet_tiny", pretrained, **{**_TINY, **kwargs})


@register_model
def dsnet_small(pretrained: bool = False, **kwargs: Any) -> DSNet:
    """DS-Net-S*: depths 3-4-8-3 with Inter-scale Alignment (released weights)."""
    return _create_dsnet("dsnet_small", pretrained, **{**_SMALL, **kwargs})


@register_model
def dsnet_base(pretrained: bool = False, **kwargs: Any) -> DSNet:
    """DS-Net-B*: depths 3-4-28-3 with Inter-scale Alignment (released weights)."""
    return _create_dsnet("dsnet_base", pretrained, **{**_BASE, **kwargs})


@register_model
def dsnet_tiny_concat(pretrained: bool = False, **kwargs: Any) -> DSNet:
    """DS-Net-T: depths 2-2-4-1, streams fused by concatenation only."""
    return _create_dsnet("dsnet_tiny_concat", pretrained, **{**_TINY, "alignment": False, **kwargs})


@register_model
def dsnet_small_concat(pretrained: bool = False, **kwargs: Any) -> DSNet:
    """DS-Net-S: depths 3-4-8-3, streams fused by concatenation only."""
    return _create_dsnet("dsnet_small_concat", pretrained, **{**_SMALL, "alignment": False, **kwargs})


@register_model
def dsnet_base_concat(pretrained: bool = False, **kwargs: Any) -> DSNet:
    """DS-Net-B: depths 3-4-28-3, streams fused by concatenation only (paper: 48.8 M; ours 41.81 M, see module doc)."""
    return _create_dsnet("dsnet_base_concat", pretrained, **{**_BASE, "alignment": False, **kwargs})
