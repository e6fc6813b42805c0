"""ONNX export with an onnxruntime parity check.

The export goes through the dynamo-based :func:`torch.onnx.export` with symbolic batch (and, optionally,
height and width) dimensions. Sizes that a model computes from its input with ``int()`` would be baked into
the graph as constants, and torch.export specializes every dimension that is 1 in the example: trace with an
example large enough that no feature map has a side of 1 (≥ 128 px for the models of this zoo; the global
stream of DS-Net's last stage is 1×1 below that). The parity check therefore runs onnxruntime at a second
batch size and, for dynamic spatial sizes, at a second image size, and compares with PyTorch.

A model class can adjust a dynamic-size export with three class attributes (read with defaults):

* ``onnx_min_size`` (default 32): the smallest height/width the symbolic dimensions admit;
* ``onnx_trace_size`` (default 0): trace at least this large, so that no stage takes a special case at the example
  (MixFormer: a stage of one attention window specializes the window count to 1);
* ``onnx_deferred_asserts`` (default False): export through :func:`torch.export.export` with
  ``prefer_deferred_runtime_asserts_over_guards=True``. Shape guards that torch.export's symbolic reasoning cannot
  prove for every size (MixFormer's nested window / even-size padding arithmetic: ``n ≤ 7·ceil(n/7)``, "the padding
  is not zero", ...) then become runtime assertions of the exported program instead of export failures; the ONNX
  graph carries no such assertion, and the parity checks (tests: several sizes on both sides of every case) show
  that it computes the model at every size.

Example:
    >>> import timm, dsnet
    >>> from dsnet.export.onnx import export_onnx
    >>> model = timm.create_model("dsnet_tiny", num_classes=10)
    >>> report = export_onnx(model, "dsnet_tiny.onnx", image_size=(128, 128), dynamic_size=True)  # doctest: +SKIP
    >>> report.max_abs_diff < 1e-4  # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dsnet._io import atomic_write
from dsnet.errors import DSNetError


@dataclass
class ParityCheck:
    """onnxruntime vs PyTorch on one input shape."""

    shape: tuple[int, ...]
    max_abs_diff: float


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and measured."""

    path: Path
    opset: int
    dynamic_batch: bool
    dynamic_size: bool
    checks: list[ParityCheck] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        """Largest absolute difference over every parity check (0.0 when none ran)."""
        return max((c.max_abs_diff for c in self.checks), default=0.0)


