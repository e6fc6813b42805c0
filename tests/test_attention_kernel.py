"""``dsnet.layers.attention``: at inference every family's attention runs PyTorch's fused CPU kernel, same values.

Which kernel ran is read from the profiler's op names (``aten::_scaled_dot_product_attention_math`` is the unfused
fallback), not from timings.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import dsnet  # noqa: F401  (registers the zoo)
from dsnet.layers.attention import attention

MATH = "aten::_scaled_dot_product_attention_math"


def _attention_ops(fn) -> list[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted(
        {
            e.key
            for e in prof.key_averages()
            if "scaled_dot_product" in e.key and e.key != "aten::scaled_dot_product_attention"
        }
    )


def _strided_inputs() -> tuple[torch.Tensor, ...]:
    """q/k/v with the head dimension strided (as from an NCHW convolution) and a bias that is a Parameter."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 8, n).transpose(-1, -2) for n in (40, 12, 12))  # (B, heads, N, d)
    bias = torch.nn.Parameter(torch.randn(1, 3, 40, 12))
    return q, k, v, bias


def test_inference_takes_the_fused_kernel_and_matches_the_math_path():
    q, k, v, bias = _strided_inputs()
    with torch.inference_mode():
        assert _attention_ops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)) == [MATH]  # the trap
        assert MATH not in _attention_ops(lambda: attention(q, k, v, attn_mask=bias))
        torch.testing.assert_close(
            attention(q, k, v, attn_mask=bias),
            F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
            atol=1e-5,
            rtol=0,
        )


def test_training_is_left_as_it_was():
    """With autograd on, the same call as plain SDPA (same kernel, identical values, gradients reach the bias)."""
    q, k, v, bias = _strided_inputs()
    out = attention(q, k, v, attn_mask=bias)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
    out.sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("dsnet_tiny", {"depths": (1, 1, 1, 1)}),
        ("transxnet_t", {"depths": (1, 1, 1, 1)}),
        ("mixformer_b0", {"depths": (1, 1, 1, 1)}),
        ("mobile_former_26m", {}),
    ],
)
def test_every_family_runs_fused_attention_at_inference(name, kwargs):
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        ops = _attention_ops(lambda: model(x))
    assert ops and MATH not in ops, ops
