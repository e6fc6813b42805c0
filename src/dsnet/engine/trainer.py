"""Image classification as a :class:`~dsnet.engine.fit.Task`: any timm model, trained by the one loop.

Built on timm's helpers: ``create_transform`` (RandAugment, random erasing), ``Mixup``, ``SoftTargetCrossEntropy``
/ ``LabelSmoothingCrossEntropy``, ``create_optimizer_v2`` (no weight decay on 1-D parameters), ``create_scheduler_v2``
(cosine with warm-up, stepped per optimizer update), ``ModelEmaV3`` and ``accuracy``. The loop itself (run folder,
resume, DDP, AMP, checkpoints, evaluation, summary) is :func:`dsnet.engine.fit.fit`.

Determinism: data order and augmentation are functions of ``(seed, epoch, index)`` (see :mod:`dsnet.data.datasets`),
and the generators used inside an update (mixup, stochastic depth) are re-seeded from ``(seed, update, rank)``, so an
interrupted run resumed from its ``last`` checkpoint ends with the same weights as an uninterrupted one.

Example:
    >>> from dsnet.engine.config import load_config
    >>> cfg = load_config("configs/fashion_mnist/dsnet_tiny.yaml", ["sched.epochs=1"])
    >>> run_dir = train(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from dsnet.data.build import PIPELINES, build_dataset, build_tensor_batches, build_transform, normalization
from dsnet.data.datasets import ShardedEpochSampler, TransformedDataset, collate_with_bad_files
from dsnet.data.webdataset import WebDatasetSource
from dsnet.engine import checkpoint as ckpt
from dsnet.engine.config import RunConfig, load_config
from dsnet.engine.evaluate import EvalResult, evaluate
from dsnet.engine.fit import FitContext, StepLoss, fit
from dsnet.engine.report import Progress, plot_confusion
from dsnet.errors import DSNetError

__all__ = ["ClassificationTask", "build_model", "check_model_name", "train"]


def check_model_name(name: str) -> None:
    """Raise DSNetError (with similar names) when timm does not know ``name``."""
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise DSNetError(f"unknown model {name!r}" + (f"; similar names: {', '.join(close)}" if close else ""))


def build_model(cfg: RunConfig, num_classes: int) -> nn.Module:
    """``timm.create_model`` from ``cfg.model``, optionally initialised from ``cfg.model.init_weights``.

    When initialising, classifier weights whose shape differs (another number of classes) are left at their
    fresh initialisation and reported; any other mismatch is an error.
    """
    import timm

    m = cfg.model
    check_model_name(m.name)
    model = timm.create_model(
        m.name,
        num_classes=num_classes,
        in_chans=m.in_chans,
        drop_path_rate=m.drop_path,
        drop_rate=m.drop_rate,
        **m.kwargs,
    )
    if m.init_weights:
        state, _ = ckpt.load_weights(ckpt.resolve_checkpoint(m.init_weights))
        own = model.state_dict()
        skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        head = {k for k in skipped if own[k].shape[:1] == (num_classes,) or k.endswith(".bias")}
        if set(skipped) - head:
            bad = sorted(set(skipped) - head)[0]
            raise DSNetError(
                f"{m.init_weights}: shape of {bad} is {tuple(state[bad].shape)}, the model has {tuple(own[bad].shape)}"
            )
        missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
        if unexpected or set(missing) - head:
            raise DSNetError(f"{m.init_weights}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        if head:
            print(f"init_weights: classifier {sorted(head)} re-initialised for {num_classes} classes", file=sys.stderr)
    return model


def _make_loader(dataset: TransformedDataset, sampler: ShardedEpochSampler, batch: int, workers: int, device) -> Any:
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=min(workers, os.cpu_count() or 1),
        collate_fn=collate_with_bad_files,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        drop_last=False,
    )


class ClassificationTask:
    """Image classification for :func:`dsnet.engine.fit.fit`: any timm model, timm's augmentation, mixup and losses.

    "best" is the highest validation top-1 (of the model or of its EMA weights).
    """

    score_key = "top1"
    nonfinite_advice = "lower optim.lr, set optim.clip_grad, or use train.amp=none"

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.title = cfg.model.name
        self.default_name = f"{cfg.model.name}-{cfg.data.dataset}"
        self.classes: list[str] = []
        self.num_train = self.num_val = 0

    def setup(self, ctx: FitContext) -> None:
        d, in_chans, seed = self.cfg.data, self.cfg.model.in_chans, self.cfg.train.seed
        if (d.mixup > 0 or d.cutmix > 0) and ctx.micro % 2:
            raise DSNetError(
                f"mixup/cutmix need an even per-process micro-batch, got {ctx.micro}; change train.batch_size"
            )
        check_model_name(self.cfg.model.name)  # fail before reading the data
        if d.pipeline not in PIPELINES:
            raise DSNetError(f"unknown data.pipeline {d.pipeline!r}; expected one of {', '.join(PIPELINES)}")
        self.ctx = ctx
        if d.dataset == "wds":
            self._setup_webdataset(ctx)
            return
        self.train_set = build_dataset(d, "train", in_chans)
        self.val_set = build_dataset(d, "val", in_chans, classes=self.train_set.classes)
        self.classes = list(self.train_set.classes)
        self.num_classes = self.cfg.model.num_classes or len(self.classes)
        if self.num_classes != len(self.classes):
            raise DSNetError(
                f"model.num_classes={self.num_classes} but the training set has {len(self.classes)} classes"
            )
        self.train_data = TransformedDataset(self.train_set, build_transform(d, in_chans, True), seed)
        val_data = TransformedDataset(self.val_set, build_transform(d, in_chans, False), seed, replace_bad=False)
        self.num_train, self.num_val = len(self.train_data), len(val_data)
        world, val_batch = ctx.dist.world_size, max(ctx.micro, 64)
        self.val_sampler = ShardedEpochSampler(
            len(val_data), val_batch * world, rank=ctx.dist.rank, world_size=world, shuffle=False
        )
        self.val_loader = _make_loader(val_data, self.val_sampler, val_batch, d.workers, ctx.device)
        self.mixup, self.criterion = _mixup_and_loss(d, self.num_classes)

    def _setup_webdataset(self, ctx: FitContext) -> None:
        """``data.dataset=wds``: shards in ``data.root``, splits ``data.train_split`` / ``data.val_split``."""
        d, m = self.cfg.data, self.cfg.model
        if d.root is None:
            raise DSNetError("data.dataset=wds needs data.root, the folder of the WebDataset shards")
        if d.pipeline != "pil":
            raise DSNetError("data.pipeline=tensor holds Fashion-MNIST in memory; WebDataset shards use pipeline=pil")
        if m.num_classes is None:
            raise DSNetError("data.dataset=wds: set model.num_classes (shards hold class indices, not class names)")
        common = dict(
            mode="L" if m.in_chans == 1 else "RGB", seed=self.cfg.train.seed, world_size=ctx.dist.world_size,
            workers=d.workers,
        )  # fmt: skip
        self.wds_train = WebDatasetSource(
            d.root, d.train_split, is_training=True, micro_batch=ctx.micro, num_samples=d.max_train_samples, **common
        )
        self.val_batch = max(ctx.micro, 64)
        self.wds_val = WebDatasetSource(
            d.root, d.val_split, is_training=False, micro_batch=self.val_batch, num_samples=d.max_val_samples, **common
        )
        self.num_classes = m.num_classes
        self.classes = [str(i) for i in range(m.num_classes)]
        self.num_train, self.num_val = self.wds_train.num_samples, self.wds_val.num_samples
        self.train_transform = build_transform(d, m.in_chans, True)
        self.val_transform = build_transform(d, m.in_chans, False)
        self.mixup, self.criterion = _mixup_and_loss(d, self.num_classes)

    def _stream_loader(self, epoch: Any, batch: int) -> DataLoader:
        return DataLoader(
            epoch,
            batch_size=batch,
            num_workers=min(self.cfg.data.workers, os.cpu_count() or 1),
            collate_fn=collate_with_bad_files,
            pin_memory=self.ctx.device.type == "cuda",
        )

    def build_model(self) -> nn.Module:
        return build_model(self.cfg, self.num_classes)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        import timm.optim

        o = self.cfg.optim
        extra: dict[str, Any] = {}
        if o.betas is not None:
            extra["betas"] = tuple(o.betas)
        if o.eps is not None:
            extra["eps"] = o.eps
        lr = o.lr * (self.cfg.train.batch_size / o.lr_base_batch if o.lr_base_batch else 1.0)
        return timm.optim.create_optimizer_v2(
            model, opt=o.opt, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum, filter_bias_and_bn=True, **extra
        )

    def build_scheduler(self, optimizer: torch.optim.Optimizer, total_updates: int, updates_per_epoch: int) -> Any:
        import timm.scheduler

        s = self.cfg.sched
        # lengths in optimizer updates (updates_per_epoch=1), so a schedule can end mid-epoch (sched.updates)
        return timm.scheduler.create_scheduler_v2(
            optimizer,
            sched=s.sched,
            num_epochs=total_updates,
            warmup_epochs=s.warmup_epochs * updates_per_epoch,
            decay_epochs=90 * updates_per_epoch,  # timm's default step length of step schedules, in updates
            warmup_lr=s.warmup_lr,
            min_lr=s.min_lr,
            step_on_epochs=False,
            updates_per_epoch=1,
        )[0]

    def train_batches(self, sampler: ShardedEpochSampler) -> Iterable[Any]:
        d, in_chans, micro = self.cfg.data, self.cfg.model.in_chans, self.ctx.micro
        if d.dataset == "wds":  # the updates already done in this epoch are read and dropped (exact resume)
            skip = sampler.start_update * self.cfg.train.accum_steps
            epoch = self.wds_train.epoch(sampler.epoch, self.train_transform, self.cfg.train.seed, sampler.rank, skip)
            return self._stream_loader(epoch, micro)
        if d.pipeline == "tensor":
            return build_tensor_batches(d, self.train_set, sampler, micro, in_chans, self.cfg.train.seed)
        return _make_loader(self.train_data, sampler, micro, d.workers, self.ctx.device)

    def forward_loss(self, model: nn.Module, batch: Any) -> StepLoss:
        images, targets, bad = batch
        images = images.to(self.ctx.device, non_blocking=True)
        targets = targets.to(self.ctx.device, non_blocking=True)
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        loss = self.criterion(model(images).float(), targets)
        return StepLoss(loss, len(images), bad_files=bad)

    def evaluate(self, model: nn.Module, desc: str) -> EvalResult:
        if self.cfg.data.dataset == "wds":
            rank, world = self.ctx.dist.rank, self.ctx.dist.world_size
            loader = self._stream_loader(self.wds_val.epoch(0, self.val_transform, 0, rank), self.val_batch)
            total = math.ceil(self.num_val / world)
        else:
            self.val_sampler.set_epoch(0)
            loader, total = self.val_loader, len(self.val_sampler)
        bar = Progress(total, desc, enabled=self.ctx.progress and self.ctx.dist.is_main)
        result = evaluate(
            model,
            loader,
            self.num_classes,
            device=self.ctx.device,
            amp_dtype=self.ctx.amp_dtype,
            channels_last=self.cfg.train.channels_last,
            classes=tuple(self.classes),
            progress=bar,
        )
        bar.close()
        return result

    def record(self, result: EvalResult) -> dict[str, Any]:
        return {"top1": result.top1, "top5": result.top5, "val_loss": result.loss}

    def describe(self, record: dict[str, Any]) -> str:
        return f"val top-1 {record['top1']:.2f}% top-5 {record['top5']:.2f}%"

    def checkpoint_metadata(self) -> dict[str, Any]:
        d, in_chans = self.cfg.data, self.cfg.model.in_chans
        mean, std = normalization(d, in_chans)
        return {
            "model": self.cfg.model.name,
            "num_classes": self.num_classes,
            "in_chans": in_chans,
            "input_size": d.input_size,
            "crop_pct": d.crop_pct,
            "interpolation": d.interpolation,
            "mean": list(mean),
            "std": list(std),
            "model_kwargs": self.cfg.model.kwargs,
        }

    def summary(self, final: EvalResult, final_ema: EvalResult | None) -> dict[str, Any]:
        return {
            "model": self.cfg.model.name,
            "dataset": self.cfg.data.dataset,
            "final": final.to_dict(),
            "final_ema": final_ema.to_dict() if final_ema is not None else None,
        }

    def draw(self, run_dir: Path, records: list[dict[str, Any]], final: EvalResult) -> None:
        title = f"{self.cfg.model.name}: top-1 {final.top1:.2f}% on {final.num_samples} images"
        plot_confusion(final.confusion, self.classes, run_dir / "confusion.png", title)


def _mixup_and_loss(d: Any, num_classes: int) -> tuple[Any, nn.Module]:
    """timm's ``Mixup`` (or None) and the matching criterion: soft-target CE when mixing, else (smoothed) CE."""
    import timm.data
    import timm.loss

    if d.mixup > 0 or d.cutmix > 0:
        mixup = timm.data.Mixup(
            mixup_alpha=d.mixup,
            cutmix_alpha=d.cutmix,
            prob=d.mixup_prob,
            switch_prob=d.mixup_switch_prob,
            label_smoothing=d.label_smoothing,
            num_classes=num_classes,
        )
        return mixup, timm.loss.SoftTargetCrossEntropy()
    if d.label_smoothing > 0:
        return None, timm.loss.LabelSmoothingCrossEntropy(smoothing=d.label_smoothing)
    return None, nn.CrossEntropyLoss()


def train(
    cfg: RunConfig | None = None, *, resume: str | Path | None = None, log: Callable[[str], None] | None = None
) -> Path:
    """Train as ``cfg`` says (or continue the run folder ``resume``); returns the run folder.

    The run folder holds ``config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/``, ``curves.png``,
    ``confusion.png`` and ``summary.json``; see :func:`dsnet.engine.fit.fit`.
    """
    cfg, resume_dir = ckpt.resolve_run(cfg, resume, load_config)
    return fit(ClassificationTask(cfg), resume_dir=resume_dir, log=log)