def _dynamic_shapes(dynamic_batch: bool, dynamic_size: bool, min_size: int) -> tuple[dict[int, object]] | None:
    from torch.export import Dim

    dims: dict[int, object] = {}
    if dynamic_batch:
        dims[0] = Dim("batch", min=1, max=4096)
    if dynamic_size:
        dims[2] = Dim("height", min=min_size, max=8192)
        dims[3] = Dim("width", min=min_size, max=8192)
    return (dims,) if dims else None


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    image_size: tuple[int, int] = (224, 224),
    in_chans: int | None = None,
    dynamic_batch: bool = True,
    dynamic_size: bool = False,
    opset: int = 18,
    check: bool = True,
    atol: float = 1e-4,
    verbose: bool = False,
) -> ExportReport:
    """Export ``model`` (in eval mode, on CPU, fp32) to ONNX at ``path`` and check it with onnxruntime.

    Args:
        model: any image model taking ``(B, C, H, W)``; its ``in_chans`` attribute gives C unless ``in_chans`` is set.
        path: output ``.onnx`` file; written atomically (temporary file, then rename).
        image_size: (H, W) of the example input used for tracing.
        in_chans: input channels; default ``model.in_chans`` or 3.
        dynamic_batch: make the batch dimension symbolic (the example batch is 2: a batch of 1 would specialize).
        dynamic_size: make height and width symbolic too (from 32 px, or the model's ``onnx_min_size``); trace at
            ≥ 128 px (see the module doc; a model's ``onnx_trace_size`` raises the example size).
        opset: ONNX opset version.
        check: run onnxruntime at two batch sizes (and a second image size when ``dynamic_size``) and compare.
        atol: largest accepted absolute difference; above it a :class:`~dsnet.errors.DSNetError` reports the figures.
        verbose: show the exporter's progress output.

    Returns:
        An :class:`ExportReport` with the parity figures.
    """
    path = Path(path)
    if image_size[0] < 32 or image_size[1] < 32:
        raise DSNetError(f"image_size must be at least 32×32 for export, got {image_size}")
    if dynamic_size and not getattr(model, "onnx_dynamic_size", True):
        raise DSNetError(
            f"{type(model).__name__} does not export with a symbolic image size; "
            "export at a fixed image_size (dynamic_size=False, or drop --dynamic-size)"
        )
    chans = in_chans if in_chans is not None else int(getattr(model, "in_chans", 3))
    model = model.eval().to("cpu", torch.float32)
    min_size = int(getattr(model, "onnx_min_size", 32))
    trace_size = image_size
    if dynamic_size:
        if min(image_size) < min_size:
            raise DSNetError(
                f"{type(model).__name__} exports a symbolic image size from {min_size} px, got {image_size}"
            )
        trace_size = tuple(max(side, int(getattr(model, "onnx_trace_size", 0))) for side in image_size)
    example = torch.randn(2 if dynamic_batch else 1, chans, *trace_size)

    def write(tmp: Path) -> None:
        sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        dynamic_shapes = _dynamic_shapes(dynamic_batch, dynamic_size, min_size)
        with torch.no_grad(), sink:
            exported: nn.Module | torch.export.ExportedProgram = model
            if dynamic_size and getattr(model, "onnx_deferred_asserts", False):
                exported = torch.export.export(
                    model, (example,), dynamic_shapes=dynamic_shapes, prefer_deferred_runtime_asserts_over_guards=True
                )
            torch.onnx.export(
                exported,
                (example,),
                str(tmp),
                dynamo=True,
                opset_version=opset,
                input_names=["image"],
                output_names=["output"],
                dynamic_shapes=None if exported is not model else dynamic_shapes,
                external_data=False,
            )

    atomic_write(path, write)
    report = ExportReport(path=path, opset=opset, dynamic_batch=dynamic_batch, dynamic_size=dynamic_size)
    if check:
        shapes = [(example.shape[0], chans, *image_size)]
        if dynamic_batch:
            shapes.append((3, chans, *image_size))
        if dynamic_size:
            shapes.append((1 if not dynamic_batch else 2, chans, image_size[0] + 17, image_size[1] + 9))
        report.checks = check_onnx(model, path, shapes)
        if report.max_abs_diff > atol:
            raise DSNetError(
                f"ONNX export of {type(model).__name__} to {path} differs from PyTorch: "
                + ", ".join(f"{c.shape}: {c.max_abs_diff:.2e}" for c in report.checks)
                + f" (tolerance {atol:g})"
            )
    return report


@torch.no_grad()
def check_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    shapes: list[tuple[int, ...]],
    runner: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[ParityCheck]:
    """Run the file at ``path`` on random inputs of each shape; compare with ``model``.

    ``runner`` runs the file (any backend of :mod:`dsnet.deploy.runtime`); default an onnxruntime session.
    """
    if runner is None:
        from dsnet.deploy.runtime import OnnxRuntimeModel

        runner = OnnxRuntimeModel(path)
    model = model.eval()
    generator = torch.Generator().manual_seed(0)
    checks = []
    for shape in shapes:
        x = torch.randn(shape, generator=generator)
        expected = model(x)
        if isinstance(expected, (list, tuple)):
            expected = expected[0]
        diff = float((expected - runner(x)).abs().max())
        checks.append(ParityCheck(shape=tuple(shape), max_abs_diff=diff))
    return checks
