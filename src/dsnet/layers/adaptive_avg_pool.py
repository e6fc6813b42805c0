"""Adaptive average pooling that exports to ONNX with a dynamic input size.

``torch.export`` decomposes :func:`torch.nn.functional.adaptive_avg_pool2d` (when the input size is not a
multiple of the output size) into gathers unrolled over the largest bin length seen at trace time, so an
ONNX graph traced at one size fails or is wrong for smaller inputs. While exporting or tracing we therefore
write the pool as two small averaging matrices built from ``torch.arange`` of the (symbolic) input size:
output bin ``i`` of an axis of length ``L`` pooled to ``S`` averages positions ``[floor(i·L/S), ceil((i+1)·L/S))``,
exactly the bins of :func:`~torch.nn.functional.adaptive_avg_pool2d`, upsampling (``L < S``) included.
Eager mode keeps the native kernel.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsnet.errors import DSNetError

__all__ = ["AdaptiveAvgPool2d", "adaptive_avg_pool2d"]


def _pool_matrix(in_size: int, out_size: int, like: torch.Tensor) -> torch.Tensor:
    """(out_size, in_size) matrix whose row ``i`` averages the input positions of output bin ``i``."""
    bins = torch.arange(out_size, device=like.device)
    # floor / ceil divisions with non-negative operands: ONNX integer Div truncates, which then agrees
    start = (bins * in_size) // out_size  # (S,)
    end = ((bins + 1) * in_size + out_size - 1) // out_size  # (S,)
    positions = torch.arange(in_size, device=like.device)
    inside = (positions[None, :] >= start[:, None]) & (positions[None, :] < end[:, None])  # (S, L)
    weights = inside.to(like.dtype)
    return weights / weights.sum(dim=1, keepdim=True)


def adaptive_avg_pool2d(x: torch.Tensor, output_size: int | tuple[int, int]) -> torch.Tensor:
    """:func:`torch.nn.functional.adaptive_avg_pool2d` of ``x`` (B, C, H, W) that exports with a dynamic H, W.

    Under ``torch.export`` (which ``torch.onnx.export(dynamo=True)`` uses) or ``torch.jit`` tracing the pool is
    computed as ``P_h @ x @ P_wᵀ`` with averaging matrices derived from the symbolic input size; otherwise the
    native kernel runs. Both agree to float rounding.

    Example:
        >>> x = torch.randn(2, 3, 10, 5)
        >>> torch.allclose(adaptive_avg_pool2d(x, 7), F.adaptive_avg_pool2d(x, 7))
        True
    """
    if not (torch.compiler.is_exporting() or torch.jit.is_tracing()):
        return F.adaptive_avg_pool2d(x, output_size)
    return _pool_by_matrices(x, output_size)


def _pool_by_matrices(x: torch.Tensor, output_size: int | tuple[int, int]) -> torch.Tensor:
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    height, width = x.shape[-2:]
    pool_h = _pool_matrix(height, out_h, x)  # (S_h, H)
    pool_w = _pool_matrix(width, out_w, x)  # (S_w, W)
    return pool_h @ x @ pool_w.transpose(0, 1)  # (B, C, S_h, S_w)


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """:class:`torch.nn.AdaptiveAvgPool2d` that exports to ONNX with a dynamic input size (see
    :func:`adaptive_avg_pool2d`). Only integer output sizes (no ``None``) are supported."""

    def __init__(self, output_size: int | tuple[int, int]) -> None:
        if not isinstance(output_size, int) and (len(output_size) != 2 or None in output_size):
            raise DSNetError(f"AdaptiveAvgPool2d needs an int or a pair of ints as output_size, got {output_size}")
        super().__init__(output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adaptive_avg_pool2d(x, self.output_size)
