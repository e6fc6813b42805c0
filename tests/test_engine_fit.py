"""The one training loop on its own: a third task, written here against the :class:`~dsnet.engine.fit.Task`
protocol alone (linear regression, no image, no timm model), gets the run folder, checkpoints, exact resume, EMA
evaluation and the summary without any change to :mod:`dsnet.engine.fit`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from _engine_helpers import killed_after_checkpoint
from dsnet.engine import checkpoint
from dsnet.engine.config import TrainConfig
from dsnet.engine.fit import FitContext, StepLoss, _wrap, fit
from dsnet.errors import DSNetError

TRUE_W = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


@dataclass
class _Sched:
    epochs: int = 3
    updates: int | None = None
    minutes: float | None = None


@dataclass
class _Optim:
    lr: float = 0.05
    clip_grad: float | None = 5.0


@dataclass
class _Config:
    train: TrainConfig = field(default_factory=TrainConfig)
    sched: _Sched = field(default_factory=_Sched)
    optim: _Optim = field(default_factory=_Optim)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Points(torch.utils.data.Dataset):
    """``y = x W + noise``; keys are the sampler's ``(index, epoch)``."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ TRUE_W + 0.01 * torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, torch.Tensor]:
        index = key[0] if isinstance(key, tuple) else key
        return self.x[index], self.y[index]


class RegressionTask:
    """The smallest complete task: a linear model, MSE loss, "best" = the highest negated validation MSE."""

    title = "linear regression"
    default_name = "regression"
    score_key = "neg_mse"
    nonfinite_advice = "lower optim.lr"

    def __init__(self, cfg: _Config) -> None:
        self.cfg = cfg
        self.classes = ["y"]
        self.num_train, self.num_val = 48, 16

    def setup(self, ctx: FitContext) -> None:
        self.ctx = ctx
        self.train_set, self.val_set = _Points(self.num_train, 1), _Points(self.num_val, 2)

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.Linear(8, 1))  # dropout: RNG inside an update

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=self.cfg.optim.lr)

    def build_scheduler(self, optimizer: torch.optim.Optimizer, total_updates: int, updates_per_epoch: int) -> Any:
        from timm.scheduler import CosineLRScheduler

        return CosineLRScheduler(optimizer, t_initial=total_updates, t_in_epochs=False)

    def train_batches(self, sampler: Any) -> Any:
        return torch.utils.data.DataLoader(self.train_set, batch_size=self.ctx.micro, sampler=sampler)

    def forward_loss(self, model: nn.Module, batch: Any) -> StepLoss:
        x, y = batch
        loss = nn.functional.mse_loss(model(x).float(), y)
        return StepLoss(loss, len(x), parts={"mse": loss.detach()})

    @torch.no_grad()
    def evaluate(self, model: nn.Module, desc: str) -> float:
        was = model.training
        model.eval()
        mse = float(nn.functional.mse_loss(model(self.val_set.x), self.val_set.y))
        model.train(was)
        return mse

    def record(self, result: float) -> dict[str, Any]:
        return {"neg_mse": -result}

    def describe(self, record: dict[str, Any]) -> str:
        return f"val mse {-record['neg_mse']:.4f}"

    def checkpoint_metadata(self) -> dict[str, Any]:
        return {"model": "linear"}

    def summary(self, final: float, final_ema: float | None) -> dict[str, Any]:
        return {"final_mse": final, "final_ema_mse": final_ema}

    def draw(self, run_dir: Path, records: list[dict[str, Any]], final: float) -> None:
        (run_dir / "drawn.txt").write_text(f"{len(records)} records")


def _config(out: Path, **train: Any) -> _Config:
    cfg = _Config()
    cfg.train = TrainConfig(
        batch_size=8, accum_steps=2, threads=1, output_dir=str(out), name="r", ema=0.5, log_interval=2, progress=False,
        **train,
    )  # fmt: skip
    return cfg


def test_a_new_task_trains_through_the_loop_unchanged(tmp_path):
    lines: list[str] = []
    run_dir = fit(RegressionTask(_config(tmp_path)), log=lines.append)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["updates"] == 18 and summary["epochs"] == 3  # 48 // 8 = 6 updates × 3 epochs
    task = RegressionTask(_config(tmp_path))
    task.setup(None)  # type: ignore[arg-type]
    torch.manual_seed(0)
    assert summary["final_mse"] < task.evaluate(task.build_model(), "untrained") / 4  # it learned
    assert summary["best_neg_mse"] >= max(-summary["final_mse"], -summary["final_ema_mse"])  # best of every epoch
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["update"] for r in steps] == list(range(2, 19, 2))
    assert all(r["mse"] == pytest.approx(r["loss"]) for r in steps)  # named loss terms are logged beside the loss
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and all("neg_mse_ema" in r for r in epochs)
    assert (run_dir / "drawn.txt").read_text() == f"{len(records)} records" and (run_dir / "curves.png").is_file()
    assert any(line.startswith("linear regression: ") and "micro 4 × accum 2" in line for line in lines)
    meta = checkpoint.read_metadata(run_dir / "checkpoints" / "best.safetensors")
    assert meta["model"] == "linear" and meta["classes"] == ["y"]


def test_a_new_task_resumes_exactly_after_a_kill(tmp_path, monkeypatch):
    whole = fit(RegressionTask(_config(tmp_path / "whole", ckpt_interval=4)), log=lambda s: None)
    with killed_after_checkpoint(monkeypatch, 8):
        fit(RegressionTask(_config(tmp_path / "cut", ckpt_interval=4)), log=lambda s: None)
    (cut,) = (tmp_path / "cut").iterdir()
    lines: list[str] = []
    fit(RegressionTask(_config(tmp_path / "cut", ckpt_interval=4)), resume_dir=cut, log=lines.append)
    assert any("resuming" in line and "update 8" in line for line in lines)
    for name in ("last.safetensors", "last_ema.safetensors"):
        a, b = load_file(whole / "checkpoints" / name), load_file(cut / "checkpoints" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_sync_bn_is_a_noted_no_op_alone_and_refused_on_cpu_processes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    lines: list[str] = []

    def run(distributed: bool) -> SimpleNamespace:
        dist = SimpleNamespace(distributed=distributed, is_main=True)
        train = SimpleNamespace(sync_bn=True, compile=False)
        ctx = SimpleNamespace(dist=dist, device=torch.device("cpu"))
        return SimpleNamespace(cfg=SimpleNamespace(train=train), ctx=ctx, model=model, log=lines.append)

    assert _wrap(run(False)) is model  # one process: its BatchNorm statistics are already those of the batch
    assert "train.sync_bn" in lines[0] and "one process" in lines[0]
    with pytest.raises(DSNetError, match=r"train.sync_bn=true needs CUDA devices"):
        _wrap(run(True))
