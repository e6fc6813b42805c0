"""torchvision RetinaNet and Mask R-CNN on any timm backbone (the dsnet zoo included), with FPN or DS-FPN.

The backbone is a timm ``features_only`` model: its four levels of stride 4, 8, 16 and 32 (C2–C5) are the
"stages" that ``trainable_stages`` counts from the top, stem and patch embeddings counting with the stage they feed.
RetinaNet feeds C3–C5 to the pyramid and adds P6 (from C5) and P7 (mmdet ``add_extra_convs="on_input"``,
torchvision :class:`~torchvision.ops.feature_pyramid_network.LastLevelP6P7`); Mask R-CNN feeds C2–C5 and adds a
max-pooled level, as torchvision and mmdet do.

Norms in the backbone (``norm``):

* ``"frozen"`` (torchvision's habit; the default for a backbone with loaded weights): every ``BatchNorm2d`` becomes
  torchvision's ``FrozenBatchNorm2d`` (statistics and affine parameters fixed), via
  :func:`timm.layers.freeze_batch_norm_2d`. Right for a pretrained
  backbone and the small per-device batches of detection.
* ``"eval"`` (mmdet's ``norm_eval=True``): BN layers stay ``BatchNorm2d`` but are kept in eval mode during training,
  so statistics are fixed while affine parameters of trainable stages learn.
* ``"train"``: ordinary BN that updates its statistics; for a backbone trained from scratch (the default then) with
  enough images per batch.

When ``trainable_stages`` / ``norm`` are not given, :func:`backbone_defaults` chooses them from whether the backbone
loads weights: one rule for the builders and the detection config.

Other norms (the LayerNorms of DS-Net's global stream) follow ``trainable_stages``. The neck and the heads are always
trainable and keep their own norms.

Example:
    >>> import torch
    >>> from dsnet.detection.builders import retinanet
    >>> model = retinanet("resnet18", num_classes=11, neck="ds_fpn", min_size=128, max_size=128).eval()
    >>> out = model([torch.rand(3, 128, 128)])
    >>> sorted(out[0])
    ['boxes', 'labels', 'scores']
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal

import timm
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator

from dsnet.detection.ds_fpn import DSFPN, DSPosition
from dsnet.errors import DSNetError

__all__ = [
    "NECKS",
    "NORM_MODES",
    "BackboneWithPyramid",
    "backbone_defaults",
    "create_backbone",
    "maskrcnn",
    "retinanet",
]

Neck = Literal["fpn", "ds_fpn"]
NormMode = Literal["frozen", "eval", "train"]
NECKS: tuple[str, ...] = ("fpn", "ds_fpn")
NORM_MODES: tuple[str, ...] = ("frozen", "eval", "train")
_STAGE_REDUCTIONS = (4, 8, 16, 32)


def _norm_name(name: str) -> str:
    return name.replace("_", ".")


def backbone_stage_index(body: nn.Module) -> dict[str, int]:
    """Stage (0–3) of every submodule of a timm ``features_only`` model, by module name.

    A module under the feature module of level ``i`` belongs to stage ``i``; a module registered before it
    (stem, patch embedding) belongs to the next stage that follows; anything after the last level to the last stage.
    """
    feature_modules = [_norm_name(n) for n in body.feature_info.module_name()]

    def level_of(name: str) -> int | None:
        n = _norm_name(name)
        for i, m in enumerate(feature_modules):
            if n == m or n.startswith(m + ".") or n.endswith("." + m) or f".{m}." in n:
                return i
        return None

    stages: dict[str, int] = {}
    pending: list[str] = []
    for name, _ in body.named_modules():
        if not name:
            continue
        level = level_of(name)
        if level is None:
            pending.append(name)
            continue
        for p in pending:
            # a container that holds a feature module is resolved by its children; give it the level seen now
            stages[p] = level
        pending = []
        stages[name] = level
    for p in pending:
        stages[p] = len(feature_modules) - 1
    return stages


class BackboneWithPyramid(nn.Module):
    """A timm ``features_only`` backbone followed by an FPN / DS-FPN; what torchvision's detectors expect.

    Args:
        body: timm model created with ``features_only=True`` returning the four levels of stride 4, 8, 16, 32.
        fpn: the pyramid (:class:`~dsnet.detection.ds_fpn.DSFPN`).
        in_levels: which of the four body levels feed the pyramid (0 = C2 … 3 = C5).
        trainable_stages: number of backbone stages trained, counted from the top (0–4).
        norm: ``"frozen"``, ``"eval"`` or ``"train"`` (see the module docstring).

    Attributes:
        out_channels: channels of every pyramid level (read by torchvision's detectors).
    """

    def __init__(
        self,
        body: nn.Module,
        fpn: DSFPN,
        in_levels: tuple[int, ...],
        *,
        trainable_stages: int,
        norm: NormMode,
    ) -> None:
        super().__init__()
        if not 0 <= trainable_stages <= 4:
            raise DSNetError(f"trainable_stages must be between 0 and 4, got {trainable_stages}")
        if norm not in NORM_MODES:
            raise DSNetError(f"unknown backbone norm mode {norm!r}; expected one of {NORM_MODES}")
        self.in_levels = tuple(in_levels)
        self.trainable_stages = trainable_stages
        self.norm = norm
        stage_of = backbone_stage_index(body)
        first_trainable = 4 - trainable_stages
        self._frozen_modules = [n for n, s in stage_of.items() if s < first_trainable]
        for name, module in body.named_modules():
            if name and stage_of[name] < first_trainable:
                for p in module.parameters(recurse=False):
                    p.requires_grad_(False)
        if norm == "frozen":
            body = timm.layers.freeze_batch_norm_2d(body)
        self.body = body
        self.fpn = fpn
        self.out_channels = fpn.out_channels

    def train(self, mode: bool = True) -> BackboneWithPyramid:
        """Like :meth:`nn.Module.train`, but BN in frozen stages (all BN with ``norm="eval"``) stays in eval mode."""
        super().train(mode)
        if mode:
            frozen = set(self._frozen_modules)
            for name, module in self.body.named_modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and (self.norm == "eval" or name in frozen):
                    module.eval()
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.body(x)
        if isinstance(features, dict):
            features = list(features.values())
        selected = OrderedDict((str(i), features[level]) for i, level in enumerate(self.in_levels))
        return self.fpn(selected)


def backbone_defaults(has_weights: bool) -> tuple[int, NormMode]:
    """``(trainable_stages, norm)`` of a backbone when the caller gives none.

    With loaded weights (``pretrained`` or a checkpoint): ``(3, "frozen")``, torchvision's and mmdetection's recipe
    for ImageNet backbones (stem and first stage fixed, BN statistics and affine parameters frozen). From scratch:
    ``(4, "train")``: nothing is learnt yet, so every stage trains, with ordinary BN.
    """
    return (3, "frozen") if has_weights else (4, "train")


def create_backbone(
    name: str = "dsnet_tiny",
    *,
    in_levels: tuple[int, ...] = (1, 2, 3),
    extra_levels: Literal["p6p7", "maxpool"] | None = "p6p7",
    neck: Neck = "ds_fpn",
    position: DSPosition | None = "lateral_extra",
    out_channels: int = 256,
    trainable_stages: int | None = None,
    norm: NormMode | None = None,
    pretrained: bool = False,
    checkpoint: str | None = None,
    block_kwargs: dict[str, Any] | None = None,
    extra_block_kwargs: dict[str, Any] | None = None,
    **model_kwargs: Any,
) -> BackboneWithPyramid:
    """A timm backbone (any model with ``features_only`` support) with an FPN or DS-FPN on top.

    Args:
        name: timm model name (``"dsnet_tiny"``, ``"resnet50"``, ...).
        in_levels: body levels fed to the pyramid, 0 = C2 (stride 4) … 3 = C5 (stride 32).
        extra_levels: ``"p6p7"`` (RetinaNet), ``"maxpool"`` (Mask R-CNN) or ``None``.
        neck: ``"fpn"`` (plain; same as ``position=None``) or ``"ds_fpn"``.
        position: DS-Block insertion position of the DS-FPN (ignored for ``neck="fpn"``).
        out_channels: pyramid width.
        trainable_stages: backbone stages trained, from the top (0 = frozen backbone, 4 = all of it); None: see
            :func:`backbone_defaults`.
        norm: BN handling in the backbone (``"frozen"``, ``"eval"``, ``"train"``); None: see
            :func:`backbone_defaults`.
        pretrained: load the model's pretrained weights through timm.
        checkpoint: path of a local weights file (safetensors or a torch state dict) for the backbone;
            loaded by timm without executing code. Implies ``pretrained``.
        block_kwargs, extra_block_kwargs: passed to :class:`~dsnet.detection.ds_fpn.DSFPN`.
        **model_kwargs: passed to :func:`timm.create_model` (e.g. ``drop_path_rate``).
    """
    if neck not in NECKS:
        raise DSNetError(f"unknown neck {neck!r}; expected one of {NECKS}")
    if not in_levels or any(i not in range(4) for i in in_levels) or list(in_levels) != sorted(set(in_levels)):
        raise DSNetError(f"in_levels must be increasing indices among 0..3 (C2..C5), got {in_levels}")
    if not timm.is_model(name):
        raise DSNetError(f"unknown backbone {name!r}: not a timm model (dsnet models: dsnet.models.list_zoo())")
    if checkpoint is not None:
        from pathlib import Path

        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"backbone checkpoint not found: {checkpoint}")
        pretrained = True
        model_kwargs["pretrained_cfg_overlay"] = {"file": str(checkpoint), "num_classes": 0}
    body = timm.create_model(
        name, pretrained=pretrained, features_only=True, out_indices=(-4, -3, -2, -1), **model_kwargs
    )
    reductions = tuple(body.feature_info.reduction())
    if reductions != _STAGE_REDUCTIONS:
        raise DSNetError(f"backbone {name!r} has feature levels of stride {reductions}; expected {_STAGE_REDUCTIONS}")
    channels = body.feature_info.channels()
    fpn = DSFPN(
        [channels[i] for i in in_levels],
        out_channels,
        position=None if neck == "fpn" else position,
        extra_levels=extra_levels,
        strides=[_STAGE_REDUCTIONS[i] for i in in_levels],
        block_kwargs=block_kwargs,
        extra_block_kwargs=extra_block_kwargs,
    )
    default_stages, default_norm = backbone_defaults(pretrained)
    return BackboneWithPyramid(
        body,
        fpn,
        tuple(in_levels),
        trainable_stages=default_stages if trainable_stages is None else trainable_stages,
        norm=default_norm if norm is None else norm,
    )


def retinanet(
    backbone: str = "dsnet_tiny",
    *,
    num_classes: int,
    neck: Neck = "ds_fpn",
    position: DSPosition | None = "lateral_extra",
    min_size: int = 800,
    max_size: int = 1333,
    anchor_sizes: tuple[int, ...] | None = None,
    trainable_stages: int | None = None,
    norm: NormMode | None = None,
    pretrained_backbone: bool = False,
    backbone_checkpoint: str | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> RetinaNet:
    """torchvision :class:`~torchvision.models.detection.RetinaNet` on ``backbone`` with FPN / DS-FPN (P3–P7).

    Args:
        backbone: timm model name.
        num_classes: classification outputs, torchvision's convention (label 0 unused by our datasets, so the
            number of categories + 1; mmdet's 80-class COCO head is ``num_classes=80``).
        neck, position: pyramid type and DS-Block position (see :class:`~dsnet.detection.ds_fpn.DSFPN`).
        min_size, max_size: images are resized so the short side is ``min_size`` unless the long side would
            exceed ``max_size`` (torchvision's ``GeneralizedRCNNTransform``).
        anchor_sizes: base anchor size of P3 … P7 (default 32, 64, 128, 256, 512); each gets 3 scales × 3 ratios.
        trainable_stages, norm, pretrained_backbone, backbone_checkpoint: see :func:`create_backbone`.
        backbone_kwargs: more keyword arguments of :func:`create_backbone` / :func:`timm.create_model`.
        **kwargs: passed to :class:`~torchvision.models.detection.RetinaNet` (``score_thresh``, ...).
    """
    body = create_backbone(
        backbone,
        in_levels=(1, 2, 3),
        extra_levels="p6p7",
        neck=neck,
        position=position,
        trainable_stages=trainable_stages,
        norm=norm,
        pretrained=pretrained_backbone,
        checkpoint=backbone_checkpoint,
        **(backbone_kwargs or {}),
    )
    if anchor_sizes is not None:
        if len(anchor_sizes) != 5:
            raise DSNetError(f"anchor_sizes needs one size per level P3–P7 (5), got {anchor_sizes}")
        # torchvision's RetinaNet anchors: 3 scales (2^0, 2^(1/3), 2^(2/3)) × 3 ratios per level
        scales = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
        kwargs["anchor_generator"] = AnchorGenerator(
            tuple(tuple(int(s * k) for k in scales) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * 5
        )
    return RetinaNet(body, num_classes, min_size=min_size, max_size=max_size, **kwargs)


def maskrcnn(
    backbone: str = "dsnet_tiny",
    *,
    num_classes: int,
    neck: Neck = "ds_fpn",
    position: DSPosition | None = "lateral_extra",
    min_size: int = 800,
    max_size: int = 1333,
    anchor_sizes: tuple[int, ...] | None = None,
    trainable_stages: int | None = None,
    norm: NormMode | None = None,
    pretrained_backbone: bool = False,
    backbone_checkpoint: str | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> MaskRCNN:
    """torchvision :class:`~torchvision.models.detection.MaskRCNN` on ``backbone`` with FPN / DS-FPN (P2–P6).

    Arguments as :func:`retinanet`; ``num_classes`` includes the background (categories + 1) and
    ``anchor_sizes`` gives the base size of P2 … P6 (default 32 … 512, 3 ratios each, torchvision's).
    """
    body = create_backbone(
        backbone,
        in_levels=(0, 1, 2, 3),
        extra_levels="maxpool",
        neck=neck,
        position=position,
        trainable_stages=trainable_stages,
        norm=norm,
        pretrained=pretrained_backbone,
        checkpoint=backbone_checkpoint,
        **(backbone_kwargs or {}),
    )
    if anchor_sizes is not None:
        if len(anchor_sizes) != 5:
            raise DSNetError(f"anchor_sizes needs one size per level P2–P6 (5), got {anchor_sizes}")
        kwargs["rpn_anchor_generator"] = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    return MaskRCNN(body, num_classes, min_size=min_size, max_size=max_size, **kwargs)


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())
