"""Scaled dot-product attention that keeps PyTorch's fused CPU kernel at inference.

``torch.nn.functional.scaled_dot_product_attention`` on CPU takes its fused (flash) kernel only when q, k and v have a
unit stride along the head dimension and the mask does not require grad; otherwise it silently falls back to the
unfused math path (a ``bmm``, a masked softmax, a second ``bmm``). Our models build q/k/v from NCHW convolution outputs
(head dimension strided by H·W) and pass relative-position biases that are Parameters, so at inference they would
always take the slow path. :func:`attention` makes the inputs fit when autograd is off and leaves training untouched
(same kernel, same numerics as before). ``benchmarks/throughput.py`` measures the effect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attention"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p)`` on (B, heads, N, d) tensors.

    Without autograd (``torch.no_grad``/``torch.inference_mode``) q, k, v are made contiguous and the mask is detached,
    so that the fused CPU kernel applies; the result equals the math path's up to float rounding (~1e-6).

    Example:
        >>> q = torch.randn(2, 4, 16, 8).transpose(-1, -2).contiguous().transpose(-1, -2)  # head dim strided
        >>> with torch.no_grad():
        ...     out = attention(q, q, q)
        >>> torch.allclose(out, F.scaled_dot_product_attention(q, q, q), atol=1e-5)
        True
    """
    if not torch.is_grad_enabled():
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        attn_mask = None if attn_mask is None else attn_mask.detach()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
