"""Detection runs: typed config, a thin train loop over torchvision's detectors, COCO evaluation, prediction drawings.

A run folder holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON object per logged step and
per evaluation, ``kind`` = ``"step"`` / ``"eval"``, through :class:`dsnet.engine.report.MetricsLog`)
and ``checkpoints/`` (``last``/``best`` written atomically by :mod:`dsnet.engine.checkpoint`).
``resume`` continues a run exactly from ``checkpoints/last`` (weights, optimizer, schedule, data position).

The loop shares the classification engine's machinery: :class:`~dsnet.data.datasets.ShardedEpochSampler` (data order
a function of ``(seed, epoch)``, a global batch split over the ranks, restart at any update), per-sample flip seeds,
``torchrun`` DDP (gloo on CPU, nccl on CUDA) with sharded evaluation, ``train.amp`` autocast, timm's optimizer and
step schedule, atomic checkpoints. The config speaks the classification vocabulary (``train.batch_size``,
``train.amp``, ``train.seed``, ``sched.epochs``, ``data.max_train_samples``...); the keys of earlier versions
(``run.*``, ``data.batch_size``, ``optim.epochs``, ``data.max_train_images``) are still read, with a warning that
names the new key (:data:`RENAMED_KEYS`).

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
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from dsnet._io import atomic_write_json, atomic_write_text, check_writable_folder
from dsnet.data.datasets import ShardedEpochSampler
from dsnet.detection import builders
from dsnet.detection.data import CocoDetection, collate, split_paths
from dsnet.detection.metrics import coco_evaluate, coco_from_dict, to_coco_results
from dsnet.engine import checkpoint as ckpt
from dsnet.engine.checkpoint import load_weights, resolve_checkpoint, resolve_run
from dsnet.engine.config import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    Bound,
    check_ranges,
    load_typed_config,
    model_min_input,
)
from dsnet.engine.distributed import (
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
    rank_and_world,
)
from dsnet.engine.report import MetricsLog, Progress, format_metric
from dsnet.engine.runtime import autocast_context, check_finite_loss, resolve_amp, seed_update, set_threads
from dsnet.engine.trainer import make_run_dir
from dsnet.errors import DSNetError

__all__ = [
    "RENAMED_KEYS",
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


@dataclass
class DetTrainConfig:
    """Loop, batch, precision, device, logs, outputs (the keys of classification's ``train`` section)."""

    batch_size: int = 8  # GLOBAL images per optimizer update (split over the torchrun processes)
    seed: int = 0  # initialisation, data order, flips, the detectors' own samplers
    device: str = "auto"  # "auto" (cuda:<local rank> if available, else cpu), "cpu", "cuda", ...
    amp: str = "auto"  # "auto" (bf16 on cuda with bf16, else off), "native" (also bf16 on CPUs with AVX512-BF16/AMX),
    # "none", "bf16", "fp16" (cuda); see dsnet.engine.runtime.resolve_amp
    threads: int | None = None  # torch CPU threads per process; None: dsnet.engine.runtime.auto_threads
    output_dir: str = "runs"
    name: str | None = None  # run name; the folder is <name>-<timestamp>; None: "<arch>-<backbone>-<neck>"
    log_interval: int = 20  # updates between step records
    ckpt_interval: int = 0  # also checkpoint "last" every N updates (mid-epoch); 0: per epoch only
    eval_interval: int = 1  # epochs between evaluations (and after the last)
    progress: bool = True  # progress bars (rank 0)


@dataclass
class DetectionConfig:
    """A whole detection run (sections ``model``, ``data``, ``optim``, ``sched``, ``train``)."""

    model: DetModelConfig = field(default_factory=DetModelConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    optim: DetOptimConfig = field(default_factory=DetOptimConfig)
    sched: DetSchedConfig = field(default_factory=DetSchedConfig)
    train: DetTrainConfig = field(default_factory=DetTrainConfig)

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
    "sched.epochs": POSITIVE_INT,
    "train.batch_size": POSITIVE_INT,
    "train.seed": NON_NEGATIVE,
    "train.threads": POSITIVE_INT,
    "train.log_interval": POSITIVE_INT,
    "train.ckpt_interval": NON_NEGATIVE,
    "train.eval_interval": POSITIVE_INT,
}


def _check_detection(cfg: DetectionConfig, where: str) -> None:
    check_ranges(cfg, DETECTION_RANGES, where)
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


def _datasets(cfg: DetectionConfig) -> tuple[Any, Any]:

    masks = cfg.model.arch == "maskrcnn"
    train_set = CocoDetection(
        *split_paths(cfg.data.root, cfg.data.train_split), masks=masks, hflip=cfg.data.hflip, seed=cfg.train.seed
    )
    val_set = CocoDetection(*split_paths(cfg.data.root, cfg.data.val_split), masks=masks)
    return train_set, val_set


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
    bar = Progress(count, "eval", enabled=progress and rank == 0)
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


def _build_scheduler(optimizer: torch.optim.Optimizer, total_updates: int, cfg: DetOptimConfig) -> Any:
    from timm.scheduler import MultiStepLRScheduler

    return MultiStepLRScheduler(
        optimizer,
        decay_t=[int(f * total_updates) for f in cfg.decay_at],
        decay_rate=0.1,
        warmup_t=cfg.warmup_iters,
        warmup_lr_init=cfg.lr * cfg.warmup_ratio,
        warmup_prefix=False,  # milestones count from the first update, warm-up included
        t_in_epochs=False,
    )


def train(cfg: DetectionConfig | None = None, *, resume: str | Path | None = None) -> dict[str, Any]:
    """Train and evaluate the detector of ``cfg`` (or continue the run folder ``resume`` with its saved config).

    Returns the last evaluation's metrics plus ``run_dir``; the run folder also gets ``summary.json``.
    One process, or one of several started by ``torchrun`` (DDP).
    """
    cfg, resume_dir = resolve_run(cfg, resume, load_detection_config)
    dist_info, device = init_distributed(cfg.train.device, key="train.device")
    try:
        return _train(cfg, dist_info, device, resume_dir)
    finally:
        cleanup()


def _train(cfg: DetectionConfig, dist_info: Any, device: torch.device, resume_dir: Path | None) -> dict[str, Any]:
    from timm.optim import create_optimizer_v2
    from torch.utils.data import DataLoader

    r, main, world = cfg.train, dist_info.is_main, dist_info.world_size
    set_threads(r.threads, device)
    amp_dtype = resolve_amp(r.amp, device, key="train.amp")
    if r.batch_size % world:
        raise DSNetError(f"train.batch_size={r.batch_size} must be divisible by the {world} processes")
    micro = r.batch_size // world
    if resume_dir is None and main:
        check_writable_folder(r.output_dir, f"train.output_dir={r.output_dir}")
    train_set, val_set = _datasets(cfg)
    n_train = len(train_set) if cfg.data.max_train_samples is None else min(cfg.data.max_train_samples, len(train_set))
    sampler = ShardedEpochSampler(n_train, r.batch_size, rank=dist_info.rank, world_size=world, seed=r.seed)
    total = cfg.sched.epochs * sampler.updates_per_epoch

    torch.manual_seed(r.seed)
    model = build_model(cfg.model, train_set.num_classes).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = create_optimizer_v2(model, "adamw", lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = _build_scheduler(optimizer, total, cfg.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, start_in_epoch, update, best = 0, 0, 0, -math.inf
    train_seconds = 0.0
    point = None
    if resume_dir is not None:
        point = ckpt.load_resume_point(resume_dir / "checkpoints", log=print if main else None)
        if point is None and main:
            print(f"{resume_dir} has no checkpoint yet (stopped before its first save): starting it from the beginning")
        run_dir = resume_dir
    else:
        default_name = f"{cfg.model.arch}-{cfg.model.backbone}-{cfg.model.neck}"
        run_dir = make_run_dir(r.output_dir, r.name or default_name, dist_info)
    if point is not None:
        model.load_state_dict(point.weights)
        state = ckpt.restore_training_state(point.state, optimizer, scheduler, scaler)
        start_epoch, start_in_epoch, update = state["epoch"], state["update_in_epoch"], state["update"]
        best, train_seconds = state["best"], state["train_seconds"]
    ckpt_dir = run_dir / "checkpoints"
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=main)
    if main:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        log.truncate_after(update)  # a resumed run rewrites what came after its last checkpoint
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"run folder: {run_dir}\n{cfg.model.arch} + {cfg.model.backbone} + {cfg.model.neck}: "
            f"{n_params / 1e6:.2f}M params, {train_set.num_classes - 1} classes, {n_train} train / {len(val_set)} val "
            f"images, {world} process(es) on {device} ({torch.get_num_threads()} thread(s) each), global batch "
            f"{r.batch_size}, {sampler.updates_per_epoch} updates/epoch, amp {amp_dtype or 'off'}",
            flush=True,
        )
    train_model: nn.Module = model
    if dist_info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    metadata = {"arch": cfg.model.arch, "backbone": cfg.model.backbone, "classes": train_set.categories}

    def save(tag: str, epoch: int, update_in_epoch: int, with_state: bool) -> None:
        if main:
            state = None
            if with_state:
                state = ckpt.capture_training_state(
                    optimizer,
                    scheduler,
                    scaler,
                    epoch=epoch,
                    update_in_epoch=update_in_epoch,
                    update=update,
                    best=best,
                    train_seconds=train_seconds,
                )
            ckpt.save_checkpoint(
                ckpt_dir, tag, model, training_state=state, metadata={**metadata, "epoch": epoch, "update": update}
            )
        barrier()

    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.sched.epochs):
        first = start_in_epoch if epoch == start_epoch else 0
        sampler.set_epoch(epoch, first)
        loader = DataLoader(
            train_set,
            batch_size=micro,
            sampler=sampler,
            collate_fn=collate,
            num_workers=cfg.data.workers,
            pin_memory=device.type == "cuda",
        )
        bar = Progress(
            (sampler.updates_per_epoch - first) * r.batch_size,
            f"epoch {epoch + 1}/{cfg.sched.epochs}",
            enabled=r.progress and main,
        )
        train_model.train()
        update_in_epoch, tic = first, time.perf_counter()
        for images, targets in loader:
            seed_update(r.seed, update, dist_info.rank)  # the detectors' box samplers
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            with autocast_context(device, amp_dtype):
                losses = train_model(images, targets)
            losses = {k: v.float() for k, v in losses.items()}
            loss = sum(losses.values())
            check_finite_loss(
                loss,
                epoch=epoch,
                update=update,
                lr=optimizer.param_groups[0]["lr"],
                advice="lower optim.lr, keep optim.clip_grad set, or use train.amp=none",
                world_size=world,
            )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.optim.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            update += 1
            update_in_epoch += 1
            scheduler.step_update(num_updates=update)
            bar.update(r.batch_size, loss=loss.item())
            if update % r.log_interval == 0:
                names = sorted(losses)
                values = all_reduce_sum(torch.stack([losses[k].detach().cpu().double() for k in names])) / world
                record = {k: round(float(v), 5) for k, v in zip(names, values)}
                log.write(
                    "step",
                    epoch=epoch + 1,
                    update=update,
                    lr=optimizer.param_groups[0]["lr"],
                    loss=round(float(values.sum()), 5),
                    **record,
                )
            if r.ckpt_interval and update % r.ckpt_interval == 0 and update_in_epoch < sampler.updates_per_epoch:
                train_seconds += time.perf_counter() - tic
                save("last", epoch, update_in_epoch, with_state=True)
                tic = time.perf_counter()
        train_seconds += time.perf_counter() - tic
        bar.close()
        if (epoch + 1) % r.eval_interval == 0 or epoch + 1 == cfg.sched.epochs:
            metrics = evaluate(
                model,
                val_set,
                batch_size=micro,
                limit=cfg.data.max_val_samples,
                device=device,
                amp_dtype=amp_dtype,
                progress=r.progress,
            )
            log.write("eval", epoch=epoch + 1, update=update, **metrics)
            if main and r.progress:
                print(
                    f"epoch {epoch + 1}: " + " ".join(f"{k}={format_metric(v)}" for k, v in metrics.items()), flush=True
                )
            if metrics["bbox_AP"] > best:
                best = metrics["bbox_AP"]
                save("best", epoch + 1, 0, with_state=False)
        save("last", epoch + 1, 0, with_state=True)
    summary = {
        **metrics,
        "best_bbox_AP": best if math.isfinite(best) else None,
        "epochs": cfg.sched.epochs,
        "updates": update,
        "global_batch": r.batch_size,
        "processes": world,
        "device": str(device),
        "amp": str(amp_dtype) if amp_dtype else "off",
        "train_seconds": train_seconds,
        "run_dir": str(run_dir),
    }
    if main:
        atomic_write_json(run_dir / "summary.json", summary)
    barrier()
    return summary


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
