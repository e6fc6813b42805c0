"""Shared helpers of the engine / CLI tests: a tiny learnable ImageFolder and a fast training config."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ("circle", "square", "stripes")


def make_image(label: int, rng: np.random.Generator, size: int = 24) -> Image.Image:
    """A noisy picture whose class is visible: a bright disc, a bright square or horizontal stripes."""
    yy, xx = np.mgrid[:size, :size]
    array = rng.integers(0, 60, (size, size, 3)).astype(np.float64)
    c = size / 2 + rng.uniform(-2, 2, 2)
    if label == 0:
        mask = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 < (size / 3) ** 2
    elif label == 1:
        mask = (abs(yy - c[0]) < size / 3) & (abs(xx - c[1]) < size / 3)
    else:
        mask = (yy // 3) % 2 == 0
    array[mask] += rng.uniform(150, 190, 3)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "RGB")


def make_imagefolder(root: Path, per_class_train: int = 8, per_class_val: int = 4, seed: int = 0) -> Path:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` with the :data:`CLASSES` patterns."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class_train), ("val", per_class_val)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                make_image(label, rng).save(folder / f"{i:03d}.png")
    return root


def fast_overrides(root: Path, out: Path, **extra: object) -> list[str]:
    """``--set`` overrides of a few-second CPU run of timm's tiny ``test_convnext`` (LayerNorm, no BatchNorm)."""
    values: dict[str, object] = {
        "model.name": "test_convnext",
        "model.drop_path": 0.0,
        "data.dataset": "imagefolder",
        "data.root": str(root),
        "data.input_size": 32,
        "data.interpolation": "bilinear",
        "data.aa": "null",
        "data.reprob": 0.0,
        "data.mixup": 0.0,
        "data.cutmix": 0.0,
        "data.workers": 0,
        "optim.lr": 0.01,
        "optim.lr_base_batch": 0,
        "sched.epochs": 2,
        "sched.warmup_epochs": 0,
        "train.batch_size": 6,
        "train.threads": 1,
        "train.log_interval": 1,
        "train.output_dir": str(out),
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m dsnet.cli.main ARGS`` in a subprocess (captured output, one torch thread)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "dsnet.cli.main", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


@contextlib.contextmanager
def killed_after_checkpoint(monkeypatch: pytest.MonkeyPatch, update: int) -> Iterator[None]:
    """Training inside the block dies (``KeyboardInterrupt``, as on Ctrl-C) right after its ``last`` checkpoint of
    optimizer update ``update`` is written; the block expects that death."""
    from dsnet.engine import checkpoint

    original = checkpoint.save_checkpoint

    def save_then_die(folder, tag, model, **kwargs):
        original(folder, tag, model, **kwargs)
        if tag == "last" and kwargs["metadata"]["update"] == update:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(checkpoint, "save_checkpoint", original)
