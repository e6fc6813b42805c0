"""ONNX → OpenVINO IR (``.xml`` + ``.bin``), checked against the ONNX graph in OpenVINO's CPU plugin.

The IR is converted from the ONNX file of :func:`dsnet.export.onnx.export_onnx` (one export path: PyTorch → ONNX →
IR), so it keeps that file's symbolic batch and image dimensions, and an int8 QDQ ONNX file becomes an int8 IR.
Weights stay fp32 (``compress_to_fp16=False``): OpenVINO's default fp16 weight compression alone moves logits by
~1e-3.
"""

from __future__ import annotations

import os
from pathlib import Path

from dsnet.errors import DSNetError

__all__ = ["export_openvino"]


def export_openvino(onnx_path: str | os.PathLike[str], xml_path: str | os.PathLike[str]) -> Path:
    """Convert ``onnx_path`` to OpenVINO IR at ``xml_path`` (its weights go to the ``.bin`` beside it)."""
    import openvino as ov

    xml_path = Path(xml_path)
    if xml_path.suffix.lower() != ".xml":
        raise DSNetError(f"an OpenVINO IR file name ends in .xml, got {xml_path}")
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return xml_path
