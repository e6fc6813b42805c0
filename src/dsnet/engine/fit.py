"""The one training loop: :func:`fit` runs any :class:`Task` (classification, detection...) the same way.

:func:`fit` owns what every task shares: the run folder, exact resume from ``checkpoints/last`` (weights,
optimizer, schedule, RNG, data position), torchrun DDP (with ``train.sync_bn``), autocast (``train.amp``), the stop on
a non-finite loss, gradient accumulation and clipping, a time budget (``sched.minutes``), the checkpoint cadence,
evaluation (also of the EMA weights) and the choice of ``best``, ``metrics.jsonl`` and ``summary.json``. A task only
says what is its own: the model, the data, the loss of a batch, its evaluation and the score that picks ``best``.

The config of a task has the sections ``train`` (:class:`~dsnet.engine.config.TrainConfig`, the same keys for every
task), ``sched`` (``epochs``, ``updates``, ``minutes``) and ``optim`` (``clip_grad``); the rest is the task's.

A new task (semantic segmentation, say) is one class implementing :class:`Task` plus its config dataclasses; the
loop does not change.

Determinism: data order is a function of ``(seed, epoch)`` (:class:`~dsnet.data.datasets.ShardedEpochSampler`)
and the generators used inside an update are re-seeded from ``(seed, update, rank)``, so a run resumed from its
``last`` checkpoint ends with the same weights as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from torch import nn

from dsnet._io import atomic_write_json, atomic_write_text, check_writable_folder
from dsnet.data.datasets import ShardedEpochSampler
from dsnet.engine import checkpoint as ckpt
from dsnet.engine.budget import TimeBudget
from dsnet.engine.distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, cleanup, init_distributed
from dsnet.engine.report import MetricsLog, Progress, plot_curves
from dsnet.engine.runtime import autocast_context, check_finite_loss, resolve_amp, seed_update, set_threads
from dsnet.errors import DSNetError

__all__ = ["FitContext", "StepLoss", "Task", "fit", "make_run_dir", "micro_batch"]

#: Test hook: ``"<update>:<seconds>"`` sleeps after the mid-epoch checkpoint of that optimizer update, so that a
#: test can kill the run at a known point.
_PAUSE_ENV = "DSNET_TEST_PAUSE_AFTER_CHECKPOINT"


@dataclass
class FitContext:
    """What the loop decided before building the task's parts; :meth:`Task.setup` receives it."""

    device: torch.device
    amp_dtype: torch.dtype | None
    dist: DistInfo
    micro: int  # samples per process and forward pass
    progress: bool  # draw progress bars (rank 0 only)


@dataclass
class StepLoss:
    """The loss of one micro-batch, as :meth:`Task.forward_loss` returns it."""

    loss: torch.Tensor  # scalar, float32
    samples: int  # samples in the micro-batch
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # named terms, logged (detection's loss heads)
    bad_files: list[str] = field(default_factory=list)  # unreadable samples that were skipped


