"""Detection runs: typed config, a thin train loop over torchvision's detectors, COCO evaluation, prediction drawings.

A run folder holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON object per logged step and
per evaluation, ``kind`` = ``"step"`` / ``"eval"``, through :class:`dsnet.engine.report.MetricsLog`)
and ``checkpoints/`` (``last``/``best`` written atomically by :mod:`dsnet.engine.checkpoint`).
``resume`` continues a run from ``checkpoints/last`` (model, optimizer, RNG and data order, epoch; the learning
rate follows the update count).

Example (a few seconds on a CPU):
    >>> from dsnet.detection.engine import load_detection_config, train
    >>> cfg = load_detection_config(None, ["data.root=/tmp/fashion_det", "optim.epochs=1", "model.backbone=resnet18"])
    >>> cfg.model.arch, cfg.optim.lr
    ('retinanet', 0.0002)
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from dsnet.engine.config import coerce_value

__all__ = [
    "DetectionConfig",
    "build_model",
    "draw_predictions",
    "evaluate",
    "load_detection_config",
    "load_model",
    "train",
]


@dataclass
class DetModelConfig:
    """The detector."""

    arch: str = "retinanet"  # "retinanet" or "maskrcnn"
    backbone: str = "dsnet_tiny"  # any timm model with features_only support
    neck: str = "ds_fpn"  # "ds_fpn" or "fpn"
    position: str | None = "lateral_extra"  # DS-Block position: last, lateral, lateral_rev, lateral_extra
    trainable_stages: int = 4  # backbone stages trained from the top (0-4); 4: all (from-scratch backbones)
    norm: str = "train"  # backbone BN: "frozen", "eval" or "train" (from scratch: train)
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
    batch_size: int = 8
    workers: int = 0  # DataLoader workers
    max_train_images: int | None = None  # first N training images only (quick runs, tests)
    max_val_images: int | None = None  # first N validation images only


@dataclass
class DetOptimConfig:
    """AdamW with step decay, the paper's 1× recipe shape (decay ×0.1 at 8/12 and 11/12 of the epochs)."""

    lr: float = 2e-4
    weight_decay: float = 0.05  # not applied to norms and biases
    epochs: int = 12
    warmup_iters: int = 100  # linear warm-up updates
    decay_at: tuple[float, ...] = (8 / 12, 11 / 12)  # fractions of training where lr is multiplied by 0.1
    clip_grad: float | None = 10.0  # global gradient-norm clip


@dataclass
class DetRunConfig:
    """Loop, logs, outputs."""

    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", ...
    threads: int | None = None  # torch CPU threads
    output_dir: str = "runs"
    name: str | None = None  # run folder name; None: "<arch>-<backbone>-<neck>-<timestamp>"
    log_interval: int = 20  # updates between step records
    eval_interval: int = 1  # epochs between evaluations (and after the last)
    progress: bool = True  # tqdm progress bars


@dataclass
class DetectionConfig:
    """A whole detection run (sections ``model``, ``data``, ``optim``, ``run``)."""

    model: DetModelConfig = field(default_factory=DetModelConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    optim: DetOptimConfig = field(default_factory=DetOptimConfig)
    run: DetRunConfig = field(default_factory=DetRunConfig)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _set(cfg: DetectionConfig, dotted: str, value: Any, where: str) -> None:
    section_name, _, key = dotted.partition(".")
    section = getattr(cfg, section_name, None) if section_name in ("model", "data", "optim", "run") else None
    hints = typing.get_type_hints(type(section)) if section is not None else {}
    if key not in hints:
        valid = [
            f"{s}.{k}" for s in ("model", "data", "optim", "run") for k in typing.get_type_hints(type(getattr(cfg, s)))
        ]
        raise ValueError(f"unknown config key {dotted!r} in {where}; valid keys: {', '.join(valid)}")
    setattr(section, key, coerce_value(value, hints[key], dotted))


def load_detection_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> DetectionConfig:
    """Defaults, then the YAML recipe at ``path`` (nested sections), then ``section.key=value`` overrides."""
    cfg = DetectionConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"config {path}: expected a mapping of sections (model, data, optim, run)")
        for section, values in tree.items():
            if not isinstance(values, dict):
                raise ValueError(f"config {path}: section {section!r} must be a mapping")
            for key, value in values.items():
                _set(cfg, f"{section}.{key}", value, str(path))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.key=value (e.g. optim.lr=0.001)")
        key, raw = item.split("=", 1)
        _set(cfg, key.strip(), yaml.safe_load(raw) if raw.strip() else None, "--set")
    if cfg.model.arch not in ("retinanet", "maskrcnn"):
        raise ValueError(f"model.arch must be 'retinanet' or 'maskrcnn', got {cfg.model.arch!r}")
    return cfg


