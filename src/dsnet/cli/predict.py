"""``dsnet predict``: top-k labels with probabilities for image files or folders, as a table or JSON."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from dsnet.cli.main import positive_int


def run(args: argparse.Namespace) -> int:
    import torch

    from dsnet._io import strict_json
    from dsnet.deploy.runtime import load_for_inference
    from dsnet.engine.distributed import resolve_device
    from dsnet.engine.inference import collect_images, predict_files
    from dsnet.engine.runtime import auto_threads

    torch.set_num_threads(args.threads or auto_threads())
    classes = None
    if args.classes:
        with open(args.classes) as handle:
            classes = tuple(line.strip() for line in handle if line.strip())
    if args.backend in (None, "torch") and not str(args.checkpoint).lower().endswith((".onnx", ".xml")):
        device = resolve_device(args.device, key="--device")
        model, info = load_for_inference(
            args.checkpoint,
            backend="torch",
            fuse=not args.no_fuse,
            ema=args.ema,
            tag=args.tag,
            model_name=args.model,
            classes=classes,
            device=device,
        )
    else:
        model, info = load_for_inference(args.checkpoint, backend=args.backend)
    files = collect_images(args.inputs)
    predictions = predict_files(model, info, files, top_k=args.top_k, batch_size=args.batch_size)
    failed = [p for p in predictions if p.error]
    if args.json:
        print(strict_json([dataclasses.asdict(p) for p in predictions], indent=2))
    else:
        width = min(max(len(p.path) for p in predictions), 60)
        for p in predictions:
            if p.error:
                continue
            ranked = "  ".join(f"{label} {prob * 100:5.1f}%" for label, prob in zip(p.labels, p.probs))
            print(f"{p.path:<{width}}  {ranked}")
    for p in failed:
        print(f"dsnet: warning: {p.error}", file=sys.stderr)
    return 1 if failed else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="top-k labels with probabilities for image files or folders")
    p.add_argument(
        "checkpoint",
        help="run folder, .safetensors from dsnet train, converted weights (with --model), or a dsnet export artefact",
    )
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--top-k", "-k", type=positive_int, default=5, help="number of labels per image (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--ema", action="store_true", help="use the EMA weights")
    p.add_argument("--tag", choices=("best", "last"), default="best", help="which checkpoint of a run folder")
    p.add_argument("--model", help="timm model name (for weights without dsnet metadata)")
    p.add_argument("--classes", help="text file with one class name per line (for weights without dsnet metadata)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--threads", type=positive_int, help="torch / runtime CPU threads")
    p.add_argument(
        "--backend",
        choices=("torch", "onnxruntime", "openvino"),
        help="what runs the model (default: torch for checkpoints, by suffix for .onnx / .xml artefacts)",
    )
    p.add_argument("--no-fuse", action="store_true", help="torch backend: run the model unfused")
    p.set_defaults(func=run)
