"""``dsnet eval``: top-1, top-5 and per-class accuracy of a checkpoint, plus a confusion-matrix PNG."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from dsnet.cli.main import positive_int, user_errors_as_dsnet
from dsnet.errors import DSNetError


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
) -> tuple[Any, Path]:
    """Evaluate ``checkpoint`` (run folder, ``.safetensors``, converted weights with ``model_name``, or an artefact of
    ``dsnet export`` run by ``backend``: onnxruntime or openvino, by default from its suffix).

    The dataset comes from the run folder's ``config.yaml`` (for an artefact: that of the run it was exported from),
    else from ``config``; ``overrides`` apply on top.
    Returns ``(EvalResult, output folder)``; the folder receives ``eval.json`` and ``confusion.png``.
    """
    from datetime import datetime, timezone

    import torch

    from dsnet._io import atomic_write_json
    from dsnet.data.build import build_dataset
    from dsnet.data.datasets import ShardedEpochSampler, TransformedDataset, collate_with_bad_files
    from dsnet.deploy.runtime import guess_backend, load_for_inference, read_artefact_info
    from dsnet.engine.config import load_config
    from dsnet.engine.distributed import resolve_device
    from dsnet.engine.evaluate import evaluate
    from dsnet.engine.inference import load_checkpoint
    from dsnet.engine.report import Progress, plot_confusion
    from dsnet.engine.runtime import resolve_amp

    checkpoint = Path(checkpoint)
    with user_errors_as_dsnet():
        backend = backend or guess_backend(checkpoint)
    run_config = checkpoint / "config.yaml" if checkpoint.is_dir() else None
    if backend != "torch" and checkpoint.is_file():
        with user_errors_as_dsnet():
            run_dir = read_artefact_info(checkpoint).run_dir
        run_config = run_dir / "config.yaml" if run_dir is not None else None
    if config is None and run_config is not None and run_config.is_file():
        config = run_config
    cfg = load_config(config, overrides)
    device = resolve_device(cfg.train.device)
    if cfg.train.threads or device.type == "cpu":
        from dsnet.engine.runtime import auto_threads

        torch.set_num_threads(cfg.train.threads or auto_threads())
    if backend == "torch":
        model, info = load_checkpoint(checkpoint, ema=ema, tag=tag, model_name=model_name, device=device)
    else:
        with user_errors_as_dsnet():
            model, info = load_for_inference(checkpoint, backend=backend)
        device = torch.device("cpu")
    if not info.has_preprocessing:  # converted weights: the recipe says how images are prepared
        from dsnet.data.build import normalization

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


def run(args: argparse.Namespace) -> int:
    from dsnet._io import strict_json

    overrides = list(args.set or [])
    if args.data_dir:
        overrides.append(f"data.root={args.data_dir}")
    result, output = evaluate_checkpoint(
        args.checkpoint,
        config=args.config,
        overrides=overrides,
        split=args.split,
        ema=args.ema,
        tag=args.tag,
        model_name=args.model,
        batch_size=args.batch_size,
        output=args.output,
        quiet=args.json,
        backend=args.backend,
    )
    if args.json:
        print(strict_json({**result.to_dict(), "output": str(output)}, indent=2))
        return 0
    print(f"top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  loss {result.loss:.4f}  ({result.num_samples} images)")
    width = max(len(c) for c in result.classes)
    for name, acc in zip(result.classes, result.per_class):
        print(f"  {name:<{width}}  {acc:6.2f}%")
    if result.bad_files:
        print(f"{len(result.bad_files)} unreadable image(s) skipped (not counted); first: {result.bad_files[0]}")
    print(f"wrote {output / 'eval.json'} and {output / 'confusion.png'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="top-1/top-5/per-class accuracy of a checkpoint and a confusion matrix")
    p.add_argument(
        "checkpoint",
        help="run folder, .safetensors from dsnet train, converted weights (with --model), or a dsnet export artefact",
    )
    p.add_argument(
        "--backend",
        choices=("torch", "onnxruntime", "openvino"),
        help="what runs the model (default: torch for checkpoints, by suffix for .onnx / .xml artefacts)",
    )
    p.add_argument("--config", "-c", help="recipe giving the dataset (default: the run folder's config.yaml)")
    p.add_argument("--set", "-s", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--data-dir", help="dataset folder (same as --set data.root=DIR)")
    p.add_argument("--split", choices=("val", "train"), default="val", help="split to evaluate (default val)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--tag", choices=("best", "last"), default="best", help="which checkpoint of a run folder")
    p.add_argument("--model", help="timm model name (for weights without dsnet metadata)")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--output", help="folder for eval.json and confusion.png")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=run)
