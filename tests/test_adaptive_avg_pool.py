"""The export-friendly adaptive average pool matches F.adaptive_avg_pool2d bin for bin, at any input size."""

from __future__ import annotations

import contextlib
import io

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from dsnet.layers.adaptive_avg_pool import AdaptiveAvgPool2d, _pool_by_matrices, adaptive_avg_pool2d

# (H, W) inputs: multiples, non-multiples, primes, 1-pixel and upsampling cases (input smaller than output).
SIZES = [(14, 14), (7, 7), (8, 8), (9, 13), (32, 32), (31, 17), (50, 40), (145, 137), (5, 3), (1, 1), (2, 11)]


@pytest.mark.parametrize("output_size", [7, (3, 5), 1, (12, 9)])
@pytest.mark.parametrize("size", SIZES)
def test_matrix_form_matches_native_pool(size, output_size):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    expected = F.adaptive_avg_pool2d(x, output_size)
    torch.testing.assert_close(_pool_by_matrices(x, output_size), expected, rtol=0, atol=1e-12)


def test_eager_path_is_the_native_pool():
    x = torch.randn(2, 3, 10, 6)
    assert torch.equal(adaptive_avg_pool2d(x, 7), F.adaptive_avg_pool2d(x, 7))
    assert torch.equal(AdaptiveAvgPool2d((4, 3))(x), F.adaptive_avg_pool2d(x, (4, 3)))


def test_one_onnx_export_serves_every_input_size(tmp_path):
    """Exported at 20×20 with symbolic H, W: onnxruntime is exact at smaller, larger and upsampled sizes.

    The native pool exported the same way fails (out-of-range gathers) below 20 px and is wrong above.
    """
    path = tmp_path / "pool.onnx"
    height, width = torch.export.Dim("height", min=2, max=256), torch.export.Dim("width", min=2, max=256)
    example = torch.randn(2, 3, 20, 20)
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            AdaptiveAvgPool2d(7),
            (example,),
            path,
            dynamo=True,
            dynamic_shapes=({2: height, 3: width},),
            input_names=["x"],
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in [(20, 20), (3, 5), (9, 13), (32, 32), (145, 137)]:
        x = torch.randn(2, 3, *size)
        (out,) = session.run(None, {"x": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), F.adaptive_avg_pool2d(x, 7), rtol=0, atol=1e-5)


def test_rejects_unspecified_output_size():
    with pytest.raises(ValueError, match="output_size"):
        AdaptiveAvgPool2d((None, 7))
