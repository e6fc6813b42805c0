"""``dsnet export`` as functions: a zoo model or a trained run → a checked ONNX / OpenVINO IR artefact, fp32 or int8.

:func:`load_export_source` builds the model and its preprocessing from a model name or a checkpoint;
:func:`export_artefact` fuses nothing itself (pass :func:`dsnet.deploy.fuse` of the model, as the CLI does), exports
to ONNX with a symbolic batch (:func:`dsnet.export.onnx.export_onnx`, checked in ONNX Runtime), quantizes to int8 QDQ
on the user's calibration images, converts to OpenVINO IR for a ``.xml`` output (checked in OpenVINO), and writes the
sidecar ``<output>.json`` that predict, eval and serve read. Intermediate files live in a temporary folder beside the
output, so the output appears in one rename or not at all.

Example:
    >>> model, info = load_export_source("dsnet_tiny")  # doctest: +SKIP
    >>> export_artefact(fuse(model), info, "dsnet_tiny.onnx")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from dsnet._io import check_writable_folder
from dsnet.deploy.runtime import load_for_inference, write_artefact_info
from dsnet.engine.inference import CheckpointInfo, load_checkpoint
from dsnet.errors import DSNetError
from dsnet.export.onnx import ExportReport, check_onnx, export_onnx
from dsnet.export.openvino import export_openvino

__all__ = ["Int8Calibration", "check_export_output", "export_artefact", "load_export_source"]

#: Output suffixes and the artefact kind each one makes.
ARTEFACT_KINDS = {".onnx": "ONNX", ".xml": "OpenVINO IR"}


@dataclass(frozen=True)
class Int8Calibration:
    """int8 static QDQ quantization: calibration images (prepared as at inference), how many, which method."""

    files: Sequence[Path]
    max_images: int = 512
    method: str = "minmax"


def _info_for_model_name(model: nn.Module, name: str) -> CheckpointInfo:
    """Preprocessing of a bare model name: its timm pretrained config (ImageNet defaults otherwise)."""
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


def load_export_source(
    source: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    ema: bool = False,
    tag: str = "best",
) -> tuple[nn.Module, CheckpointInfo]:
    """The model to export and its preprocessing: a run folder / ``.safetensors`` of ``dsnet train``, or a timm model
    name (random weights, or ``weights`` such as a file of ``dsnet convert``; ``num_classes``/``in_chans`` set it)."""
    path = Path(source)
    if path.exists():
        if num_classes is not None or in_chans is not None:
            raise DSNetError("--num-classes/--in-chans apply to a model name; a checkpoint already fixes them")
        return load_checkpoint(path, ema=ema, tag=tag)
    name = str(source)
    if name not in timm.list_models():
        raise DSNetError(
            f"unknown model {name!r} and no such checkpoint; `dsnet info` lists the zoo, timm.list_models() the rest"
        )
    kwargs: dict[str, object] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    if weights:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(weights)})
    model = timm.create_model(name, **kwargs)
    return model, _info_for_model_name(model, name)


def _check_openvino(model: nn.Module, output: Path, report: ExportReport, log: Callable[[str], None]) -> None:
    runtime, _ = load_for_inference(output, backend="openvino")
    for c in check_onnx(model, output, [c.shape for c in report.checks], runner=runtime):
        log(f"  openvino fp32 vs PyTorch at {c.shape}: max abs diff {c.max_abs_diff:.2e}")
        if c.max_abs_diff > 1e-4:
            raise DSNetError(f"OpenVINO IR {output} differs from PyTorch by {c.max_abs_diff:.2e} at {c.shape}")


def _report_int8_agreement(
    model: nn.Module, output: Path, info: CheckpointInfo, calib: Int8Calibration, log: Callable[[str], None]
) -> None:
    """Random inputs say nothing of an int8 graph: compare it with the fp32 model on the calibration images."""
    from dsnet.export.quantize import _calibration_batches

    runtime, _ = load_for_inference(output)
    agree = total = 0
    worst = 0.0
    with torch.no_grad():
        for batch in _calibration_batches(calib.files[: calib.max_images], info, 64):
            x = torch.from_numpy(batch)
            want, got = model(x), runtime(x)
            agree += int((want.argmax(1) == got.argmax(1)).sum())
            total += len(x)
            worst = max(worst, float((want - got).abs().max()))
    log(
        f"  int8 vs fp32 PyTorch on the {total} calibration images: same top-1 on {agree / max(total, 1):.1%}, "
        f"max abs logit diff {worst:.3f}"
    )


def _write_model_file(
    model: nn.Module,
    info: CheckpointInfo,
    output: Path,
    tmp: Path,
    export_kwargs: dict[str, object],
    int8: Int8Calibration | None,
    log: Callable[[str], None],
) -> ExportReport:
    """ONNX export (checked in ONNX Runtime), then int8 quantization and/or the OpenVINO conversion, onto ``output``."""
    needs_temp = output.suffix.lower() == ".xml" or int8 is not None
    fp32_onnx = tmp / "fp32.onnx" if needs_temp else output
    report = export_onnx(model, fp32_onnx, in_chans=info.in_chans, **export_kwargs)
    for c in report.checks:
        log(f"  onnxruntime fp32 vs PyTorch at {c.shape}: max abs diff {c.max_abs_diff:.2e}")
    onnx_file = fp32_onnx
    if int8 is not None:
        from dsnet.export.quantize import quantize_onnx

        onnx_file = tmp / "int8.onnx"  # moved onto the output in one rename below
        count = min(len(int8.files), int8.max_images)
        log(f"  int8 static QDQ quantization, {int8.method} calibration on {count} image(s)")
        quantize_onnx(fp32_onnx, onnx_file, int8.files, info, max_images=int8.max_images, method=int8.method)
    if output.suffix.lower() == ".xml":
        export_openvino(onnx_file, output)
    elif onnx_file != output:
        onnx_file.replace(output)
    return report


def check_export_output(output: str | os.PathLike[str]) -> Path:
    """``output`` as a Path if it names an artefact kind (``.onnx``/``.xml``) in a writable folder (created if needed);
    otherwise one clear :class:`DSNetError`. Cheap: callers run it before building the model."""
    output = Path(output)
    if output.suffix.lower() not in ARTEFACT_KINDS:
        raise DSNetError(f"output {output} must end in .onnx (ONNX) or .xml (OpenVINO IR)")
    check_writable_folder(output.parent, f"output {output}")
    return output


def export_artefact(
    model: nn.Module,
    info: CheckpointInfo,
    output: str | os.PathLike[str],
    *,
    image_size: tuple[int, int] | None = None,
    dynamic_batch: bool = True,
    dynamic_size: bool = False,
    opset: int = 18,
    int8: Int8Calibration | None = None,
    sidecar: dict[str, object] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Export ``model`` (eval mode; fused or not, as given) to ``output`` (``.onnx`` or ``.xml``), check it in its
    runtime (fp32: logits within 1e-4 of PyTorch; int8: top-1 agreement on the calibration images is printed), and
    write the sidecar ``<output>.json`` with ``info`` and ``sidecar``'s extra fields. Returns ``output``."""
    output = check_export_output(output)
    if int8 is not None and not int8.files:
        raise DSNetError("int8 quantization needs calibration images (--calib DIR: a folder of images like the inputs)")
    image_size = image_size or (info.input_size, info.input_size)
    export_kwargs = dict(image_size=image_size, dynamic_batch=dynamic_batch, dynamic_size=dynamic_size, opset=opset)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:  # same file system: the final move is a rename
        report = _write_model_file(model.eval(), info, output, Path(tmp), export_kwargs, int8, log)
    extra = dict(sidecar or {})
    extra.update(int8=int8 is not None, image_size=list(image_size), dynamic_batch=dynamic_batch)
    write_artefact_info(output, info, dynamic_size=dynamic_size, **extra)
    if int8 is None and output.suffix.lower() == ".xml":
        _check_openvino(model, output, report, log)
    if int8 is not None:
        _report_int8_agreement(model, output, info, int8, log)
    dynamic = f"dynamic batch: {report.dynamic_batch}, dynamic size: {report.dynamic_size}"
    kind = ARTEFACT_KINDS[output.suffix.lower()] + (", int8" if int8 is not None else "")
    log(f"wrote {output} ({kind}, opset {report.opset}, {dynamic})")
    return output