class Task(Protocol):
    """What a task gives :func:`fit`. ``cfg`` has the sections ``train``, ``sched`` and ``optim``."""

    cfg: Any
    title: str  # the model, as the first log line names it
    default_name: str  # run name when ``train.name`` is not set
    score_key: str  # the key of :meth:`record` that picks "best" (higher is better)
    nonfinite_advice: str  # what to change when the loss becomes NaN or infinite
    classes: list[str]  # class names, saved in every checkpoint and checked on resume
    num_train: int  # training samples (the sampler draws from 0 .. num_train - 1)
    num_val: int  # evaluation samples

    def setup(self, ctx: FitContext) -> None:
        """Check the config against the data and build the datasets; raise DSNetError naming any problem."""

    def build_model(self) -> nn.Module:
        """The network (on the CPU; the loop moves it), initialised from the current torch seed."""

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer of ``model``'s parameters."""

    def build_scheduler(self, optimizer: torch.optim.Optimizer, total_updates: int, updates_per_epoch: int) -> Any:
        """A timm scheduler stepped per optimizer update (``step_update``), ``total_updates`` long."""

    def train_batches(self, sampler: ShardedEpochSampler) -> Iterable[Any]:
        """The micro-batches of one epoch, in the sampler's order (its epoch and start are already set)."""

    def forward_loss(self, model: nn.Module, batch: Any) -> StepLoss:
        """The loss of one micro-batch (called under autocast, in training mode)."""

    def evaluate(self, model: nn.Module, desc: str) -> Any:
        """Evaluate ``model`` on the validation set; every process calls it and gets the result of the whole set."""

    def record(self, result: Any) -> dict[str, Any]:
        """The numbers of an evaluation result that go into ``metrics.jsonl`` (``None`` for undefined ones)."""

    def describe(self, record: dict[str, Any]) -> str:
        """One line about an evaluation record, for the log."""

    def checkpoint_metadata(self) -> dict[str, Any]:
        """What a checkpoint must say to rebuild the model for inference (besides ``classes``)."""

    def summary(self, final: Any, final_ema: Any | None) -> dict[str, Any]:
        """The task's own entries of ``summary.json`` from the last evaluation results."""

    def draw(self, run_dir: Path, records: list[dict[str, Any]], final: Any) -> None:
        """Figures of the finished run (rank 0)."""


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


def micro_batch(train_cfg: Any, world_size: int) -> int:
    """Samples per process and forward pass: ``train.batch_size / (processes × train.accum_steps)``, exactly."""
    divisor = world_size * train_cfg.accum_steps
    if train_cfg.batch_size % divisor:
        raise DSNetError(
            f"train.batch_size={train_cfg.batch_size} must be divisible by processes × accum_steps = "
            f"{world_size} × {train_cfg.accum_steps}"
        )
    return train_cfg.batch_size // divisor


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


