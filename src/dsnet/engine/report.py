"""Run-folder outputs: JSON-lines metrics, training curves and confusion-matrix figures, progress display."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dsnet._io import atomic_write_text, strict_json

__all__ = ["MetricsLog", "Progress", "format_metric", "plot_confusion", "plot_curves"]


def format_metric(value: float | None, spec: str = ".3f") -> str:
    """A metric for a table or log line; ``n/a`` when it is undefined (None or NaN)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per line, ``{"kind": "step" | "epoch" | "eval", ...}``."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled

    def write(self, kind: str, **values: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(strict_json({"kind": kind, "time": round(time.time(), 3), **values}) + "\n")

    def truncate_after(self, update: int) -> None:
        """Drop records written after optimizer update ``update`` (a resumed run rewrites them)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in self.read() if r.get("update", 0) <= update]
        atomic_write_text(self.path, "".join(strict_json(r) + "\n" for r in kept))

    def read(self) -> list[dict[str, Any]]:
        """The records; a last line without its newline (a run killed while appending it) is left out."""
        if not self.path.exists():
            return []
        text = self.path.read_text()
        lines = text.split("\n")
        complete = lines[:-1]  # the text after the last newline is empty, or a record cut short
        return [json.loads(line) for line in complete if line.strip()]


class Progress:
    """A tqdm bar with rate and ETA on a terminal; plain log lines every ``interval`` items otherwise (stderr)."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, unit: str = "img", interval: int = 0) -> None:
        self.enabled, self.total, self.desc, self.count = enabled, total, desc, 0
        self.start = time.perf_counter()
        self.interval = interval or max(total // 10, 1)
        self.next_log = self.interval
        self.postfix = ""
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, leave=False)

    def update(self, n: int, **postfix: Any) -> None:
        self.count += n
        if postfix:
            self.postfix = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix_str(self.postfix, refresh=False)
        elif self.count >= self.next_log or self.count >= self.total:
            self.next_log += self.interval
            elapsed = time.perf_counter() - self.start
            rate = self.count / max(elapsed, 1e-9)
            eta = (self.total - self.count) / max(rate, 1e-9)
            print(
                f"{self.desc}: {self.count}/{self.total} [{elapsed:.0f}s<{eta:.0f}s, {rate:.1f} img/s] {self.postfix}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_curves(records: Sequence[dict[str, Any]], path: Path, score: str = "top1") -> None:
    """``curves.png``: training loss and learning rate per update, the evaluation ``score`` per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if r.get("kind") == "step"]
    evals = [r for r in records if r.get("kind") == "epoch" and r.get(score) is not None]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r["update"] for r in steps], [r["loss"] for r in steps])
    axes[0].set(title="training loss", xlabel="update", ylabel="loss")
    axes[1].plot([r["update"] for r in steps], [r["lr"] for r in steps])
    axes[1].set(title="learning rate", xlabel="update", ylabel="lr")
    epochs = [r["epoch"] for r in evals]
    axes[2].plot(epochs, [r[score] for r in evals], marker="o", label=score)
    if any(r.get(f"{score}_ema") is not None for r in evals):
        axes[2].plot(epochs, [r.get(f"{score}_ema") for r in evals], marker="o", label=f"{score} (EMA)")
    axes[2].set(title=f"evaluation {score}", xlabel="epoch", ylabel=score)
    axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(confusion: torch.Tensor, classes: Sequence[str], path: Path, title: str = "") -> None:
    """A row-normalised confusion matrix (true class by row) with counts written in the cells (≤ 30 classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = confusion.double()
    norm = counts / counts.sum(1, keepdim=True).clamp_min(1)
    n = len(classes)
    size = min(max(6, n * 0.6), 30)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    color = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=8, color=color)
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
