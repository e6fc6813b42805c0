"""Evaluate a checkpoint or an exported artefact on a dataset: top-1, top-5, per-class accuracy, a confusion matrix.

One function for every backend (:data:`dsnet.deploy.runtime.BACKENDS`): a run folder or ``.safetensors`` runs in
PyTorch, an ``.onnx`` / ``.xml`` file of ``dsnet export`` in ONNX Runtime or OpenVINO, on the same data pipeline, so
their figures compare. ``dsnet eval`` is this function plus printing.

Example:
    >>> result, folder = evaluate_checkpoint("runs/dsnet_tiny-fashion_mnist-...")  # doctest: +SKIP
    >>> result.top1  # doctest: +SKIP
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import torch

from dsnet._io import atomic_write_json
from dsnet.data.build import build_dataset, normalization
from dsnet.data.datasets import ShardedEpochSampler, TransformedDataset, collate_with_bad_files
from dsnet.deploy.runtime import guess_backend, load_for_inference, read_artefact_info
from dsnet.engine.config import load_config
from dsnet.engine.distributed import resolve_device
from dsnet.engine.evaluate import EvalResult, evaluate
from dsnet.engine.inference import load_checkpoint
from dsnet.engine.report import Progress, plot_confusion
from dsnet.engine.runtime import auto_threads, resolve_amp
from dsnet.errors import DSNetError

__all__ = ["evaluate_checkpoint"]


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    config: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    split: str = "val",
    ema: bool = False,
    tag: str = "best",
    model_name: str | None = None,
    batch_size: int = 128,
    output: str | Path | None = None,
    quiet: bool = False,
    backend: str | None = None,
) -> tuple[EvalResult, Path]:
    """Evaluate ``checkpoint`` (run folder, ``.safetensors``, converted weights with ``model_name``, or an artefact of
    ``dsnet export`` run by ``backend``: onnxruntime or openvino, by default from its suffix).

    The dataset comes from the run folder's ``config.yaml`` (for an artefact: that of the run it was exported from),
    else from ``config``; ``overrides`` apply on top.
    Returns ``(EvalResult, output folder)``; the folder receives ``eval.json`` and ``confusion.png``.
    """
    checkpoint = Path(checkpoint)
    backend = backend or guess_backend(checkpoint)
    run_config = checkpoint / "config.yaml" if checkpoint.is_dir() else None
    if backend != "torch" and checkpoint.is_file():
        run_dir = read_artefact_info(checkpoint).run_dir
        run_config = run_dir / "config.yaml" if run_dir is not None else None
    if config is None and run_config is not None and run_config.is_file():
        config = run_config
    cfg = load_config(config, overrides)
    device = resolve_device(cfg.train.device)
    if cfg.train.threads or device.type == "cpu":
        torch.set_num_threads(cfg.train.threads or auto_threads())
    if backend == "torch":
        model, info = load_checkpoint(checkpoint, ema=ema, tag=tag, model_name=model_name, device=device)
    else:
        model, info = load_for_inference(checkpoint, backend=backend)
        device = torch.device("cpu")
    if not info.has_preprocessing:  # converted weights: the recipe says how images are prepared
        info.input_size, info.crop_pct, info.interpolation = (
            cfg.data.input_size,
            cfg.data.crop_pct,
            cfg.data.interpolation,
        )
        info.mean, info.std = normalization(cfg.data, info.in_chans)
    dataset = build_dataset(cfg.data, split, info.in_chans)
    if len(dataset.classes) != info.num_classes:
        raise DSNetError(
            f"{info.path} predicts {info.num_classes} classes but the {cfg.data.dataset} {split} set has "
            f"{len(dataset.classes)} ({', '.join(dataset.classes[:5])}{', ...' if len(dataset.classes) > 5 else ''})"
        )
    named = not all(c.isdigit() for c in info.classes)
    if named and cfg.data.dataset == "imagefolder" and tuple(dataset.classes) != tuple(info.classes):
        raise DSNetError(
            f"the class folders of the {split} set {list(dataset.classes)[:5]} differ from the classes the "
            f"checkpoint was trained on {list(info.classes)[:5]}"
        )
    data = TransformedDataset(dataset, info.transform(), replace_bad=False)
    sampler = ShardedEpochSampler(len(data), batch_size, shuffle=False)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=min(cfg.data.workers, os.cpu_count() or 1),
        collate_fn=collate_with_bad_files,
    )
    progress = Progress(len(data), f"eval {info.model}", enabled=not quiet)
    result = evaluate(
        model,
        loader,
        info.num_classes,
        device=device,
        amp_dtype=resolve_amp(cfg.train.amp, device) if backend == "torch" else None,
        classes=dataset.classes,
        progress=progress,
    )
    progress.close()
    if output is None:
        if backend != "torch":
            output = checkpoint.parent / f"eval-{checkpoint.name}-{backend}-{split}"
        elif info.run_dir is not None:
            output = info.run_dir / f"eval-{split}{'-ema' if ema else ''}"
        else:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
            output = Path(cfg.train.output_dir) / f"eval-{info.model}-{stamp}"
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    record = {
        "checkpoint": str(info.path),
        "model": info.model,
        "backend": backend,
        "split": split,
        "ema": ema,
        **result.to_dict(),
    }
    atomic_write_json(output / "eval.json", record)
    title = f"{info.model}{' (EMA)' if ema else ''}: top-1 {result.top1:.2f}% on {result.num_samples} images"
    plot_confusion(result.confusion, dataset.classes, output / "confusion.png", title)
    return result, output
