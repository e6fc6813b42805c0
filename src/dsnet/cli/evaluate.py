"""``dsnet eval``: top-1, top-5 and per-class accuracy of a checkpoint, plus a confusion-matrix PNG.

The work is :func:`dsnet.deploy.evaluate.evaluate_checkpoint`; this module parses and prints.
"""

from __future__ import annotations

import argparse

from dsnet.cli.main import positive_int


def run(args: argparse.Namespace) -> int:
    from dsnet._io import strict_json
    from dsnet.deploy.evaluate import evaluate_checkpoint

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
