"""Depth-wise convolution with a different kernel for every sample of the batch.

Dynamic convolutions (IDConv of TransXNet, DyConv, ...) predict their kernels from the input, so each sample
has its own depth-wise kernel. The usual trick folds the batch into the channels and runs one grouped
convolution with ``groups = B·C``; it is the fastest form in eager PyTorch, but ``groups`` is a static
attribute of an ONNX ``Conv``, so an export with a dynamic batch dimension cannot use it. While exporting
(``torch.export`` / ``torch.onnx.export``) or tracing, we therefore use an equivalent formulation whose
operators do not depend on the batch size: a fixed depth-wise convolution with one-hot kernels (groups = C)
lays out the ``K²`` shifted copies of the input, which are weighted by the per-sample kernel taps and summed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function

__all__ = ["per_sample_depthwise_conv2d"]


def _grouped_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    batch, channels, height, width = x.shape
    kernel_size = weight.shape[-1]
    out = F.conv2d(
        x.reshape(1, batch * channels, height, width),  # (1, B·C, H, W)
        weight.reshape(batch * channels, 1, kernel_size, kernel_size),  # (B·C, 1, K, K)
        bias=None if bias is None else bias.reshape(batch * channels),
        padding=kernel_size // 2,
        groups=batch * channels,
    )
    return out.reshape(batch, channels, height, width)


def _tap_products(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    channels = x.shape[1]
    kernel_size = weight.shape[-1]
    taps = kernel_size * kernel_size
    # A fixed depth-wise conv with one-hot kernels copies every tap's shifted input into its own channel.
    one_hot = torch.eye(taps, device=x.device, dtype=x.dtype).reshape(taps, 1, kernel_size, kernel_size)
    shifted = F.conv2d(x, one_hot.repeat(channels, 1, 1, 1), padding=kernel_size // 2, groups=channels)
    shifted = shifted.unflatten(1, (channels, taps))  # (B, C, K², H, W)
    out = (shifted * weight.flatten(2)[..., None, None]).sum(dim=2)  # (B, C, H, W)
    return out if bias is None else out + bias[:, :, None, None]


@register_notrace_function
def per_sample_depthwise_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Depth-wise 'same' convolution of each sample with its own kernels.

    Args:
        x: input of shape (B, C, H, W).
        weight: kernels of shape (B, C, K, K) with odd K; sample b, channel c is convolved with ``weight[b, c]``.
        bias: optional bias of shape (B, C).

    Returns:
        Tensor of shape (B, C, H, W).

    Eager mode runs one grouped convolution (``groups = B·C``). Under ``torch.export`` (which
    ``torch.onnx.export(dynamo=True)`` uses) or ``torch.jit`` tracing it runs the batch-size independent
    formulation of the module docstring instead, which exports to ONNX with a dynamic batch size.
    Both agree to float rounding.

    Example:
        >>> x = torch.randn(2, 3, 8, 8)
        >>> w = torch.zeros(2, 3, 3, 3)
        >>> w[:, :, 1, 1] = 2.0  # identity kernel, doubled
        >>> torch.allclose(per_sample_depthwise_conv2d(x, w), 2 * x)
        True
    """
    if torch.compiler.is_exporting() or torch.jit.is_tracing():
        return _tap_products(x, weight, bias)
    return _grouped_conv(x, weight, bias)
