"""``dsnet export``: a zoo model or a trained run → ONNX or OpenVINO IR, optionally int8, checked in its runtime.

The source is a model name (random or ``--weights`` weights) or a checkpoint (run folder or ``.safetensors`` from
``dsnet train``). The model is fused first (:func:`dsnet.deploy.fuse`, same logits), exported to ONNX with a symbolic
batch, quantized to int8 QDQ when ``--int8`` (calibrated on ``--calib`` images), converted to OpenVINO IR when the
output ends in ``.xml``. A sidecar ``<output>.json`` records the classes and preprocessing for ``dsnet predict``,
``dsnet eval`` and ``dsnet serve``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


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


def _info_for_model_name(model, name: str):
    """Preprocessing of a bare model name: its timm pretrained config (ImageNet defaults otherwise)."""
    from dsnet.engine.inference import CheckpointInfo

    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    in_chans = int(getattr(model, "in_chans", 3))
    mean, std = tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    if len(mean) != in_chans:
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return CheckpointInfo(
        path=Path(name),
        model=name,
        num_classes=num_classes,
        in_chans=in_chans,
        classes=tuple(str(i) for i in range(num_classes)),
        input_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        mean=mean,
        std=std,
    )


def run(args: argparse.Namespace) -> int:
    import tempfile

    import timm
    import torch

    import dsnet  # noqa: F401  (registers the zoo)
    from dsnet._io import check_writable_folder
    from dsnet.deploy import fuse
    from dsnet.deploy.runtime import load_for_inference, write_artefact_info
    from dsnet.engine.inference import collect_images, load_checkpoint
    from dsnet.errors import DSNetError
    from dsnet.export.onnx import check_onnx, export_onnx

    torch.set_num_threads(args.threads or torch.get_num_threads())
    output = Path(args.output)
    if output.suffix.lower() not in (".onnx", ".xml"):
        raise DSNetError(f"output {output} must end in .onnx (ONNX) or .xml (OpenVINO IR)")
    if args.int8 and not args.calib:
        raise DSNetError("--int8 needs calibration images: --calib DIR (a folder of images like the inputs)")
    check_writable_folder(output.parent, f"output {output}")
    source = Path(args.source)
    if source.exists():
        model, info = load_checkpoint(source, ema=args.ema, tag=args.tag)
        if args.num_classes is not None or args.in_chans is not None:
            raise DSNetError("--num-classes/--in-chans apply to a model name; a checkpoint already fixes them")
    elif args.source in timm.list_models():
        kwargs: dict[str, object] = {}
        if args.num_classes is not None:
            kwargs["num_classes"] = args.num_classes
        if args.in_chans is not None:
            kwargs["in_chans"] = args.in_chans
        if args.weights:
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": args.weights})
        model = timm.create_model(args.source, **kwargs)
        info = _info_for_model_name(model, args.source)
    else:
        raise DSNetError(
            f"unknown model {args.source!r} and no such checkpoint; `dsnet info` lists the zoo, "
            "timm.list_models() the rest"
        )
    model = model.eval() if args.no_fuse else fuse(model)
    image_size = args.image_size or (info.input_size, info.input_size)
    calib_files = collect_images([args.calib]) if args.int8 else []
    print(f"exporting {info.model} ({'unfused' if args.no_fuse else 'fused'}) at {image_size[0]}x{image_size[1]}")
    with tempfile.TemporaryDirectory(dir=output.parent if output.parent.exists() else None) as tmp:
        needs_temp = output.suffix.lower() == ".xml" or args.int8
        fp32_onnx = Path(tmp) / "fp32.onnx" if needs_temp else output
        report = export_onnx(
            model,
            fp32_onnx,
            image_size=image_size,
            in_chans=info.in_chans,
            dynamic_batch=not args.static_batch,
            dynamic_size=args.dynamic_size,
            opset=args.opset,
        )
        for c in report.checks:
            print(f"  onnxruntime fp32 vs PyTorch at {c.shape}: max abs diff {c.max_abs_diff:.2e}")
        onnx_file = fp32_onnx
        if args.int8:
            from dsnet.export.quantize import quantize_onnx

            onnx_file = Path(tmp) / "int8.onnx"  # moved onto the output in one rename below
            count = min(len(calib_files), args.calib_images)
            print(
                f"  int8 static QDQ quantization, {args.calib_method} calibration on {count} image(s) of {args.calib}"
            )
            quantize_onnx(
                fp32_onnx, onnx_file, calib_files, info, max_images=args.calib_images, method=args.calib_method
            )
        if output.suffix.lower() == ".xml":
            from dsnet.export.openvino import export_openvino

            export_openvino(onnx_file, output)
        elif onnx_file != output:
            onnx_file.replace(output)
    write_artefact_info(
        output,
        info,
        exported_from=str(source) if source.exists() else args.source,
        fused=not args.no_fuse,
        int8=bool(args.int8),
        image_size=list(image_size),
        dynamic_batch=not args.static_batch,
        dynamic_size=args.dynamic_size,
    )
    if not args.int8 and output.suffix.lower() == ".xml":
        runtime, _ = load_for_inference(output, backend="openvino")
        shapes = [c.shape for c in report.checks]
        for c in check_onnx(model, output, shapes, runner=runtime):
            print(f"  openvino fp32 vs PyTorch at {c.shape}: max abs diff {c.max_abs_diff:.2e}")
            if c.max_abs_diff > 1e-4:
                raise DSNetError(f"OpenVINO IR {output} differs from PyTorch by {c.max_abs_diff:.2e} at {c.shape}")
    if args.int8:  # random inputs say nothing of an int8 graph: compare on the calibration images instead
        from dsnet.export.quantize import _calibration_batches

        runtime, _ = load_for_inference(output)
        agree = total = 0
        worst = 0.0
        with torch.no_grad():
            for batch in _calibration_batches(calib_files[: args.calib_images], info, 64):
                x = torch.from_numpy(batch)
                want, got = model(x), runtime(x)
                agree += int((want.argmax(1) == got.argmax(1)).sum())
                total += len(x)
                worst = max(worst, float((want - got).abs().max()))
        print(
            f"  int8 vs fp32 PyTorch on the {total} calibration images: same top-1 on {agree / total:.1%}, "
            f"max abs logit diff {worst:.3f}"
        )
    kind = "OpenVINO IR" if output.suffix.lower() == ".xml" else "ONNX"
    dynamic = f"dynamic batch: {report.dynamic_batch}, dynamic size: {report.dynamic_size}"
    print(f"wrote {output} ({kind}{', int8' if args.int8 else ''}, opset {report.opset}, {dynamic})")
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
    p.add_argument("--calib-images", type=int, default=512, help="at most this many calibration images (512)")
    p.add_argument("--calib-method", choices=("minmax", "percentile", "entropy"), default="minmax")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--threads", type=int, help="torch / runtime CPU threads")
    p.set_defaults(func=run)
