"""DS-FPN: a feature pyramid whose lateral connections are DS-Blocks (DS-Net paper §3.4, Fig. 3, Tables 6–7).

The paper ("Dual-stream Network for Visual Recognition", Mao et al., NeurIPS 2021) adds DS-Blocks to an FPN and
compares four insertion positions on RetinaNet (Table 6). No public code exists; this module is our reading of the
text, pinned down by the parameter counts the paper reports.

``position``:

* ``None``: plain FPN (1×1 lateral conv → top-down sum → 3×3 output conv), as torchvision's
  :class:`~torchvision.ops.FeaturePyramidNetwork` and mmdet's ``FPN``.
* ``"last"``: the 3×3 output conv of every backbone level is replaced by a DS-Block at the FPN width.
* ``"lateral"``: a DS-Block at the backbone width on each lateral connection, the 1×1 channel alignment after it.
* ``"lateral_rev"``: the 1×1 channel alignment first, then a DS-Block at the FPN width.
* ``"lateral_extra"`` (default, the paper's choice): ``"lateral"`` plus a DS-Block on the extra levels: one block
  refines P6 (RetinaNet) or the max-pooled level (Mask R-CNN); P7 is computed from the refined P6.

DS-Blocks in the neck: ``num_heads = dim // 64`` (head dim 32 on the global half, as in the backbone; fewer when
that does not divide the streams' widths, see :func:`default_num_heads`), MLP ratio 4,
half the channels in the global stream. The global stream of a level with stride ``r`` is resized to the image's
stride-32 grid (downsampling ``max(1, 32 // r)``: 4 on P3, 2 on P4, 1 on P5 and the extra levels), which is what the
backbone does at 224 px (a 7×7 global grid in stages 1–3) and what the paper's §3.3 describes (``W/32 × H/32``).

Parameters of RetinaNet with the DS-Net-T backbone (``dsnet_tiny_concat``), 80 classes, C3–C5 into the pyramid,
P6 from C5 and P7 from P6 (mmdet ``add_extra_convs="on_input"``, torchvision's :class:`LastLevelP6P7` when C5 has a
width other than 256), 9 anchors, 4-conv heads without norm, BN affine weights counted as parameters
(``python benchmarks/detection.py --table6``):

=================  =========  =========  ===========  ==================================================
position           paper (M)  ours (M)   ours, exact  what is added
=================  =========  =========  ===========  ==================================================
None (FPN)         18.83      18.83      18,831,796   (backbone 8.58 M + FPN 3.79 M + head 6.46 M)
last               19.59      19.59      19,595,572   3 DS-Blocks* at 256 replace the 3×3 output convs
lateral            23.72      23.72      23,722,708   DS-Blocks* at 128 / 320 / 512 before the 1×1 convs
lateral_rev        21.36      21.36      21,365,812   3 DS-Blocks* at 256 after the 1×1 convs
lateral_extra      24.43      24.43      24,434,772   lateral + one concat DS-Block at 256 on P6
=================  =========  =========  ===========  ==================================================

``*`` = with inter-scale alignment. The paper's figures are our exact counts truncated to two decimals (all five).
The counts single out the design: every block on a backbone level has inter-scale alignment
(12.75·d² + 35.5·d parameters); with concat-only blocks "last" would be 19.20 M, "lateral" 22.96 M and
"lateral_rev" 20.97 M. The extra-level block must be concat-only at 256 (10.75·d² + 29.5·d = 0.712 M): an aligned
one gives 24.57 M, a concat one on each of P6 and P7 25.15 M. Hence ``extra_block_kwargs`` defaults to concat
fusion and ``block_kwargs`` to alignment. What the parameter counts cannot decide, and we chose: the heads count
``dim // 64``, attention dropout 0 in the neck, the global grid (stride 32, above), P6 computed from the raw C5 (not
the DS-refined lateral), and the extra block refining P6 before P7 is derived from it (rather than refining P7).
With ``norm="frozen"`` (the default for a backbone with loaded weights) the count is 10,880 lower (frozen BN keeps
its affine weights as buffers), and with the starred backbone ``dsnet_tiny`` it is 25.87 M (FPN: 20.27 M).

Example:
    >>> import torch
    >>> from dsnet.detection.ds_fpn import DSFPN
    >>> fpn = DSFPN([128, 320, 512], 256, position="lateral_extra", extra_levels="p6p7")
    >>> feats = {"0": torch.rand(1, 128, 16, 16), "1": torch.rand(1, 320, 8, 8), "2": torch.rand(1, 512, 4, 4)}
    >>> {k: tuple(v.shape) for k, v in fpn(feats).items()}  # doctest: +NORMALIZE_WHITESPACE
    {'0': (1, 256, 16, 16), '1': (1, 256, 8, 8), '2': (1, 256, 4, 4), 'p6': (1, 256, 2, 2), 'p7': (1, 256, 1, 1)}
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from dsnet.errors import DSNetError
from dsnet.models.dsnet import DSBlock

__all__ = [
    "DSFPN",
    "DS_POSITIONS",
    "DSLastLevelMaxPool",
    "DSLastLevelP6P7",
    "DSPosition",
    "default_num_heads",
    "ds_block",
]

DSPosition = Literal["last", "lateral", "lateral_rev", "lateral_extra"]
#: Valid values of ``DSFPN(position=...)``; ``None`` means a plain FPN.
DS_POSITIONS: tuple[str | None, ...] = (None, "last", "lateral", "lateral_rev", "lateral_extra")
ExtraLevels = Literal["p6p7", "maxpool"]

#: Stride of the grid the global stream is resized to on every pyramid level (the image's 1/32 grid).
GLOBAL_GRID_STRIDE = 32


def default_num_heads(dim: int, global_ratio: float = 0.5) -> int:
    """Attention heads of a neck DS-Block of width ``dim``: ``dim // 64`` (head dim 32 on the global half, as the
    backbone), lowered until it divides both streams' widths — e.g. 2 for TransXNet-T's 224-channel C4, where 3
    would not divide the 112 global channels."""
    global_dim = round(global_ratio * dim)
    heads = max(1, dim // 64)
    while heads > 1 and (global_dim % heads or (dim - global_dim) % heads):
        heads -= 1
    return heads


def ds_block(dim: int, stride: int, **kwargs: Any) -> nn.Module:
    """A DS-Block for a pyramid level of ``dim`` channels and ``stride`` (image pixels per feature pixel).

    ``num_heads`` defaults to :func:`default_num_heads` (head dim 32 on the global half), the global stream is
    downsampled onto the stride-32 grid of the image (``global_stride = max(1, 32 // stride)``, see the module
    docstring) and attention dropout is off (the backbone's 0.1 is a quirk of the reference classification
    training). Other ``kwargs`` go to :class:`dsnet.models.dsnet.DSBlock` (``alignment``, ``global_ratio``,
    ``drop_path``, ...).
    """
    if "num_heads" not in kwargs:
        kwargs["num_heads"] = default_num_heads(dim, kwargs.get("global_ratio", 0.5))
    kwargs.setdefault("mlp_ratio", 4.0)
    kwargs.setdefault("global_stride", max(1, GLOBAL_GRID_STRIDE // stride))
    kwargs.setdefault("attn_drop", 0.0)
    return DSBlock(dim, **kwargs)


BlockFactory = Callable[..., nn.Module]


class DSLastLevelP6P7(LastLevelP6P7):
    """RetinaNet's P6/P7 (torchvision :class:`LastLevelP6P7`, same parameter names) with a DS-Block refining P6.

    P6 = DS-Block(conv3×3/2(C5 or P5)); P7 = conv3×3/2(ReLU(P6)).
    """

    def __init__(self, in_channels: int, out_channels: int, block: nn.Module) -> None:
        super().__init__(in_channels, out_channels)
        self.ds_block = block

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        x = p[-1] if self.use_P5 else c[-1]
        p6 = self.ds_block(self.p6(x))
        p7 = self.p7(F.relu(p6))
        p.extend([p6, p7])
        names.extend(["p6", "p7"])
        return p, names


class DSLastLevelMaxPool(ExtraFPNBlock):
    """Mask R-CNN's extra level (max-pool of the last level, key ``"pool"``) refined by a DS-Block."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.ds_block = block

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        p.append(self.ds_block(F.max_pool2d(p[-1], kernel_size=1, stride=2, padding=0)))
        names.append("pool")
        return p, names


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    nn.init.kaiming_uniform_(conv.weight, a=1)  # torchvision's FPN init
    nn.init.zeros_(conv.bias)
    return conv


class DSFPN(nn.Module):
    """Feature pyramid network with DS-Blocks (DS-FPN); ``position=None`` gives a plain FPN.

    Takes and returns ordered dicts of NCHW feature maps like torchvision's
    :class:`~torchvision.ops.FeaturePyramidNetwork`, so it slots into torchvision's detectors.

    Args:
        in_channels_list: channels of the backbone levels fed to the pyramid, finest first.
        out_channels: channels of every pyramid level (256 in RetinaNet and Mask R-CNN).
        position: where DS-Blocks go, one of :data:`DS_POSITIONS` (see the module docstring).
        extra_levels: ``"p6p7"`` (RetinaNet: P6 from C5, or from P5 when C5 has ``out_channels`` channels, and P7),
            ``"maxpool"`` (Mask R-CNN: a max-pooled level) or ``None``.
        strides: stride of each input level (for the global grid of the DS-Blocks); default 8, 16, 32, ...
            when three levels are given and 4, 8, 16, ... otherwise.
        block_kwargs: keyword arguments of the DS-Blocks on the backbone levels (default: inter-scale alignment on).
        extra_block_kwargs: keyword arguments of the DS-Block on the extra level (default: concat fusion, see the
            module docstring for why).
        block_factory: ``(dim, stride, **kwargs) -> nn.Module`` building a block (default :func:`ds_block`).
    """

    def __init__(
        self,
        in_channels_list: Sequence[int],
        out_channels: int = 256,
        *,
        position: DSPosition | None = "lateral_extra",
        extra_levels: ExtraLevels | None = None,
        strides: Sequence[int] | None = None,
        block_kwargs: dict[str, Any] | None = None,
        extra_block_kwargs: dict[str, Any] | None = None,
        block_factory: BlockFactory = ds_block,
    ) -> None:
        super().__init__()
        if position not in DS_POSITIONS:
            raise DSNetError(f"unknown DS-FPN position {position!r}; expected one of {DS_POSITIONS}")
        if extra_levels not in (None, "p6p7", "maxpool"):
            raise DSNetError(f"unknown extra_levels {extra_levels!r}; expected 'p6p7', 'maxpool' or None")
        if not in_channels_list or any(c <= 0 for c in in_channels_list):
            raise DSNetError(f"in_channels_list must be non-empty positive channel counts, got {in_channels_list}")
        if strides is None:
            first = 8 if len(in_channels_list) == 3 else 4
            strides = [first * 2**i for i in range(len(in_channels_list))]
        if len(strides) != len(in_channels_list):
            raise DSNetError(f"{len(strides)} strides given for {len(in_channels_list)} levels")
        block_kwargs = {"alignment": True, **(block_kwargs or {})}
        extra_block_kwargs = {"alignment": False, **(extra_block_kwargs or {})}
        self.position = position
        self.out_channels = out_channels

        def block(dim: int, stride: int, **kw: Any) -> nn.Module:
            return block_factory(dim, stride, **kw)

        # Lateral connection of level i: lateral_blocks[i] (DS-Block or identity) around lateral_convs[i] (1×1).
        self.lateral_blocks_before = nn.ModuleList()
        self.lateral_convs = nn.ModuleList()
        self.lateral_blocks_after = nn.ModuleList()
        self.output_blocks = nn.ModuleList()  # 3×3 conv, or a DS-Block with position="last"
        for c, s in zip(in_channels_list, strides):
            lateral = position in ("lateral", "lateral_extra")
            self.lateral_blocks_before.append(block(c, s, **block_kwargs) if lateral else nn.Identity())
            self.lateral_convs.append(_conv(c, out_channels, 1))
            rev = position == "lateral_rev"
            self.lateral_blocks_after.append(block(out_channels, s, **block_kwargs) if rev else nn.Identity())
            last = position == "last"
            output = block(out_channels, s, **block_kwargs) if last else _conv(out_channels, out_channels, 3)
            self.output_blocks.append(output)

        self.extra_blocks: ExtraFPNBlock | None = None
        extra_stride = strides[-1] * 2
        with_extra_block = position == "lateral_extra"
        if extra_levels == "p6p7":
            if with_extra_block:
                extra_block = block(out_channels, extra_stride, **extra_block_kwargs)
                self.extra_blocks = DSLastLevelP6P7(in_channels_list[-1], out_channels, extra_block)
            else:
                self.extra_blocks = LastLevelP6P7(in_channels_list[-1], out_channels)
        elif extra_levels == "maxpool":
            if with_extra_block:
                self.extra_blocks = DSLastLevelMaxPool(block(out_channels, extra_stride, **extra_block_kwargs))
            else:
                self.extra_blocks = LastLevelMaxPool()

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        """Pyramid levels (same keys as ``x``, then ``"p6"``/``"p7"`` or ``"pool"``), each ``out_channels`` wide."""
        names = list(x.keys())
        features = list(x.values())
        laterals = []
        for i, feature in enumerate(features):
            lateral = self.lateral_blocks_before[i](feature)
            lateral = self.lateral_convs[i](lateral)
            laterals.append(self.lateral_blocks_after[i](lateral))

        # top-down pathway: upsample the coarser level (nearest) and add it to the lateral of the finer one
        merged = [laterals[-1]]
        for lateral in laterals[-2::-1]:
            top_down = F.interpolate(merged[0], size=lateral.shape[-2:], mode="nearest")
            merged.insert(0, lateral + top_down)
        results = [block(m) for block, m in zip(self.output_blocks, merged)]

        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, features, names)
        return OrderedDict(zip(names, results))
