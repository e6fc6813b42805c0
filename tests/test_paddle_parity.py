"""Our DS-Net against the real PaddleClas DS-Net, through the real conversion path.

The reference model file (``ppcls/arch/backbone/model_zoo/dsnet.py`` of paddleclas 2.6.0, installed with
``--no-deps`` by ``scripts/test.sh``) is loaded by path (``tests/_paddle_reference.py``, shared with
``benchmarks/throughput.py --paddle``). Each variant gets random weights (BN running statistics included), is saved with
``paddle.save``, converted with ``dsnet convert paddle`` and loaded with ``timm.create_model(..., pretrained=True)``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from types import ModuleType

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from _paddle_reference import (
    import_paddle,
    load_reference_dsnet,
    randomize_reference,
    set_reference_input_size,
)
from dsnet.cli.main import main
from dsnet.convert.dsnet_reference import PADDLE_LINEAR_MODULES

paddle = import_paddle()  # keeps os.environ as it was (paddle sets OMP_NUM_THREADS=1)

pytestmark = pytest.mark.paddle

TOLERANCE = 1e-4
#: (height, width) checked per variant: the training size, a non-square size that is not a multiple of 32 (so that
#: every stage floors its patch grid and its global grid), and the smallest square size at which no global grid has
#: a 1-token side (below it PaddleClas' resize takes the first row instead of the centre: see the README).
SIZES = [(224, 224), (200, 264), (128, 128)]


def _convert(args: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["convert", *args]) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def reference() -> ModuleType:
    paddle.set_device("cpu")
    return load_reference_dsnet()


@pytest.mark.parametrize(
    ("paddle_name", "our_name", "seed"),
    [("DSNet_tiny", "dsnet_tiny", 0), ("DSNet_small", "dsnet_small", 1), ("DSNet_base", "dsnet_base", 2)],
)
def test_converted_weights_match_paddleclas_logits(reference, tmp_path, paddle_name, our_name, seed):
    paddle.seed(seed)
    ref = getattr(reference, paddle_name)()
    randomize_reference(ref, seed)
    ref.eval()
    pdparams, safetensors = tmp_path / f"{paddle_name}.pdparams", tmp_path / f"{our_name}.safetensors"
    paddle.save(ref.state_dict(), str(pdparams))

    report = _convert(["paddle", str(pdparams), str(safetensors), "--model", our_name])
    assert f"matches {our_name}" in report

    ours = timm.create_model(our_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(safetensors))).eval()
    rng = np.random.default_rng(100 + seed)
    for height, width in SIZES:
        x = rng.standard_normal((2, 3, height, width)).astype(np.float32)
        set_reference_input_size(ref, height, width)
        with paddle.no_grad():
            expected = ref(paddle.to_tensor(x)).numpy()
        with torch.no_grad():
            got = ours(torch.from_numpy(x)).numpy()
        diff = float(np.abs(got - expected).max())
        print(f"{our_name} {height}x{width}: max |logit| {np.abs(expected).max():.3f}, max abs diff {diff:.2e}")
        assert got.shape == expected.shape == (2, 1000)
        assert diff <= TOLERANCE, f"{our_name} at {height}x{width}: max abs diff {diff:.3e} > {TOLERANCE}"


@pytest.fixture(scope="module")
def tiny_reference(reference, tmp_path_factory):
    """A random DSNet_tiny, its .pdparams, and our conversion of it."""
    folder = tmp_path_factory.mktemp("tiny")
    paddle.seed(7)
    ref = reference.DSNet_tiny()
    randomize_reference(ref, 7)
    ref.eval()
    pdparams = folder / "tiny.pdparams"
    paddle.save(ref.state_dict(), str(pdparams))
    converted = folder / "tiny.safetensors"
    _convert(["paddle", str(pdparams), str(converted)])  # the model is inferred from the blocks per stage
    return ref, pdparams, converted


def test_paddle_linear_list_is_exactly_the_reference_linears(tiny_reference):
    ref, _, _ = tiny_reference
    linears = {name.split(".")[-1] for name, layer in ref.named_sublayers() if isinstance(layer, paddle.nn.Linear)}
    assert linears == set(PADDLE_LINEAR_MODULES)


def _torch_layout(ref: paddle.nn.Layer) -> dict[str, torch.Tensor]:
    """The reference weights as the PyTorch DS-Net stores them, derived from the Paddle layer types (not our map)."""
    state = {k: torch.from_numpy(v.numpy().copy()) for k, v in ref.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for name, layer in ref.named_sublayers():
        if isinstance(layer, paddle.nn.Linear):
            out[f"{name}.weight"] = state.pop(f"{name}.weight").t().contiguous()
            out[f"{name}.bias"] = state.pop(f"{name}.bias")
        elif isinstance(layer, paddle.nn.BatchNorm2D):
            out[f"{name}.weight"] = state.pop(f"{name}.weight")
            out[f"{name}.bias"] = state.pop(f"{name}.bias")
            out[f"{name}.running_mean"] = state.pop(f"{name}._mean")
            out[f"{name}.running_var"] = state.pop(f"{name}._variance")
            out[f"{name}.num_batches_tracked"] = torch.tensor(1234)
    out.update(state)  # convolutions and LayerNorms: the same layout in both frameworks
    return out


def test_torch_layout_converts_to_the_same_weights(tiny_reference, tmp_path):
    ref, _, from_paddle = tiny_reference
    torch_state = _torch_layout(ref)
    # a DeiT-style training checkpoint, saved from a DistributedDataParallel-wrapped model
    checkpoint = {
        "model": {f"module.{k}": v for k, v in torch_state.items()},
        "epoch": 299,
        "args": argparse.Namespace(model="ds_net_tiny", lr=1e-3),
    }
    pth, out = tmp_path / "ds_net_tiny.pth", tmp_path / "from_torch.safetensors"
    torch.save(checkpoint, pth)

    report = _convert(["torch", str(pth), str(out)])
    assert "entry 'model'" in report and "dsnet_tiny" in report

    a, b = load_file(str(from_paddle)), load_file(str(out))
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("num_batches_tracked"):  # Paddle keeps no counter: 0 there, the file's value here
            assert int(a[key]) == 0 and int(b[key]) == 1234
        else:
            assert torch.equal(a[key], b[key]), key


def test_parity_detects_a_wrong_transpose_and_unused_running_stats(tiny_reference):
    """Negative controls: the tolerance catches the mistakes a shape check cannot (square Linear, BN statistics)."""
    ref, _, converted = tiny_reference
    x = np.random.default_rng(3).standard_normal((2, 3, 224, 224)).astype(np.float32)
    set_reference_input_size(ref, 224, 224)
    with paddle.no_grad():
        expected = ref(paddle.to_tensor(x)).numpy()
    good = load_file(str(converted))
    for broken_key, corrupt in [
        ("stages.0.blocks.0.alignment.global_proj.weight", lambda w: w.t()),  # fuse_channel_sa left [in, out]
        ("norm.running_var", torch.ones_like),  # final BN statistics ignored
    ]:
        state = dict(good)
        state[broken_key] = corrupt(state[broken_key]).contiguous()
        model = timm.create_model("dsnet_tiny").eval()
        model.load_state_dict(state)
        with torch.no_grad():
            diff = float(np.abs(model(torch.from_numpy(x)).numpy() - expected).max())
        assert diff > 100 * TOLERANCE, f"corrupting {broken_key} went unnoticed (diff {diff:.2e})"
