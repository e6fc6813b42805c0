"""``dsnet export``: a zoo model or a trained run → ONNX or OpenVINO IR, optionally int8, checked in its runtime.

The source is a model name (random or ``--weights`` weights) or a checkpoint (run folder or ``.safetensors`` from
``dsnet train``). The model is fused first (:func:`dsnet.deploy.fuse`, same logits), exported to ONNX with a symbolic
batch, quantized to int8 QDQ when ``--int8`` (calibrated on ``--calib`` images), converted to OpenVINO IR when the
output ends in ``.xml``. A sidecar ``<output>.json`` records the classes and preprocessing for ``dsnet predict``,
``dsnet eval`` and ``dsnet serve``. The work is :mod:`dsnet.deploy.export`; this module parses the command line.
"""

from __future__ import annotations

import argparse

from dsnet.cli.main import positive_int


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
    import torch

    import dsnet  # noqa: F401  (registers the zoo)
    from dsnet.deploy import fuse
    from dsnet.deploy.export import Int8Calibration, check_export_output, export_artefact, load_export_source
    from dsnet.engine.inference import collect_images
    from dsnet.errors import DSNetError

    torch.set_num_threads(args.threads or torch.get_num_threads())
    check_export_output(args.output)  # before building the model: a bad output path fails at once
    if args.int8 and not args.calib:
        raise DSNetError("--int8 needs calibration images: --calib DIR (a folder of images like the inputs)")
    model, info = load_export_source(
        args.source,
        weights=args.weights,
        num_classes=args.num_classes,
        in_chans=args.in_chans,
        ema=args.ema,
        tag=args.tag,
    )
    model = model.eval() if args.no_fuse else fuse(model)
    int8 = Int8Calibration(collect_images([args.calib]), args.calib_images, args.calib_method) if args.int8 else None
    image_size = args.image_size or (info.input_size, info.input_size)
    print(f"exporting {info.model} ({'unfused' if args.no_fuse else 'fused'}) at {image_size[0]}x{image_size[1]}")
    export_artefact(
        model,
        info,
        args.output,
        image_size=image_size,
        dynamic_batch=not args.static_batch,
        dynamic_size=args.dynamic_size,
        opset=args.opset,
        int8=int8,
        sidecar={"exported_from": args.source, "fused": not args.no_fuse},
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="export a model or trained run to ONNX / OpenVINO IR (optionally int8), checked in its runtime"
    )
    p.add_argument("source", help="model name (e.g. dsnet_tiny), run folder, or .safetensors from dsnet train")
    p.add_argument("output", help="output file: .onnx (ONNX Runtime) or .xml (OpenVINO IR, weights in .bin beside)")
    p.add_argument("--weights", help="with a model name: .safetensors weights (e.g. from `dsnet convert`) to load")
    p.add_argument("--num-classes", type=int, help="with a model name: classifier classes (default: the model's)")
    p.add_argument("--in-chans", type=int, help="with a model name: input channels (default 3)")
    p.add_argument("--ema", action="store_true", help="with a run: export the EMA weights")
    p.add_argument("--tag", choices=("best", "last"), default="best", help="with a run: which checkpoint")
    p.add_argument("--image-size", type=_parse_size, help="example input, 224 or HxW (default: the model's)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size instead of a symbolic one")
    p.add_argument("--dynamic-size", action="store_true", help="make height and width symbolic too")
    p.add_argument("--no-fuse", action="store_true", help="export the model as built, BatchNorms not folded")
    p.add_argument("--int8", action="store_true", help="int8 static post-training quantization (QDQ)")
    p.add_argument("--calib", help="folder (or file) of calibration images for --int8")
    p.add_argument("--calib-images", type=positive_int, default=512, help="at most this many calibration images (512)")
    p.add_argument("--calib-method", choices=("minmax", "percentile", "entropy"), default="minmax")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--threads", type=int, help="torch / runtime CPU threads")
    p.set_defaults(func=run)
