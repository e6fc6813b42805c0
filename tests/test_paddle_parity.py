"""Our DS-Net against the real PaddleClas DS-Net, through the real conversion path.

The reference model file (``ppcls/arch/backbone/model_zoo/dsnet.py`` of paddleclas 2.6.0, installed with
``--no-deps`` by ``scripts/test.sh``) is loaded by path under a private package name: its sibling
``vision_transformer.py`` is imported from the installed package as is, and only the ``save_load`` download helpers
are stubbed. Each variant gets random weights (BN running statistics included), is saved with ``paddle.save``,
converted with ``dsnet convert paddle`` and loaded with ``timm.create_model(..., pretrained=True)``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from dsnet.cli.main import main
from dsnet.convert.dsnet_reference import PADDLE_LINEAR_MODULES


def _import_paddle_keeping_environment() -> types.ModuleType:
    """Importing paddle sets OMP_NUM_THREADS=1 (and more) in os.environ, which every later subprocess of the test
    session (CLI runs, torchrun) would inherit; put the environment back as it was."""
    before = dict(os.environ)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No ccache found")  # paddle's C++-extension builder, unused here
        import paddle

    for key in set(os.environ) - set(before):
        del os.environ[key]
    os.environ.update(before)
    return paddle


paddle = _import_paddle_keeping_environment()

pytestmark = pytest.mark.paddle

TOLERANCE = 1e-4
#: (height, width) checked per variant: the training size and a non-square size that is not a multiple of 32,
#: so that every stage floors its patch grid and its global grid.
SIZES = [(224, 224), (200, 264)]
_PRIVATE_ROOT = "_dsnet_ppcls_reference"


def _load_reference_module() -> types.ModuleType:
    """Import PaddleClas' ``dsnet.py`` without executing ``ppcls/__init__.py`` (which pulls in unrelated deps)."""
    name = f"{_PRIVATE_ROOT}.arch.backbone.model_zoo.dsnet"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("paddleclas")
    assert spec is not None and spec.submodule_search_locations, "paddleclas is not installed (see scripts/test.sh)"
    ppcls = Path(spec.submodule_search_locations[0]) / "ppcls"
    zoo = ppcls / "arch" / "backbone" / "model_zoo"

    def package(dotted: str, path: Path | None) -> None:
        module = types.ModuleType(dotted)
        module.__path__ = [str(path)] if path else []  # a namespace whose __init__.py never runs
        sys.modules[dotted] = module

    package(_PRIVATE_ROOT, ppcls)
    package(f"{_PRIVATE_ROOT}.arch", ppcls / "arch")
    package(f"{_PRIVATE_ROOT}.arch.backbone", ppcls / "arch" / "backbone")
    package(f"{_PRIVATE_ROOT}.arch.backbone.model_zoo", zoo)
    package(f"{_PRIVATE_ROOT}.utils", None)
    save_load = types.ModuleType(f"{_PRIVATE_ROOT}.utils.save_load")

    def no_download(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the parity tests never download pretrained weights")

    save_load.load_dygraph_pretrain = no_download
    save_load.load_dygraph_pretrain_from_url = no_download
    sys.modules[save_load.__name__] = save_load

    module_spec = importlib.util.spec_from_file_location(name, zoo / "dsnet.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def _randomize(model: paddle.nn.Layer, seed: int) -> None:
    """Random weights with activations of order 1 through 38 blocks; BN running statistics far from (0, 1)."""
    rng = np.random.default_rng(seed)
    values = {}
    for key, value in model.state_dict().items():
        shape = list(value.shape)
        if key.endswith("._mean"):
            array = rng.normal(0.0, 0.2, shape)
        elif key.endswith("._variance"):
            array = rng.uniform(0.5, 2.0, shape)
        elif len(shape) == 1:
            array = rng.uniform(0.5, 1.5, shape) if key.endswith(".weight") else rng.normal(0.0, 0.1, shape)
        else:
            fan_in = shape[0] if len(shape) == 2 else int(np.prod(shape[1:]))  # Paddle Linear is [in, out]
            # q/k/v projections at full gain, so that attention maps are far from uniform; residual branches small
            gain = 1.0 if any(s in key for s in ("channel_up", "head", "patch_embed")) else 0.2
            array = rng.normal(0.0, gain / np.sqrt(fan_in), shape)
        values[key] = array.astype(np.float32)
    model.set_state_dict(values)


def _set_input_size(model: paddle.nn.Layer, height: int, width: int) -> None:
    """The reference asserts its build size in every PatchEmbed; tell it the size it will see (math unchanged)."""
    for k, stride in enumerate((1, 4, 8, 16), start=1):
        getattr(model, f"patch_embed{k}").img_size = (height // stride, width // stride)


def _convert(args: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["convert", *args]) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def reference() -> types.ModuleType:
    paddle.set_device("cpu")
    return _load_reference_module()


@pytest.mark.parametrize(
    ("paddle_name", "our_name", "seed"),
    [("DSNet_tiny", "dsnet_tiny", 0), ("DSNet_small", "dsnet_small", 1), ("DSNet_base", "dsnet_base", 2)],
)
def test_converted_weights_match_paddleclas_logits(reference, tmp_path, paddle_name, our_name, seed):
    paddle.seed(seed)
    ref = getattr(reference, paddle_name)()
    _randomize(ref, seed)
    ref.eval()
    pdparams, safetensors = tmp_path / f"{paddle_name}.pdparams", tmp_path / f"{our_name}.safetensors"
    paddle.save(ref.state_dict(), str(pdparams))

    report = _convert(["paddle", str(pdparams), str(safetensors), "--model", our_name])
    assert f"matches {our_name}" in report

    ours = timm.create_model(our_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(safetensors))).eval()
    rng = np.random.default_rng(100 + seed)
    for height, width in SIZES:
        x = rng.standard_normal((2, 3, height, width)).astype(np.float32)
        _set_input_size(ref, height, width)
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
    _randomize(ref, 7)
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
    _set_input_size(ref, 224, 224)
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
