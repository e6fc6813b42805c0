"""``dsnet export``: a zoo model (optionally with converted or trained weights) → ONNX, checked in onnxruntime."""

from __future__ import annotations

import argparse


def _parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("×", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must look like 224 or 224x160, got {text!r}") from None
    if len(sizes) == 1:
        return sizes[0], sizes[0]
    if len(sizes) == 2:
        return sizes[0], sizes[1]
    raise argparse.ArgumentTypeError(f"image size must look like 224 or 224x160, got {text!r}")


def run(args: argparse.Namespace) -> int:
    import timm

    import dsnet  # noqa: F401  (registers the zoo)
    from dsnet.cli.main import CLIError
    from dsnet.export.onnx import export_onnx

    if args.model not in timm.list_models():
        raise CLIError(f"unknown model {args.model!r}; `dsnet info` lists the zoo, timm.list_models() the rest")
    kwargs: dict[str, object] = {}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.in_chans is not None:
        kwargs["in_chans"] = args.in_chans
    if args.weights:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": args.weights})
    model = timm.create_model(args.model, **kwargs)
    report = export_onnx(
        model,
        args.output,
        image_size=args.image_size,
        dynamic_batch=not args.static_batch,
        dynamic_size=args.dynamic_size,
        opset=args.opset,
    )
    dynamic = f"dynamic batch: {report.dynamic_batch}, dynamic size: {report.dynamic_size}"
    print(f"wrote {report.path} (opset {report.opset}, {dynamic})")
    for c in report.checks:
        print(f"  onnxruntime vs PyTorch at {c.shape}: max abs diff {c.max_abs_diff:.2e}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a model to ONNX and check it in onnxruntime")
    p.add_argument("model", help="model name, e.g. dsnet_tiny")
    p.add_argument("output", help="output .onnx file")
    p.add_argument("--weights", help=".safetensors weights (from `dsnet convert` or training) to load first")
    p.add_argument("--num-classes", type=int, help="classifier classes (default: the model's)")
    p.add_argument("--in-chans", type=int, help="input channels (default 3)")
    p.add_argument("--image-size", type=_parse_size, default=(224, 224), help="example input, 224 or HxW")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size instead of a symbolic one")
    p.add_argument("--dynamic-size", action="store_true", help="make height and width symbolic too")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.set_defaults(func=run)
