"""Evaluation: top-1 / top-5 / per-class accuracy and the confusion matrix, reduced over ranks."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.utils import accuracy
from torch import nn

from dsnet.engine.distributed import all_reduce_sum
from dsnet.engine.runtime import autocast_context
from dsnet.errors import DSNetError

__all__ = ["EvalResult", "evaluate"]


@dataclass
class EvalResult:
    """Metrics of one pass over a dataset (percentages in 0…100)."""

    top1: float
    top5: float
    loss: float
    num_samples: int
    confusion: torch.Tensor  # (num_classes, num_classes) counts, rows = true class, columns = predicted
    classes: tuple[str, ...] = ()
    bad_files: list[str] = field(default_factory=list)

    @property
    def per_class(self) -> list[float]:
        """Accuracy of every class (NaN for a class without samples)."""
        totals = self.confusion.sum(1).clamp_min(1)
        acc = self.confusion.diag().double() / totals * 100
        return [float("nan") if self.confusion[i].sum() == 0 else float(a) for i, a in enumerate(acc)]

    def to_dict(self) -> dict[str, Any]:
        names = self.classes or tuple(str(i) for i in range(len(self.confusion)))
        return {
            "top1": self.top1,
            "top5": self.top5,
            "loss": self.loss,
            "num_samples": self.num_samples,
            "per_class": {n: None if math.isnan(a) else a for n, a in zip(names, self.per_class)},
            "confusion": self.confusion.tolist(),
            "bad_files": len(self.bad_files),
        }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    classes: tuple[str, ...] = (),
    progress: Any = None,
) -> EvalResult:
    """Run ``model`` over ``loader`` (batches ``(images, targets, bad_files)``), summed over all ranks.

    Top-k uses :func:`timm.utils.accuracy`; the loss is the plain cross-entropy.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    maxk = min(5, num_classes)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, samples
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    bad: list[str] = []
    for images, targets, bad_files in loader:
        bad.extend(bad_files)
        if targets.numel() == 0:
            continue
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        if logits.shape[-1] != num_classes:
            raise DSNetError(f"the model predicts {logits.shape[-1]} classes but the dataset has {num_classes}")
        acc1, acck = accuracy(logits, targets, topk=(1, maxk))
        n = targets.numel()
        sums += torch.tensor(
            [
                round(float(acc1) * n / 100),
                round(float(acck) * n / 100),
                float(nn.functional.cross_entropy(logits, targets)) * n,
                n,
            ],
            dtype=torch.float64,
            device=device,
        )
        confusion += torch.bincount(targets * num_classes + logits.argmax(-1), minlength=num_classes**2).view(
            num_classes, num_classes
        )  # (true, predicted)
        if progress is not None:
            progress.update(n)
    all_reduce_sum(sums)
    all_reduce_sum(confusion)
    model.train(was_training)
    total = max(float(sums[3]), 1.0)
    return EvalResult(
        top1=float(sums[0]) / total * 100,
        top5=float(sums[1]) / total * 100,
        loss=float(sums[2]) / total,
        num_samples=int(sums[3]),
        confusion=confusion.cpu(),
        classes=classes,
        bad_files=bad,
    )
