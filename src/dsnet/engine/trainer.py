"""The training loop: any timm model, one process or torchrun DDP, exact resume from mid-epoch checkpoints.

Built on timm's helpers: ``create_transform`` (RandAugment, random erasing), ``Mixup``, ``SoftTargetCrossEntropy``
/ ``LabelSmoothingCrossEntropy``, ``create_optimizer_v2`` (no weight decay on 1-D parameters), ``create_scheduler_v2``
(cosine with warm-up, stepped per optimizer update), ``ModelEmaV3`` and ``accuracy``.

Determinism: data order and augmentation are functions of ``(seed, epoch, index)`` (see :mod:`dsnet.data.datasets`),
and the generators used inside an update (mixup, stochastic depth) are re-seeded from ``(seed, update, rank)``, so an
interrupted run resumed from its ``last`` checkpoint ends with the same weights as an uninterrupted one.

Example:
    >>> from dsnet.engine.config import load_config
    >>> cfg = load_config("configs/fashion_mnist/dsnet_tiny.yaml", ["sched.epochs=1"])
    >>> run_dir = train(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from dsnet._io import atomic_write_json, atomic_write_text, check_writable_folder
from dsnet.data.build import PIPELINES, build_dataset, build_tensor_batches, build_transform, normalization
from dsnet.data.datasets import ShardedEpochSampler, TransformedDataset, collate_with_bad_files
from dsnet.engine import checkpoint as ckpt
from dsnet.engine.budget import TimeBudget
from dsnet.engine.config import RunConfig, load_config
from dsnet.engine.distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, cleanup, init_distributed
from dsnet.engine.evaluate import EvalResult, evaluate
from dsnet.engine.report import MetricsLog, Progress, plot_confusion, plot_curves
from dsnet.engine.runtime import autocast_context, check_finite_loss, resolve_amp, seed_update, set_threads
from dsnet.errors import DSNetError

__all__ = [
    "build_model",
    "check_model_name",
    "make_run_dir",
    "train",
]

#: Test hook: ``"<update>:<seconds>"`` sleeps after the mid-epoch checkpoint of that optimizer update, so that a
#: test can kill the run at a known point.
_PAUSE_ENV = "DSNET_TEST_PAUSE_AFTER_CHECKPOINT"


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


class _BadFiles:
    """Warns once per unreadable file and counts them; enforces ``train.max_bad_files``."""

    def __init__(self, limit: int | None) -> None:
        self.seen: list[str] = []
        self.limit = limit

    def add(self, messages: list[str]) -> None:
        for message in messages:
            if message not in self.seen:
                self.seen.append(message)
                warnings.warn(f"skipped unreadable image: {message}", stacklevel=2)
        if self.limit is not None and len(self.seen) > self.limit:
            raise DSNetError(
                f"{len(self.seen)} unreadable images (train.max_bad_files={self.limit}); last: {self.seen[-1]}"
            )


def make_run_dir(parent: str | Path, name: str, dist_info: DistInfo) -> Path:
    """Create ``parent/<name>-<UTC timestamp>`` on rank 0 (suffixed if it exists) and share its path with all ranks."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = Path(parent) / f"{name}-{stamp}"
    if dist_info.is_main:
        base, suffix = run_dir, 1
        while run_dir.exists():  # two runs started in the same second
            run_dir = base.with_name(f"{base.name}-{suffix}")
            suffix += 1
        run_dir.mkdir(parents=True)
    return Path(broadcast_object(str(run_dir)))


def train(
    cfg: RunConfig | None = None, *, resume: str | Path | None = None, log: Callable[[str], None] | None = None
) -> Path:
    """Train as ``cfg`` says (or continue the run folder ``resume``); returns the run folder.

    The run folder holds ``config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/``, ``curves.png``,
    ``confusion.png`` and ``summary.json``.
    """
    cfg, resume_dir = ckpt.resolve_run(cfg, resume, load_config)
    t = cfg.train
    dist_info, device = init_distributed(t.device)
    try:
        return _train(cfg, dist_info, device, resume_dir, log or (lambda s: print(s, flush=True)))
    finally:
        cleanup()


