"""int8 post-training quantization of an ONNX file: ONNX Runtime static quantization in the QDQ format.

Activations get uint8 and weights int8 per-channel scales (ONNX Runtime's recommended x86 CPU setting), calibrated on
images that the user points to, prepared exactly as at inference (the artefact's eval transform). The QDQ file runs in
ONNX Runtime and converts to an int8 OpenVINO IR (:func:`dsnet.export.openvino.export_openvino`).

Example:
    >>> quantize_onnx("model.onnx", "model.int8.onnx", collect_images(["calib/"]), info)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dsnet.data.images import ImageLoadError, load_image
from dsnet.engine.inference import CheckpointInfo
from dsnet.errors import DSNetError

if TYPE_CHECKING:
    import onnx

__all__ = ["CALIBRATION_METHODS", "quantize_onnx", "quantize_onnx_batches"]

#: Calibration methods of onnxruntime.quantization (how the activation ranges are chosen).
CALIBRATION_METHODS: tuple[str, ...] = ("minmax", "percentile", "entropy")


def _calibration_batches(files: Sequence[Path], info: CheckpointInfo, batch_size: int) -> Iterator[np.ndarray]:
    import torch

    transform = info.transform()
    mode = "L" if info.in_chans == 1 else "RGB"
    batch: list[torch.Tensor] = []
    for path in files:
        try:
            batch.append(transform(load_image(path, mode)))
        except ImageLoadError:
            continue  # an unreadable calibration image is skipped, as in evaluation
        if len(batch) == batch_size:
            yield torch.stack(batch).numpy()
            batch = []
    if batch:
        yield torch.stack(batch).numpy()


def quantize_onnx(
    onnx_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    files: Sequence[Path],
    info: CheckpointInfo,
    *,
    max_images: int = 512,
    batch_size: int = 32,
    method: str = "minmax",
) -> Path:
    """Write the int8 QDQ form of ``onnx_path`` to ``output``, calibrated on up to ``max_images`` of ``files``.

    Raises:
        DSNetError: no image given, ``max_images`` below 1, none of the images readable, or an unknown calibration
            method.
    """
    if max_images < 1:
        raise DSNetError(f"int8 calibration needs at least 1 image, got max_images={max_images}")
    if not files:
        raise DSNetError("int8 calibration needs images: point --calib at a folder of images like the inputs")
    chosen = list(files)[:max_images]
    if next(_calibration_batches(chosen, info, 1), None) is None:  # stops at the first readable image
        raise DSNetError(
            f"int8 calibration: none of the {len(chosen)} calibration images could be read as an image "
            f"(first: {chosen[0]}); point --calib at a folder of images like the inputs"
        )
    return quantize_onnx_batches(
        onnx_path, output, lambda: _calibration_batches(chosen, info, batch_size), method=method
    )


def _unshare_biases(model: onnx.ModelProto) -> int:
    """Give every node of the main graph its own copy of a bias initializer (input 2) that it shares with an earlier
    node; returns how many copies were made.

    ONNX Runtime's QDQ quantizer makes such a copy itself, but names it by appending a number to the initializer's name
    (``val_30`` → ``val_301``) without checking the names that nodes produce, so in a torch.onnx graph, whose values
    are all called ``val_<n>``, the copy can take the name of an activation and quantization fails ("shared mode is not
    supported for weight"); GroupNorm(1) exports as InstanceNormalization nodes that all share one bias.
    """
    import onnx

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    taken = set(initializers) | {name for node in graph.node for name in (*node.input, *node.output)}
    taken |= {value.name for value in (*graph.input, *graph.output)}
    seen: set[str] = set()
    copies = 0
    for node in graph.node:
        if len(node.input) < 3 or node.input[2] not in initializers:
            continue
        name = node.input[2]
        if name not in seen:
            seen.add(name)
            continue
        copy_name = f"{name}.bias_of.{node.name or copies}"
        while copy_name in taken:
            copy_name += "_"
        copy = onnx.TensorProto()
        copy.CopyFrom(initializers[name])
        copy.name = copy_name
        graph.initializer.append(copy)
        taken.add(copy_name)
        node.input[2] = copy_name
        copies += 1
    return copies


def quantize_onnx_batches(
    onnx_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    batches: Callable[[], Iterable[np.ndarray]],
    *,
    method: str = "minmax",
) -> Path:
    """Write the int8 QDQ form of ``onnx_path`` to ``output``, calibrated on the float32 ``(B, C, H, W)`` arrays
    that ``batches()`` yields (already preprocessed as at inference; called once per calibration pass).

    Raises:
        DSNetError: an unknown calibration method.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    methods["entropy"] = CalibrationMethod.Entropy
    if method not in methods:
        raise DSNetError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches())

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"image": batch}

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(prepared)
        if _unshare_biases(model):
            onnx.save(model, prepared)
        quantize_static(
            str(prepared),
            str(output),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=methods[method],
        )
    return output
