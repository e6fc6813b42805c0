"""Depth-wise convolution with a different kernel for every sample of the batch.

Dynamic convolutions (IDConv of TransXNet, DyConv, ...) predict their kernels from the input, so each sample
has its own depth-wise kernel. The usual trick folds the batch into the channels and runs one grouped
convolution with ``groups = B·C``; it is the fastest form in eager PyTorch, but ``groups`` is a static
attribute of an ONNX ``Conv``, so an export with a dynamic batch dimension cannot use it. While exporting
(``torch.export`` / ``torch.onnx.export``) we therefore scan over the batch: one depth-wise convolution
(groups = C) per sample, its kernel an input of the loop body, which ONNX expresses as a ``Scan`` whose body
holds a single ``Conv``. ``torch.jit`` tracing has no scan; there a fixed depth-wise convolution with one-hot
kernels lays out the ``K²`` shifted copies of the input, which are weighted by the per-sample kernel taps and
summed. Both forms export with a dynamic batch; the scan does ``K²`` times less work than the tap products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function
from torch._higher_order_ops.scan import scan  # private in torch 2.14, but what torch.export lowers to ONNX Scan

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


def _scanned_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    channels = x.shape[1]
    padding = weight.shape[-1] // 2

    def one_sample(carry: torch.Tensor, sample: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        image, kernels = sample  # (C, H, W), (C, K, K)
        out = F.conv2d(image[None], kernels[:, None], padding=padding, groups=channels)[0]
        return carry.clone(), out  # the carry is unused; scan needs one and may not alias it

    _, out = scan(one_sample, x.new_zeros(()), (x, weight))
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
    ``torch.onnx.export(dynamo=True)`` uses) it scans a depth-wise convolution over the batch, under
    ``torch.jit`` tracing it sums one-hot tap products (see the module docstring); both export to ONNX with a
    dynamic batch size. All three agree to float rounding.

    Example:
        >>> x = torch.randn(2, 3, 8, 8)
        >>> w = torch.zeros(2, 3, 3, 3)
        >>> w[:, :, 1, 1] = 2.0  # identity kernel, doubled
        >>> torch.allclose(per_sample_depthwise_conv2d(x, w), 2 * x)
        True
    """
    if torch.compiler.is_exporting():
        return _scanned_conv(x, weight, bias)
    if torch.jit.is_tracing():
        return _tap_products(x, weight, bias)
    return _grouped_conv(x, weight, bias)