def _train(cfg: RunConfig, dist_info: DistInfo, device: torch.device, resume_dir: Path | None, log) -> Path:
    t, d = cfg.train, cfg.data
    main = dist_info.is_main
    set_threads(t.threads, device)
    amp_dtype = resolve_amp(t.amp, device)
    world = dist_info.world_size
    if t.batch_size % (world * t.accum_steps):
        raise DSNetError(
            f"train.batch_size={t.batch_size} must be divisible by processes × accum_steps = {world} × {t.accum_steps}"
        )
    micro = t.batch_size // (world * t.accum_steps)
    mixing = d.mixup > 0 or d.cutmix > 0
    if mixing and micro % 2:
        raise DSNetError(f"mixup/cutmix need an even per-process micro-batch, got {micro}; change train.batch_size")

    check_model_name(cfg.model.name)  # fail before reading the data
    if resume_dir is None and main:
        check_writable_folder(t.output_dir, f"train.output_dir={t.output_dir}")
    if d.pipeline not in PIPELINES:
        raise DSNetError(f"unknown data.pipeline {d.pipeline!r}; expected one of {', '.join(PIPELINES)}")
    # data
    train_set = build_dataset(d, "train", cfg.model.in_chans)
    val_set = build_dataset(d, "val", cfg.model.in_chans, classes=train_set.classes)
    num_classes = cfg.model.num_classes or len(train_set.classes)
    if num_classes != len(train_set.classes):
        raise DSNetError(f"model.num_classes={num_classes} but the training set has {len(train_set.classes)} classes")
    train_data = TransformedDataset(train_set, build_transform(d, cfg.model.in_chans, True), t.seed)
    val_data = TransformedDataset(val_set, build_transform(d, cfg.model.in_chans, False), t.seed, replace_bad=False)
    sampler = ShardedEpochSampler(len(train_data), t.batch_size, rank=dist_info.rank, world_size=world, seed=t.seed)
    updates_per_epoch = sampler.updates_per_epoch
    total_updates = cfg.sched.updates or cfg.sched.epochs * updates_per_epoch
    budget = TimeBudget(cfg.sched.minutes * 60) if cfg.sched.minutes else None
    if budget is not None:  # sched.epochs is provisional: it must outlast the first estimate
        total_updates = max(total_updates, budget.first_estimate + 1)
    num_epochs = math.ceil(total_updates / updates_per_epoch)
    val_batch = max(micro, 64)
    val_sampler = ShardedEpochSampler(
        len(val_data), val_batch * world, rank=dist_info.rank, world_size=world, shuffle=False
    )
    val_loader = _make_loader(val_data, val_sampler, val_batch, d.workers, device)

    # model, EMA, optimizer, schedule, loss
    import timm.data
    import timm.loss
    import timm.optim
    import timm.scheduler
    import timm.utils

    torch.manual_seed(t.seed)
    model = build_model(cfg, num_classes).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = timm.utils.ModelEmaV3(model, decay=t.ema, device=device) if t.ema > 0 else None
    lr = cfg.optim.lr * (t.batch_size / cfg.optim.lr_base_batch if cfg.optim.lr_base_batch else 1.0)
    opt_kwargs: dict[str, Any] = {}
    if cfg.optim.betas is not None:
        opt_kwargs["betas"] = tuple(cfg.optim.betas)
    if cfg.optim.eps is not None:
        opt_kwargs["eps"] = cfg.optim.eps
    optimizer = timm.optim.create_optimizer_v2(
        model,
        opt=cfg.optim.opt,
        lr=lr,
        weight_decay=cfg.optim.weight_decay,
        momentum=cfg.optim.momentum,
        filter_bias_and_bn=True,
        **opt_kwargs,
    )
    s = cfg.sched

    def make_scheduler(length: int) -> Any:
        # lengths in optimizer updates (updates_per_epoch=1), so a schedule can end mid-epoch (sched.updates)
        return timm.scheduler.create_scheduler_v2(
            optimizer,
            sched=s.sched,
            num_epochs=length,
            warmup_epochs=s.warmup_epochs * updates_per_epoch,
            decay_epochs=90 * updates_per_epoch,  # timm's default step length of step schedules, in updates
            warmup_lr=s.warmup_lr,
            min_lr=s.min_lr,
            step_on_epochs=False,
            updates_per_epoch=1,
        )[0]

    scheduler = make_scheduler(total_updates)
    mixup = (
        timm.data.Mixup(
            mixup_alpha=d.mixup,
            cutmix_alpha=d.cutmix,
            prob=d.mixup_prob,
            switch_prob=d.mixup_switch_prob,
            label_smoothing=d.label_smoothing,
            num_classes=num_classes,
        )
        if mixing
        else None
    )
    if mixing:
        criterion: nn.Module = timm.loss.SoftTargetCrossEntropy()
    elif d.label_smoothing > 0:
        criterion = timm.loss.LabelSmoothingCrossEntropy(smoothing=d.label_smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # run folder, resume
    start_epoch, start_update_in_epoch, update, best = 0, 0, 0, -1.0
    bad_files = _BadFiles(t.max_bad_files)
    elapsed_train, samples_seen = 0.0, 0
    point = None
    if resume_dir is not None:
        run_dir = resume_dir
        point = ckpt.load_resume_point(run_dir / "checkpoints", "last", log=log if main else None)
        if point is None and main:
            log(f"{run_dir} has no checkpoint yet (stopped before its first save): starting it from the beginning")
    else:
        run_dir = make_run_dir(t.output_dir, t.name or f"{cfg.model.name}-{d.dataset}", dist_info)
    if point is not None:
        saved = tuple(point.metadata.get("classes") or ())
        if saved and saved != tuple(train_set.classes):
            raise DSNetError(
                f"cannot resume {run_dir}: it was trained on {len(saved)} classes {list(saved)[:5]} but the "
                f"{d.dataset} training set in {d.root} now has {len(train_set.classes)} "
                f"{list(train_set.classes)[:5]}; restore the class folders or start a new run"
            )
        model.load_state_dict(point.weights)
        state = ckpt.restore_training_state(point.state, optimizer, scheduler, scaler)
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        start_epoch, start_update_in_epoch, update = state["epoch"], state["update_in_epoch"], state["update"]
        if budget is not None:  # the length last estimated (the restored scheduler has it too)
            total_updates = state.get("total_updates", total_updates)
            num_epochs = math.ceil(total_updates / updates_per_epoch)
        best, elapsed_train, samples_seen = state["best"], state["elapsed_train"], state["samples_seen"]
        bad_files.seen = list(state["bad_files"])
        if main:
            log(f"resuming {run_dir} at epoch {start_epoch}, update {update} (from {point.weights_path.name})")
    ckpt_dir = run_dir / "checkpoints"
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=main)
    if main:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if resume_dir is not None:
            metrics.truncate_after(update)
        else:
            log(f"run folder: {run_dir}")
        n_params = sum(p.numel() for p in model.parameters())
        log(
            f"{cfg.model.name}: {n_params / 1e6:.2f}M params, {num_classes} classes, {len(train_set)} train / "
            f"{len(val_set)} val images, {world} process(es) on {device} ({torch.get_num_threads()} thread(s) each), "
            f"global batch {t.batch_size} "
            f"(micro {micro} × accum {t.accum_steps}), lr {lr:.3g}, amp {amp_dtype or 'off'}, "
            f"{updates_per_epoch} updates/epoch"
        )

    train_model: nn.Module = model
    if t.compile:
        train_model = torch.compile(model)
    if dist_info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    def training_state(epoch: int, update_in_epoch: int) -> dict[str, Any]:
        return ckpt.capture_training_state(
            optimizer,
            scheduler,
            scaler,
            epoch=epoch,
            update_in_epoch=update_in_epoch,
            update=update,
            best=best,
            elapsed_train=elapsed_train,
            samples_seen=samples_seen,
            bad_files=list(bad_files.seen),
            total_updates=total_updates,
        )

    meta = {
        "model": cfg.model.name,
        "num_classes": num_classes,
        "in_chans": cfg.model.in_chans,
        "classes": list(train_set.classes),
        "input_size": d.input_size,
        "crop_pct": d.crop_pct,
        "interpolation": d.interpolation,
        "mean": list(normalization(d, cfg.model.in_chans)[0]),
        "std": list(normalization(d, cfg.model.in_chans)[1]),
        "model_kwargs": cfg.model.kwargs,
    }

    def save(tag: str, epoch: int, update_in_epoch: int, with_state: bool) -> None:
        if main:
            ckpt.save_checkpoint(
                ckpt_dir,
                tag,
                model,
                ema=ema.module if ema is not None else None,
                training_state=training_state(epoch, update_in_epoch) if with_state else None,
                metadata={**meta, "epoch": epoch, "update": update},
            )
        barrier()

    def run_eval(which: nn.Module, desc: str) -> EvalResult:
        val_sampler.set_epoch(0)
        bar = Progress(len(val_sampler), desc, enabled=main)
        result = evaluate(
            which,
            val_loader,
            num_classes,
            device=device,
            amp_dtype=amp_dtype,
            channels_last=t.channels_last,
            classes=train_set.classes,
            progress=bar,
        )
        bar.close()
        return result

    loss_sum = torch.zeros(2, dtype=torch.float64)  # loss × samples, samples since the last step record
    last_result: EvalResult | None = None
    last_ema_result: EvalResult | None = None
    first_update = update
    epoch = start_epoch - 1
    while (epoch := epoch + 1) < num_epochs:  # num_epochs may change under a time budget (sched.minutes)
        first = start_update_in_epoch if epoch == start_epoch else 0
        sampler.set_epoch(epoch, first)
        if d.pipeline == "tensor":
            loader = build_tensor_batches(d, train_set, sampler, micro, cfg.model.in_chans, t.seed)
        else:
            loader = _make_loader(train_data, sampler, micro, d.workers, device)
        epoch_updates = min(updates_per_epoch, total_updates - epoch * updates_per_epoch)
        bar = Progress((epoch_updates - first) * t.batch_size, f"epoch {epoch + 1}/{num_epochs}", enabled=main)
        train_model.train()
        tic = time.perf_counter()
        micro_index = 0
        update_in_epoch = first
        for images, targets, bad in loader:
            bad_files.add(bad)
            if micro_index == 0:
                seed_update(t.seed, update, dist_info.rank)
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if t.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if mixup is not None:
                images, targets = mixup(images, targets)
            last_micro = micro_index == t.accum_steps - 1
            sync = contextlib.nullcontext() if last_micro or not dist_info.distributed else train_model.no_sync()
            with sync:
                with autocast_context(device, amp_dtype):
                    output = train_model(images)
                    loss = criterion(output.float(), targets)
                check_finite_loss(
                    loss,
                    epoch=epoch,
                    update=update,
                    lr=optimizer.param_groups[0]["lr"],
                    advice="lower optim.lr, set optim.clip_grad, or use train.amp=none",
                    world_size=world,
                )
                scaler.scale(loss / t.accum_steps).backward()
            loss_sum += torch.tensor([loss.item() * len(images), len(images)], dtype=torch.float64)
            micro_index += 1
            if not last_micro:
                continue
            micro_index = 0
            if cfg.optim.clip_grad is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            update += 1
            update_in_epoch += 1
            if budget is not None:
                estimate = budget.estimate(update, elapsed_train + time.perf_counter() - tic, first_update)
                if estimate is not None:
                    if dist_info.distributed:  # every rank must stop at the same update
                        estimate = int(all_reduce_sum(torch.tensor([float(estimate)], dtype=torch.float64))[0] / world)
                    total_updates = max(estimate, update)
                    num_epochs = math.ceil(total_updates / updates_per_epoch)
                    epoch_updates = min(updates_per_epoch, total_updates - epoch * updates_per_epoch)
                    scheduler = make_scheduler(total_updates)  # same warm-up, new cosine length
            scheduler.step_update(num_updates=update)
            if ema is not None:
                ema.update(model, step=update)
            samples_seen += t.batch_size
            bar.update(t.batch_size, loss=loss.item())
            if update % t.log_interval == 0 or update_in_epoch == epoch_updates:
                reduced = all_reduce_sum(loss_sum.clone())
                now = time.perf_counter()
                metrics.write(
                    "step",
                    epoch=epoch + 1,
                    update=update,
                    loss=float(reduced[0] / max(reduced[1], 1)),
                    lr=optimizer.param_groups[0]["lr"],
                    img_per_s=samples_seen / max(elapsed_train + now - tic, 1e-9),
                )
                loss_sum.zero_()
            if t.ckpt_interval and update % t.ckpt_interval == 0 and update_in_epoch < epoch_updates:
                elapsed_train += time.perf_counter() - tic
                save("last", epoch, update_in_epoch, with_state=True)
                tic = time.perf_counter()
                if os.environ.get(_PAUSE_ENV):
                    at, seconds = os.environ[_PAUSE_ENV].split(":")
                    if int(at) == update:
                        time.sleep(float(seconds))
            if update_in_epoch == epoch_updates:  # the schedule ends inside this epoch (sched.updates)
                break
        elapsed_train += time.perf_counter() - tic
        bar.close()
        epoch_record: dict[str, Any] = {"epoch": epoch + 1, "update": update, "lr": optimizer.param_groups[0]["lr"]}
        if (epoch + 1) % t.eval_interval == 0 or epoch + 1 == num_epochs:
            last_result = run_eval(model, "eval")
            epoch_record.update(top1=last_result.top1, top5=last_result.top5, val_loss=last_result.loss)
            score = last_result.top1
            if ema is not None and t.eval_ema:
                last_ema_result = run_eval(ema.module, "eval (EMA)")
                epoch_record.update(top1_ema=last_ema_result.top1, top5_ema=last_ema_result.top5)
                score = max(score, last_ema_result.top1)
            if score > best:
                best = score
                save("best", epoch + 1, 0, with_state=False)
            if main:
                ema_text = f", EMA top-1 {last_ema_result.top1:.2f}%" if last_ema_result and t.eval_ema else ""
                log(
                    f"epoch {epoch + 1}/{num_epochs}: val top-1 {last_result.top1:.2f}% top-5 {last_result.top5:.2f}%"
                    f"{ema_text} ({samples_seen / max(elapsed_train, 1e-9):.1f} train img/s)"
                )
        epoch_record["img_per_s"] = samples_seen / max(elapsed_train, 1e-9)
        metrics.write("epoch", **epoch_record)
        save("last", epoch + 1, 0, with_state=True)

    # final report
    total_bad = torch.tensor([len(bad_files.seen)], dtype=torch.float64)
    all_reduce_sum(total_bad)
    if main:
        if last_result is None:  # resumed after the last epoch had finished
            last_result = run_eval(model, "eval")
        plot_curves(metrics.read(), run_dir / "curves.png")
        plot_confusion(
            last_result.confusion,
            train_set.classes,
            run_dir / "confusion.png",
            f"{cfg.model.name}: top-1 {last_result.top1:.2f}% on {last_result.num_samples} images",
        )
        summary = {
            "model": cfg.model.name,
            "dataset": d.dataset,
            "epochs": total_updates / updates_per_epoch,
            "updates": update,
            "global_batch": t.batch_size,
            "processes": world,
            "device": str(device),
            "amp": str(amp_dtype) if amp_dtype else "off",
            "params": sum(p.numel() for p in model.parameters()),
            "train_seconds": elapsed_train,
            "train_img_per_s": samples_seen / max(elapsed_train, 1e-9),
            "best_top1": best,
            "final": last_result.to_dict(),
            "final_ema": last_ema_result.to_dict() if last_ema_result is not None else None,
            "bad_files": int(total_bad.item()),
            "bad_file_messages": bad_files.seen[:100],
            "run_dir": str(run_dir),
        }
        atomic_write_json(run_dir / "summary.json", summary)
        log(
            f"done: top-1 {last_result.top1:.2f}% (best {best:.2f}%), "
            f"{int(total_bad.item())} unreadable image(s) skipped"
        )
    barrier()
    return run_dir
