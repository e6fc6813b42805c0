"""Detection as a :class:`~dsnet.engine.fit.Task`: typed config, torchvision's detectors, COCO evaluation, drawings.

Training is the one loop, :func:`dsnet.engine.fit.fit`, the classification runs' own: the same run folder
(``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``curves.png``, ``summary.json``), exact resume from
``checkpoints/last``, torchrun DDP (gloo on CPU, nccl on CUDA) with sharded evaluation, ``train.amp`` autocast,
gradient accumulation, EMA, atomic checkpoints. The config speaks the same vocabulary (the whole ``train`` section,
``sched.epochs``/``updates``/``minutes``, ``data.max_train_samples``...); the keys of earlier versions (``run.*``,
``data.batch_size``, ``optim.epochs``, ``data.max_train_images``) are still read, with a warning that names the new
key (:data:`RENAMED_KEYS`).

Several processes::

    torchrun --nproc-per-node 2 -m dsnet.cli.main detect train -c configs/detection/retinanet_dsnet_tiny_fashion.yaml

Example (a few seconds on a CPU):
    >>> from dsnet.detection.engine import load_detection_config, train
    >>> cfg = load_detection_config(None, ["data.root=/tmp/fashion_det", "sched.epochs=1", "model.backbone=resnet18"])
    >>> cfg.model.arch, cfg.optim.lr
    ('retinanet', 0.0002)
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsnet.data.datasets import ShardedEpochSampler
from dsnet.detection import builders
from dsnet.detection.data import CocoDetection, collate, split_paths
from dsnet.detection.metrics import coco_evaluate, coco_from_dict, to_coco_results
from dsnet.engine.checkpoint import load_weights, resolve_checkpoint, resolve_run
from dsnet.engine.config import (
    LOOP_RANGES,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    Bound,
    TrainConfig,
    check_loop_rules,
    check_ranges,
    load_typed_config,
    model_min_input,
)
from dsnet.engine.distributed import all_gather_objects, broadcast_object, rank_and_world
from dsnet.engine.fit import FitContext, StepLoss, fit
from dsnet.engine.report import Progress, format_metric
from dsnet.engine.runtime import autocast_context
from dsnet.errors import DSNetError

__all__ = [
    "RENAMED_KEYS",
    "DetectionConfig",
    "DetectionPrediction",
    "DetectionTask",
    "build_model",
    "draw_predictions",
    "evaluate",
    "load_detection_config",
    "load_model",
    "predict_files",
    "train",
]


@dataclass
class DetModelConfig:
    """The detector."""

    arch: str = "retinanet"  # "retinanet" or "maskrcnn"
    backbone: str = "dsnet_tiny"  # any timm model with features_only support
    neck: str = "ds_fpn"  # "ds_fpn" or "fpn"
    position: str | None = "lateral_extra"  # DS-Block position: last, lateral, lateral_rev, lateral_extra
    # backbone stages trained from the top (0-4) and BN handling ("frozen", "eval", "train"); None: the builders'
    # rule, dsnet.detection.builders.backbone_defaults (3 and frozen with loaded weights, 4 and train from scratch)
    trainable_stages: int | None = None
    norm: str | None = None
    min_size: int = 128  # short image side after torchvision's resize
    max_size: int = 128  # long image side limit
    anchor_sizes: tuple[int, ...] | None = None  # base anchor size per level; None: torchvision's 32 ... 512
    pretrained_backbone: bool = False  # load the backbone's timm pretrained weights
    backbone_checkpoint: str | None = None  # local backbone weights (.safetensors / .pth, loaded without code)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    score_thresh: float = 0.05  # detections scoring less are dropped at inference (torchvision's default)


@dataclass
class DetDataConfig:
    """COCO-format data: ``root/<split>/`` images and ``root/annotations/instances_<split>.json``."""

    root: str = "data/fashion_det"  # dataset root (dsnet detect make-data writes this layout)
    train_split: str = "train"
    val_split: str = "val"
    hflip: float = 0.5  # random horizontal flip probability in training
    workers: int = 0  # DataLoader workers per process
    max_train_samples: int | None = None  # first N training images only (quick runs, tests)
    max_val_samples: int | None = None  # first N validation images only


@dataclass
class DetOptimConfig:
    """AdamW with step decay, the paper's 1× recipe shape (decay ×0.1 at 8/12 and 11/12 of the epochs).

    The schedule is timm's ``MultiStepLRScheduler`` stepped per update: linear warm-up from ``lr × warmup_ratio``
    (mmdetection's 0.001), then ×0.1 at each milestone.
    """

    lr: float = 2e-4  # for the global batch train.batch_size
    weight_decay: float = 0.05  # not applied to norms and biases
    warmup_iters: int = 100  # linear warm-up updates
    warmup_ratio: float = 0.001  # warm-up starts at lr × warmup_ratio
    decay_at: tuple[float, ...] = (8 / 12, 11 / 12)  # fractions of training where lr is multiplied by 0.1
    clip_grad: float | None = 10.0  # global gradient-norm clip


@dataclass
class DetSchedConfig:
    """Length of training (the warm-up and the step decay are in ``optim``)."""

    epochs: int = 12
    updates: int | None = None  # total optimizer updates instead (the last epoch may be partial)
    minutes: float | None = None  # train this long instead (evaluation excluded): dsnet.engine.budget


@dataclass
class DetTrainConfig(TrainConfig):
    """The loop: classification's ``train`` section (:class:`~dsnet.engine.config.TrainConfig`), with a detector's
    defaults: a global batch of 8 images, step records every 20 updates."""

    batch_size: int = 8
    log_interval: int = 20


@dataclass
class DetectionConfig:
    """A whole detection run (sections ``model``, ``data``, ``optim``, ``sched``, ``train``)."""

    model: DetModelConfig = field(default_factory=DetModelConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    optim: DetOptimConfig = field(default_factory=DetOptimConfig)
    sched: DetSchedConfig = field(default_factory=DetSchedConfig)
    train: TrainConfig = field(default_factory=DetTrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


#: Keys of earlier detection configs → the classification names they now share (read with a warning).
RENAMED_KEYS: dict[str, str] = {
    "data.batch_size": "train.batch_size",
    "optim.epochs": "sched.epochs",
    "data.max_train_images": "data.max_train_samples",
    "data.max_val_images": "data.max_val_samples",
    **{
        f"run.{k}": f"train.{k}"
        for k in (
            "seed",
            "device",
            "amp",
            "threads",
            "output_dir",
            "name",
            "log_interval",
            "ckpt_interval",
            "eval_interval",
            "progress",
        )
    },
}


def _renamed_key(key: str, value: Any) -> tuple[str, Any]:
    new = RENAMED_KEYS.get(key)
    if new is None:
        return key, value
    print(f"dsnet: warning: detection config key {key} is deprecated; use {new}", file=sys.stderr)
    return new, value


def load_detection_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> DetectionConfig:
    """Defaults, then the YAML recipe at ``path`` (nested sections), then ``section.key=value`` overrides.

    The same loader as classification runs (:func:`dsnet.engine.config.load_typed_config`): ``base:`` recipes,
    typed values, unknown keys named with the valid ones. Keys of :data:`RENAMED_KEYS` (and a ``run:`` section) are
    read under their new names, with a warning on stderr.
    """
    cfg = load_typed_config(
        DetectionConfig,
        path,
        overrides,
        rename=_renamed_key,
        aliases=RENAMED_KEYS,
        legacy_sections=("run",),
        check=_check_detection,
    )
    if cfg.model.arch not in ("retinanet", "maskrcnn"):
        raise DSNetError(f"model.arch must be 'retinanet' or 'maskrcnn', got {cfg.model.arch!r}")
    return cfg


#: Allowed values of every numeric field of :class:`DetectionConfig` (``None`` values are not checked).
DETECTION_RANGES: dict[str, Bound] = {
    "model.trainable_stages": Bound(0, 4),
    "model.min_size": POSITIVE_INT,
    "model.max_size": POSITIVE_INT,
    "model.anchor_sizes": POSITIVE_INT,
    "model.score_thresh": PROBABILITY,
    "data.hflip": PROBABILITY,
    "data.workers": NON_NEGATIVE,
    "data.max_train_samples": POSITIVE_INT,
    "data.max_val_samples": POSITIVE_INT,
    "optim.lr": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.warmup_iters": NON_NEGATIVE,
    "optim.warmup_ratio": Bound(0, 1, low_open=True),
    "optim.decay_at": Bound(0, 1, low_open=True, high_open=True),
    "optim.clip_grad": POSITIVE,
    **LOOP_RANGES,
}


def _check_detection(cfg: DetectionConfig, where: str) -> None:
    check_ranges(cfg, DETECTION_RANGES, where)
    check_loop_rules(cfg, where)
    if cfg.model.max_size < cfg.model.min_size:
        raise DSNetError(f"{where}: model.max_size={cfg.model.max_size} is below model.min_size={cfg.model.min_size}")
    min_input = model_min_input(cfg.model.backbone)
    if cfg.model.min_size < min_input:
        raise DSNetError(
            f"{where}: model.min_size={cfg.model.min_size} is too small for {cfg.model.backbone}; "
            f"it takes inputs of at least {min_input}x{min_input} px"
        )


def build_model(cfg: DetModelConfig, num_classes: int) -> nn.Module:
    """The torchvision detector described by ``cfg`` (``num_classes`` includes the background)."""
    if cfg.arch == "retinanet":
        make, extra = builders.retinanet, {"score_thresh": cfg.score_thresh}
    else:
        make, extra = builders.maskrcnn, {"box_score_thresh": cfg.score_thresh}
    return make(
        cfg.backbone,
        num_classes=num_classes,
        neck=cfg.neck,  # type: ignore[arg-type]
        position=cfg.position,  # type: ignore[arg-type]
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        anchor_sizes=cfg.anchor_sizes,
        trainable_stages=cfg.trainable_stages,
        norm=cfg.norm,  # type: ignore[arg-type]
        pretrained_backbone=cfg.pretrained_backbone,
        backbone_checkpoint=cfg.backbone_checkpoint,
        backbone_kwargs=cfg.backbone_kwargs,
        **extra,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, float]:
    """COCO box (and, for Mask R-CNN, mask) metrics of ``model`` on a :class:`~dsnet.detection.data.CocoDetection`.

    Keys ``bbox_AP`` … ``bbox_APl`` and ``segm_*``, fractions in [0, 1]. With ``limit`` only the first images
    count (the ground truth is restricted to them too). Under torchrun each process runs ``batch_size`` images at a
    time on its share of the images; every process returns the metrics of the whole set.
    """
    device = torch.device(device)
    masks = bool(getattr(model, "roi_heads", None) is not None and model.roi_heads.has_mask())
    count = len(dataset) if limit is None else min(limit, len(dataset))
    rank, world = rank_and_world()
    mine = torch.utils.data.Subset(dataset, range(rank, count, world))
    loader = torch.utils.data.DataLoader(mine, batch_size=batch_size, collate_fn=collate)
    was_training = model.training
    model.eval()
    results = []
    bar = Progress(count, desc, enabled=progress and rank == 0)
    for images, targets in loader:
        with autocast_context(device, amp_dtype):
            outputs = model([im.to(device) for im in images])
        outputs = [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in outputs]
        bar.update(len(images) * world)
        ids = [int(t["image_id"]) for t in targets]
        results.extend(to_coco_results(outputs, ids, dataset.label_to_category_id, masks=masks))
    bar.close()
    model.train(was_training)
    gathered = all_gather_objects(results)
    metrics: dict[str, float] | None = None
    if rank == 0:
        results = [r for part in gathered for r in part]
        gt = dataset.coco
        if count < len(dataset):
            keep = {info["id"] for info in dataset.images[:count]}
            data = dataset.data
            gt = coco_from_dict(
                {
                    **data,
                    "images": [i for i in data["images"] if i["id"] in keep],
                    "annotations": [a for a in data["annotations"] if a["image_id"] in keep],
                }
            )
        metrics = coco_evaluate(gt, results, ("bbox", "segm") if masks else ("bbox",))
    return broadcast_object(metrics)  # type: ignore[return-value]


class DetectionTask:
    """Object detection (and instance segmentation) for :func:`dsnet.engine.fit.fit`: torchvision's RetinaNet or
    Mask R-CNN on a timm backbone, COCO-format data, COCO evaluation; "best" is the highest box AP."""

    score_key = "bbox_AP"
    nonfinite_advice = "lower optim.lr, keep optim.clip_grad set, or use train.amp=none"

    def __init__(self, cfg: DetectionConfig) -> None:
        self.cfg = cfg
        m = cfg.model
        self.title = f"{m.arch} + {m.backbone} + {m.neck}"
        self.default_name = f"{m.arch}-{m.backbone}-{m.neck}"
        self.classes: list[str] = []
        self.num_train = self.num_val = 0

    def setup(self, ctx: FitContext) -> None:
        d, masks = self.cfg.data, self.cfg.model.arch == "maskrcnn"
        self.ctx = ctx
        self.train_set = CocoDetection(
            *split_paths(d.root, d.train_split), masks=masks, hflip=d.hflip, seed=self.cfg.train.seed
        )
        self.val_set = CocoDetection(*split_paths(d.root, d.val_split), masks=masks)
        self.classes = list(self.train_set.categories)
        limit = d.max_train_samples
        self.num_train = len(self.train_set) if limit is None else min(limit, len(self.train_set))
        limit = d.max_val_samples
        self.num_val = len(self.val_set) if limit is None else min(limit, len(self.val_set))

    def build_model(self) -> nn.Module:
        return build_model(self.cfg.model, self.train_set.num_classes)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        from timm.optim import create_optimizer_v2

        o = self.cfg.optim
        return create_optimizer_v2(model, "adamw", lr=o.lr, weight_decay=o.weight_decay)

    def build_scheduler(self, optimizer: torch.optim.Optimizer, total_updates: int, updates_per_epoch: int) -> Any:
        from timm.scheduler import MultiStepLRScheduler

        o = self.cfg.optim
        return MultiStepLRScheduler(
            optimizer,
            decay_t=[int(f * total_updates) for f in o.decay_at],
            decay_rate=0.1,
            warmup_t=o.warmup_iters,
            warmup_lr_init=o.lr * o.warmup_ratio,
            warmup_prefix=False,  # milestones count from the first update, warm-up included
            t_in_epochs=False,
        )

    def train_batches(self, sampler: ShardedEpochSampler) -> Iterable[Any]:
        from torch.utils.data import DataLoader

        return DataLoader(
            self.train_set,
            batch_size=self.ctx.micro,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.cfg.data.workers,
            pin_memory=self.ctx.device.type == "cuda",
        )

    def forward_loss(self, model: nn.Module, batch: Any) -> StepLoss:
        device = self.ctx.device
        images = [im.to(device, non_blocking=True) for im in batch[0]]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in batch[1]]
        if self.cfg.train.channels_last:
            images = [im.contiguous(memory_format=torch.channels_last) for im in images]
        parts = {k: v.float() for k, v in model(images, targets).items()}
        return StepLoss(sum(parts.values()), len(images), parts={k: v.detach() for k, v in parts.items()})

    def evaluate(self, model: nn.Module, desc: str) -> dict[str, float | None]:
        return evaluate(
            model,
            self.val_set,
            batch_size=self.ctx.micro,
            limit=self.cfg.data.max_val_samples,
            device=self.ctx.device,
            amp_dtype=self.ctx.amp_dtype,
            progress=self.ctx.progress,
            desc=desc,
        )

    def record(self, result: dict[str, float | None]) -> dict[str, Any]:
        return dict(result)

    def describe(self, record: dict[str, Any]) -> str:
        return " ".join(f"{k}={format_metric(v)}" for k, v in record.items())

    def checkpoint_metadata(self) -> dict[str, Any]:
        return {"arch": self.cfg.model.arch, "backbone": self.cfg.model.backbone}

    def summary(self, final: dict[str, Any], final_ema: dict[str, Any] | None) -> dict[str, Any]:
        return {
            **final,
            "final_ema": final_ema,
            "model": self.title,
            "data": self.cfg.data.root,
        }

    def draw(self, run_dir: Path, records: list[dict[str, Any]], final: dict[str, Any]) -> None:
        """Nothing beyond the loop's ``curves.png`` (``dsnet detect predict`` draws the boxes)."""


def train(cfg: DetectionConfig | None = None, *, resume: str | Path | None = None) -> Path:
    """Train and evaluate the detector of ``cfg`` (or continue the run folder ``resume`` with its saved config).

    Returns the run folder; its ``summary.json`` holds the last evaluation's metrics (see
    :func:`dsnet.engine.fit.fit`). One process, or one of several started by ``torchrun`` (DDP).
    """
    cfg, resume_dir = resolve_run(cfg, resume, load_detection_config)
    return fit(DetectionTask(cfg), resume_dir=resume_dir)


def load_model(run_dir: str | Path, tag: str = "best") -> tuple[nn.Module, DetectionConfig, list[str]]:
    """``(model, config, class names)`` of a finished run folder, weights loaded (safetensors, no code executed)."""
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a detection run folder (no config.yaml)")
    cfg = load_detection_config(cfg_file)
    state, meta = load_weights(resolve_checkpoint(run_dir, tag))
    classes = list(meta.get("classes") or [])
    cfg.model.pretrained_backbone, cfg.model.backbone_checkpoint = False, None
    model = build_model(cfg.model, len(classes) + 1)
    model.load_state_dict(state)
    return model.eval(), cfg, classes


def draw_predictions(
    image: torch.Tensor, output: dict[str, torch.Tensor], classes: list[str], score_thresh: float = 0.5
) -> torch.Tensor:
    """``image`` (3, H, W) float in [0, 1] with boxes, "class score" labels and masks drawn; uint8 (3, H, W)."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    keep = output["scores"] >= score_thresh
    canvas = (image.clamp(0, 1) * 255).to(torch.uint8)
    if "masks" in output and keep.any():
        canvas = draw_segmentation_masks(canvas, output["masks"][keep][:, 0] > 0.5, alpha=0.4)
    labels = [
        f"{classes[int(lbl) - 1] if 0 < int(lbl) <= len(classes) else int(lbl)} {s:.2f}"
        for lbl, s in zip(output["labels"][keep], output["scores"][keep].tolist())
    ]
    if keep.any():
        canvas = draw_bounding_boxes(canvas, output["boxes"][keep], labels=labels, colors="yellow", width=1)
    return canvas


@dataclass
class DetectionPrediction:
    """What :func:`predict_files` did with one image."""

    path: str
    output: str | None = None  # the drawing written
    objects: int = 0  # detections kept (score >= the threshold)
    error: str | None = None  # why the image could not be read (nothing else was done)


def predict_files(
    run_dir: str | Path,
    images: list[Path],
    out: str | Path,
    *,
    tag: str = "best",
    score_thresh: float = 0.5,
) -> list[DetectionPrediction]:
    """Detect objects in ``images`` with the run's ``tag`` checkpoint and draw them.

    One image: the drawing is written to ``out``; several: to ``out/<stem>_pred.png``. An unreadable image (or a
    decompression bomb) is a per-file error in its :class:`DetectionPrediction`, never an exception.
    """
    import numpy as np
    from PIL import Image

    from dsnet.data.images import ImageLoadError, load_image

    model, _, classes = load_model(run_dir, tag)
    # let the detector keep everything the drawing threshold asks for
    if hasattr(model, "score_thresh"):
        model.score_thresh = min(model.score_thresh, score_thresh)  # RetinaNet
    if hasattr(model, "roi_heads"):
        model.roi_heads.score_thresh = min(model.roi_heads.score_thresh, score_thresh)  # Mask R-CNN
    out = Path(out)
    if len(images) > 1:
        out.mkdir(parents=True, exist_ok=True)
    results = []
    for path in images:
        try:
            array = np.asarray(load_image(path, "RGB"), dtype=np.uint8).copy()
        except ImageLoadError as err:
            results.append(DetectionPrediction(str(path), error=str(err)))
            continue
        image = torch.from_numpy(array).permute(2, 0, 1).float() / 255  # (3, H, W)
        with torch.no_grad():
            output = model([image])[0]
        drawn = draw_predictions(image, output, classes, score_thresh)
        target = out / f"{path.stem}_pred.png" if len(images) > 1 else out
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(target)
        kept = int((output["scores"] >= score_thresh).sum())
        results.append(DetectionPrediction(str(path), str(target), kept))
    return results