@dataclass
class _Run:
    """Everything one training run holds; the loop's functions read and advance it."""

    task: Task
    ctx: FitContext
    log: Callable[[str], None]
    model: nn.Module
    train_model: nn.Module
    ema: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    sampler: ShardedEpochSampler
    total_updates: int
    budget: TimeBudget | None
    run_dir: Path = Path()
    metrics: MetricsLog | None = None
    epoch: int = 0  # the epoch in progress (0-based)
    update_in_epoch: int = 0  # updates done in it
    update: int = 0  # updates done in all
    first_update: int = 0  # the update this process started at (a resumed run starts past 0)
    best: float = -math.inf
    elapsed_train: float = 0.0  # seconds spent in training steps (evaluation excluded), over every session
    samples_seen: int = 0
    bad_files: _BadFiles = field(default_factory=lambda: _BadFiles(None))
    last: Any = None  # the latest evaluation result
    last_ema: Any = None

    @property
    def cfg(self) -> Any:
        return self.task.cfg

    @property
    def updates_per_epoch(self) -> int:
        return self.sampler.updates_per_epoch

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.total_updates / self.updates_per_epoch)

    @property
    def epoch_updates(self) -> int:
        """Updates of the epoch in progress (the last one may be partial)."""
        return min(self.updates_per_epoch, self.total_updates - self.epoch * self.updates_per_epoch)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def fit(task: Task, *, resume_dir: Path | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Train ``task`` as ``task.cfg`` says (or continue the run folder ``resume_dir``); returns the run folder.

    The run folder holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (``kind`` ``"step"`` per logged
    update, ``"epoch"`` per epoch with its evaluation), ``checkpoints/`` (``last`` and ``best``, written
    atomically), ``summary.json`` and the task's figures. One process, or one of several started by torchrun.
    """
    dist_info, device = init_distributed(task.cfg.train.device, key="train.device")
    try:
        return _fit(task, dist_info, device, resume_dir, log or (lambda s: print(s, flush=True)))
    finally:
        cleanup()


def _fit(task: Task, dist_info: DistInfo, device: torch.device, resume_dir: Path | None, log) -> Path:
    run = _prepare(task, dist_info, device, resume_dir, log)
    while run.epoch < run.num_epochs:  # num_epochs may change under a time budget (sched.minutes)
        _train_epoch(run)
        _end_epoch(run)
    _finish(run)
    return run.run_dir


def _prepare(task: Task, dist_info: DistInfo, device: torch.device, resume_dir: Path | None, log) -> _Run:
    """Build the task's parts, the optimization and the run folder; restore a resumed run."""
    t = task.cfg.train
    set_threads(t.threads, device)
    amp_dtype = resolve_amp(t.amp, device, key="train.amp")
    ctx = FitContext(device, amp_dtype, dist_info, micro_batch(t, dist_info.world_size), t.progress)
    if resume_dir is None and dist_info.is_main:
        check_writable_folder(t.output_dir, f"train.output_dir={t.output_dir}")
    task.setup(ctx)
    sampler = ShardedEpochSampler(
        task.num_train, t.batch_size, rank=dist_info.rank, world_size=dist_info.world_size, seed=t.seed
    )
    run = _build_optimization(task, ctx, sampler, log)
    if resume_dir is not None:
        run.run_dir = resume_dir
        _restore(run)
    else:
        run.run_dir = make_run_dir(t.output_dir, t.name or task.default_name, dist_info)
    run.metrics = MetricsLog(run.run_dir / "metrics.jsonl", enabled=dist_info.is_main)
    if dist_info.is_main:
        atomic_write_text(run.run_dir / "config.yaml", yaml.safe_dump(task.cfg.to_dict(), sort_keys=False))
        run.metrics.truncate_after(run.update)  # a resumed run rewrites what came after its checkpoint
        if resume_dir is None:
            log(f"run folder: {run.run_dir}")
        log(_header(run))
    run.train_model = _wrap(run)
    return run


def _build_optimization(task: Task, ctx: FitContext, sampler: ShardedEpochSampler, log) -> _Run:
    """Model (seeded), EMA, optimizer, schedule and grad scaler; the schedule's length in updates."""
    import timm.utils

    t, s = task.cfg.train, task.cfg.sched
    total_updates = getattr(s, "updates", None) or s.epochs * sampler.updates_per_epoch
    minutes = getattr(s, "minutes", None)
    budget = TimeBudget(minutes * 60) if minutes else None
    if budget is not None:  # sched.epochs is provisional: it must outlast the first estimate
        total_updates = max(total_updates, budget.first_estimate + 1)
    torch.manual_seed(t.seed)
    model = task.build_model().to(ctx.device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = timm.utils.ModelEmaV3(model, decay=t.ema, device=ctx.device) if t.ema > 0 else None
    optimizer = task.build_optimizer(model)
    scheduler = task.build_scheduler(optimizer, total_updates, sampler.updates_per_epoch)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.amp_dtype == torch.float16)
    bad = _BadFiles(getattr(t, "max_bad_files", None))
    return _Run(task, ctx, log, model, model, ema, optimizer, scheduler, scaler, sampler, total_updates, budget,
                bad_files=bad)  # fmt: skip


def _restore(run: _Run) -> None:
    """Load ``checkpoints/last`` of the run folder (the newest intact one) into the run, if there is one."""
    main = run.ctx.dist.is_main
    point = ckpt.load_resume_point(run.run_dir / "checkpoints", "last", log=run.log if main else None)
    if point is None:
        if main:
            run.log(f"{run.run_dir} has no checkpoint yet (stopped before its first save): starting from the beginning")
        return
    saved = list(point.metadata.get("classes") or ())
    if saved and saved != list(run.task.classes):
        raise DSNetError(
            f"cannot resume {run.run_dir}: it was trained on {len(saved)} classes {saved[:5]} but the training set now "
            f"has {len(run.task.classes)} {list(run.task.classes)[:5]}; restore the data or start a new run"
        )
    run.model.load_state_dict(point.weights)
    state = ckpt.restore_training_state(point.state, run.optimizer, run.scheduler, run.scaler)
    if run.ema is not None:
        run.ema.module.load_state_dict(state["ema"])
    run.epoch, run.update_in_epoch, run.update = state["epoch"], state["update_in_epoch"], state["update"]
    run.first_update = run.update
    if run.budget is not None:  # the length last estimated (the restored scheduler has it too)
        run.total_updates = state.get("total_updates", run.total_updates)
    run.best = state["best"]
    run.elapsed_train = state.get("elapsed_train", state.get("train_seconds", 0.0))  # detection runs before 0.2
    run.samples_seen = state.get("samples_seen", run.update * run.cfg.train.batch_size)
    run.bad_files.seen = list(state.get("bad_files", ()))
    if main:
        run.log(f"resuming {run.run_dir} at epoch {run.epoch}, update {run.update} (from {point.weights_path.name})")


def _header(run: _Run) -> str:
    t, task, ctx = run.cfg.train, run.task, run.ctx
    n_params = sum(p.numel() for p in run.model.parameters())
    group = run.optimizer.param_groups[0]
    return (
        f"{task.title}: {n_params / 1e6:.2f}M params, {len(task.classes)} classes, {task.num_train} train / "
        f"{task.num_val} val images, {ctx.dist.world_size} process(es) on {ctx.device} "
        f"({torch.get_num_threads()} thread(s) each), global batch {t.batch_size} (micro {ctx.micro} × accum "
        f"{t.accum_steps}), lr {group.get('initial_lr', group['lr']):.3g}, amp {ctx.amp_dtype or 'off'}, "
        f"{run.updates_per_epoch} updates/epoch"
    )


def _wrap(run: _Run) -> nn.Module:
    """The module the steps run: the model, compiled (``train.compile``), under DDP with several processes."""
    t, dist = run.cfg.train, run.ctx.dist
    model: nn.Module = run.model
    if getattr(t, "sync_bn", False):
        if not dist.distributed:
            if dist.is_main:
                run.log("train.sync_bn: one process, so BatchNorm statistics are already global (no change)")
        elif run.ctx.device.type != "cuda":
            raise DSNetError("train.sync_bn=true needs CUDA devices (torch's SyncBatchNorm); set it to false on CPUs")
        else:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if t.compile:
        model = torch.compile(model)
    if dist.distributed:
        from torch.nn.parallel import DistributedDataParallel

        device = run.ctx.device
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def _save(run: _Run, tag: str, epoch: int, update_in_epoch: int, with_state: bool) -> None:
    """Checkpoint ``tag`` (rank 0 writes, every rank waits); ``with_state`` adds what an exact resume needs."""
    if run.ctx.dist.is_main:
        state = None
        if with_state:
            state = ckpt.capture_training_state(
                run.optimizer, run.scheduler, run.scaler,
                epoch=epoch, update_in_epoch=update_in_epoch, update=run.update, best=run.best,
                elapsed_train=run.elapsed_train, samples_seen=run.samples_seen,
                bad_files=list(run.bad_files.seen), total_updates=run.total_updates,
            )  # fmt: skip
        meta = {**run.task.checkpoint_metadata(), "classes": list(run.task.classes), "epoch": epoch}
        ckpt.save_checkpoint(
            run.run_dir / "checkpoints",
            tag,
            run.model,
            ema=run.ema.module if run.ema is not None else None,
            training_state=state,
            metadata={**meta, "update": run.update},
        )
    barrier()


class _StepLog:
    """Sums loss terms × samples between two step records, so that a record is the mean over its updates."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.sums = torch.zeros(2, dtype=torch.float64)  # loss × samples, samples

    def add(self, step: StepLoss) -> None:
        if not self.names and step.parts:
            self.names = sorted(step.parts)
            self.sums = torch.zeros(2 + len(self.names), dtype=torch.float64)
        values = [step.loss.item(), *(step.parts[k].item() for k in self.names)]
        n = step.samples
        self.sums += torch.tensor([values[0] * n, n, *(v * n for v in values[1:])], dtype=torch.float64)

    def pop(self) -> dict[str, float]:
        """The means over every rank since the last call (a collective)."""
        reduced = all_reduce_sum(self.sums.clone())
        self.sums.zero_()
        count = max(float(reduced[1]), 1.0)
        means = {"loss": float(reduced[0]) / count}
        means.update({k: float(v) / count for k, v in zip(self.names, reduced[2:])})
        return means


def _train_epoch(run: _Run) -> None:
    """The optimizer updates of the epoch in progress (from ``update_in_epoch``, where a resumed run stopped)."""
    t, main = run.cfg.train, run.ctx.dist.is_main
    run.sampler.set_epoch(run.epoch, run.update_in_epoch)
    bar = Progress(
        (run.epoch_updates - run.update_in_epoch) * t.batch_size,
        f"epoch {run.epoch + 1}/{run.num_epochs}",
        enabled=t.progress and main,
    )
    run.train_model.train()
    steps, micro_index, tic = _StepLog(), 0, time.perf_counter()
    for batch in run.task.train_batches(run.sampler):
        if micro_index == 0:
            seed_update(t.seed, run.update, run.ctx.dist.rank)
        step = _backward(run, batch, last_micro=micro_index == t.accum_steps - 1)
        steps.add(step)
        micro_index = (micro_index + 1) % t.accum_steps
        if micro_index:
            continue
        tic = _optimizer_update(run, tic)
        bar.update(t.batch_size, loss=step.loss.item())
        if run.update % t.log_interval == 0 or run.update_in_epoch == run.epoch_updates:
            elapsed = run.elapsed_train + time.perf_counter() - tic
            run.metrics.write(  # type: ignore[union-attr]
                "step", epoch=run.epoch + 1, update=run.update, **steps.pop(), lr=run.lr,
                img_per_s=run.samples_seen / max(elapsed, 1e-9),
            )  # fmt: skip
        if t.ckpt_interval and run.update % t.ckpt_interval == 0 and run.update_in_epoch < run.epoch_updates:
            run.elapsed_train += time.perf_counter() - tic
            _save(run, "last", run.epoch, run.update_in_epoch, with_state=True)
            tic = time.perf_counter()
            _test_pause(run.update)
        if run.update_in_epoch == run.epoch_updates:  # the schedule ends inside this epoch
            break
    run.elapsed_train += time.perf_counter() - tic
    bar.close()


def _backward(run: _Run, batch: Any, last_micro: bool) -> StepLoss:
    """Forward and backward of one micro-batch; gradients are all-reduced only on the last of an update."""
    t, dist = run.cfg.train, run.ctx.dist
    no_sync = dist.distributed and not last_micro
    with run.train_model.no_sync() if no_sync else contextlib.nullcontext():  # type: ignore[operator]
        with autocast_context(run.ctx.device, run.ctx.amp_dtype):
            step = run.task.forward_loss(run.train_model, batch)
        run.bad_files.add(step.bad_files)
        check_finite_loss(
            step.loss, epoch=run.epoch, update=run.update, lr=run.lr,
            advice=run.task.nonfinite_advice, world_size=dist.world_size,
        )  # fmt: skip
        run.scaler.scale(step.loss / t.accum_steps).backward()
    return step


def _optimizer_update(run: _Run, tic: float) -> float:
    """Clip, step, advance the schedule (re-estimated under a time budget) and the EMA; returns the timer start."""
    clip = run.cfg.optim.clip_grad
    if clip:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.update += 1
    run.update_in_epoch += 1
    if run.budget is not None:
        estimate = run.budget.estimate(run.update, run.elapsed_train + time.perf_counter() - tic, run.first_update)
        if estimate is not None:
            world = run.ctx.dist.world_size
            if world > 1:  # every rank must stop at the same update
                estimate = int(all_reduce_sum(torch.tensor([float(estimate)], dtype=torch.float64))[0] / world)
            run.total_updates = max(estimate, run.update)
            run.scheduler = run.task.build_scheduler(run.optimizer, run.total_updates, run.updates_per_epoch)
    run.scheduler.step_update(num_updates=run.update)
    if run.ema is not None:
        run.ema.update(run.model, step=run.update)
    run.samples_seen += run.cfg.train.batch_size
    return tic


def _test_pause(update: int) -> None:
    if os.environ.get(_PAUSE_ENV):
        at, seconds = os.environ[_PAUSE_ENV].split(":")
        if int(at) == update:
            time.sleep(float(seconds))


def _score(record: dict[str, Any], key: str) -> float:
    value = record.get(key)
    return -math.inf if value is None or value != value else float(value)


def _end_epoch(run: _Run) -> None:
    """Evaluate when due (the model, then the EMA weights), keep ``best``, write the epoch record and ``last``."""
    t, task, main = run.cfg.train, run.task, run.ctx.dist.is_main
    done = run.epoch + 1
    record: dict[str, Any] = {"epoch": done, "update": run.update, "lr": run.lr}
    if done % t.eval_interval == 0 or done == run.num_epochs:
        run.last = task.evaluate(run.model, "eval")
        ours = task.record(run.last)
        record.update(ours)
        score, text = _score(ours, task.score_key), task.describe(ours)
        if run.ema is not None and t.eval_ema:
            run.last_ema = task.evaluate(run.ema.module, "eval (EMA)")
            theirs = task.record(run.last_ema)
            record.update({f"{k}_ema": v for k, v in theirs.items()})
            score, text = max(score, _score(theirs, task.score_key)), f"{text}; EMA {task.describe(theirs)}"
        if score > run.best:
            run.best = score
            _save(run, "best", done, 0, with_state=False)
        if main:
            img_s = run.samples_seen / max(run.elapsed_train, 1e-9)
            run.log(f"epoch {done}/{run.num_epochs}: {text} ({img_s:.1f} train img/s)")
    record["img_per_s"] = run.samples_seen / max(run.elapsed_train, 1e-9)
    run.metrics.write("epoch", **record)  # type: ignore[union-attr]
    run.epoch, run.update_in_epoch = done, 0
    _save(run, "last", done, 0, with_state=True)


def _finish(run: _Run) -> None:
    """``summary.json``, the task's figures and the last log line."""
    task, ctx = run.task, run.ctx
    if run.last is None:  # resumed after the last epoch had finished
        run.last = task.evaluate(run.model, "eval")
    total_bad = int(all_reduce_sum(torch.tensor([len(run.bad_files.seen)], dtype=torch.float64)).item())
    if ctx.dist.is_main:
        task.draw(run.run_dir, run.metrics.read(), run.last)  # type: ignore[union-attr]
        plot_curves(run.metrics.read(), run.run_dir / "curves.png", score=task.score_key)  # type: ignore[union-attr]
        best = run.best if math.isfinite(run.best) else None
        summary = {
            **task.summary(run.last, run.last_ema),
            "epochs": run.total_updates / run.updates_per_epoch,
            "updates": run.update,
            "global_batch": run.cfg.train.batch_size,
            "processes": ctx.dist.world_size,
            "device": str(ctx.device),
            "amp": str(ctx.amp_dtype) if ctx.amp_dtype else "off",
            "params": sum(p.numel() for p in run.model.parameters()),
            "train_seconds": run.elapsed_train,
            "train_img_per_s": run.samples_seen / max(run.elapsed_train, 1e-9),
            f"best_{task.score_key}": best,
            "bad_files": total_bad,
            "bad_file_messages": run.bad_files.seen[:100],
            "run_dir": str(run.run_dir),
        }
        atomic_write_json(run.run_dir / "summary.json", summary)
        final = task.describe(task.record(run.last))
        best_text = "n/a" if best is None else f"{best:.4g}"
        run.log(f"done: {final} (best {task.score_key} {best_text}), {total_bad} unreadable image(s) skipped")
    barrier()