def build_model(cfg: DetModelConfig, num_classes: int) -> nn.Module:
    """The torchvision detector described by ``cfg`` (``num_classes`` includes the background)."""
    from dsnet.detection import builders

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


def _datasets(cfg: DetectionConfig) -> tuple[Any, Any]:
    from dsnet.detection.data import CocoDetection, split_paths

    masks = cfg.model.arch == "maskrcnn"
    train_set = CocoDetection(*split_paths(cfg.data.root, cfg.data.train_split), masks=masks, hflip=cfg.data.hflip)
    val_set = CocoDetection(*split_paths(cfg.data.root, cfg.data.val_split), masks=masks)
    return train_set, val_set


def _subset(dataset: Any, limit: int | None) -> Any:
    if limit is None or limit >= len(dataset):
        return dataset
    return torch.utils.data.Subset(dataset, range(limit))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int = 8,
    limit: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, float]:
    """COCO box (and, for Mask R-CNN, mask) metrics of ``model`` on a :class:`~dsnet.detection.data.CocoDetection`.

    Keys ``bbox_AP`` … ``bbox_APl`` and ``segm_*``, fractions in [0, 1]. With ``limit`` only the first images
    count (the ground truth is restricted to them too).
    """
    from dsnet.detection.data import collate
    from dsnet.detection.metrics import coco_evaluate, coco_from_dict, to_coco_results
    from dsnet.engine.report import Progress

    masks = bool(getattr(model, "roi_heads", None) is not None and model.roi_heads.has_mask())
    subset = _subset(dataset, limit)
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=collate)
    was_training = model.training
    model.eval()
    results, image_ids = [], []
    bar = Progress(len(subset), "eval", enabled=progress)
    for images, targets in loader:
        outputs = model([im.to(device) for im in images])
        bar.update(len(images))
        ids = [int(t["image_id"]) for t in targets]
        image_ids.extend(ids)
        results.extend(to_coco_results(outputs, ids, dataset.label_to_category_id, masks=masks))
    bar.close()
    model.train(was_training)
    gt = dataset.coco
    if len(subset) < len(dataset):
        keep = set(image_ids)
        data = dataset.data
        gt = coco_from_dict(
            {
                **data,
                "images": [i for i in data["images"] if i["id"] in keep],
                "annotations": [a for a in data["annotations"] if a["image_id"] in keep],
            }
        )
    return coco_evaluate(gt, results, ("bbox", "segm") if masks else ("bbox",))


def _lr_factor(update: int, total: int, cfg: DetOptimConfig) -> float:
    warm = min(1.0, (update + 1) / cfg.warmup_iters) if cfg.warmup_iters > 0 else 1.0
    decay = 0.1 ** sum(update >= int(f * total) for f in cfg.decay_at)
    return warm * decay


def _run_dir(cfg: DetectionConfig) -> Path:
    name = cfg.run.name or f"{cfg.model.arch}-{cfg.model.backbone}-{cfg.model.neck}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.run.output_dir) / name


def train(cfg: DetectionConfig, *, resume: str | Path | None = None) -> dict[str, Any]:
    """Train and evaluate the detector of ``cfg``; returns the last evaluation (plus ``run_dir``).

    ``resume``: a run folder whose ``checkpoints/last`` continues (its own ``config.yaml`` is not re-read: pass
    the same config).
    """
    from timm.optim import create_optimizer_v2

    from dsnet.detection.data import collate
    from dsnet.engine.checkpoint import capture_rng, load_training_state, restore_rng, save_checkpoint
    from dsnet.engine.distributed import resolve_device
    from dsnet.engine.report import MetricsLog, Progress

    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    device = resolve_device(cfg.run.device)
    train_set, val_set = _datasets(cfg)
    model = build_model(cfg.model, train_set.num_classes).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = create_optimizer_v2(model, "adamw", lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    train_subset = _subset(train_set, cfg.data.max_train_images)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    loader = torch.utils.data.DataLoader(
        train_subset,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=cfg.data.workers,
        generator=generator,
        drop_last=len(train_subset) > cfg.data.batch_size,
    )
    total = cfg.optim.epochs * len(loader)
    run_dir = Path(resume) if resume is not None else _run_dir(cfg)
    ckpt_dir = run_dir / "checkpoints"
    start_epoch, update, best = 0, 0, -math.inf
    if resume is not None:
        from dsnet.engine.checkpoint import load_weights

        state, weights_path = load_training_state(ckpt_dir)
        model.load_state_dict(load_weights(weights_path)[0])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"])
        generator.set_state(state["generator"])
        start_epoch, update, best = state["epoch"], state["update"], state["best"]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    log = MetricsLog(run_dir / "metrics.jsonl")
    log.truncate_after(update)  # a resumed run rewrites what came after its last checkpoint
    metadata = {"arch": cfg.model.arch, "backbone": cfg.model.backbone, "classes": train_set.categories}
    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.optim.epochs):
        model.train()
        progress = Progress(len(train_subset), f"epoch {epoch + 1}/{cfg.optim.epochs}", enabled=cfg.run.progress)
        for images, targets in loader:
            for group in optimizer.param_groups:
                group["lr"] = cfg.optim.lr * _lr_factor(update, total, cfg.optim)
            images = [im.to(device) for im in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at update {update} (try a lower optim.lr)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
            optimizer.step()
            update += 1
            progress.update(len(images), loss=loss.item())
            if update % cfg.run.log_interval == 0:
                values = {k: round(v.item(), 5) for k, v in losses.items()}
                log.write(
                    "step",
                    epoch=epoch + 1,
                    update=update,
                    lr=optimizer.param_groups[0]["lr"],
                    loss=round(loss.item(), 5),
                    **values,
                )
        progress.close()
        last_epoch = epoch + 1 == cfg.optim.epochs
        if (epoch + 1) % cfg.run.eval_interval == 0 or last_epoch:
            metrics = evaluate(
                model, val_set, batch_size=cfg.data.batch_size, limit=cfg.data.max_val_images, device=device
            )
            log.write("eval", epoch=epoch + 1, update=update, **metrics)
            if cfg.run.progress:
                print(f"epoch {epoch + 1}: " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()), flush=True)
            if metrics.get("bbox_AP", -1) > best:
                best = metrics["bbox_AP"]
                save_checkpoint(ckpt_dir, "best", model, metadata={**metadata, "epoch": epoch + 1})
        state = {
            "optimizer": optimizer.state_dict(),
            "rng": capture_rng(),
            "generator": generator.get_state(),
            "epoch": epoch + 1,
            "update": update,
            "best": best,
        }
        save_checkpoint(ckpt_dir, "last", model, training_state=state, metadata={**metadata, "epoch": epoch + 1})
    return {**metrics, "run_dir": str(run_dir)}


def load_model(run_dir: str | Path, tag: str = "best") -> tuple[nn.Module, DetectionConfig, list[str]]:
    """``(model, config, class names)`` of a finished run folder, weights loaded (safetensors, no code executed)."""
    from dsnet.engine.checkpoint import load_weights, resolve_checkpoint

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
