"""The real PaddleClas DS-Net, loaded by path: the reference our conversion and our speed are measured against.

Used by ``tests/test_paddle_parity.py`` (logit parity of converted weights) and ``benchmarks/throughput.py --paddle``
(speed side by side). Needs ``paddlepaddle`` and ``paddleclas==2.6.0`` installed with ``--no-deps``
(``scripts/test.sh``). Test-only code: it lives beside the tests, outside the package, so :mod:`dsnet` never depends on
Paddle; the benchmark imports it from here.

The reference model file (``ppcls/arch/backbone/model_zoo/dsnet.py``) is imported under a private package name
without executing ``ppcls/__init__.py`` (which pulls in unrelated dependencies): its sibling
``vision_transformer.py`` is imported from the installed package as is, and only the ``save_load`` download helpers
are stubbed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from dsnet.errors import DSNetError

__all__ = [
    "import_paddle",
    "load_reference_dsnet",
    "randomize_reference",
    "set_paddle_threads",
    "set_reference_input_size",
]

_PRIVATE_ROOT = "_dsnet_ppcls_reference"


def import_paddle() -> types.ModuleType:
    """Import paddle and give back ``os.environ`` as it was before.

    Importing paddle sets ``OMP_NUM_THREADS=1`` (and more) in ``os.environ``, which every later subprocess (CLI runs,
    torchrun) would inherit. Paddle's own math-library threads are set with :func:`set_paddle_threads`.
    """
    before = dict(os.environ)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        # paddle's C++-extension builder warns about ccache, and its bootstrap warns when OMP_NUM_THREADS > 1
        warnings.filterwarnings("ignore", message="No ccache found")
        import paddle

    for key in set(os.environ) - set(before):
        del os.environ[key]
    os.environ.update(before)
    return paddle


def set_paddle_threads(threads: int) -> None:
    """Let Paddle's CPU kernels use ``threads`` threads (MKL and OpenMP).

    Paddle starts with one (its flag ``FLAGS_paddle_num_threads`` defaults to 1) whatever ``OMP_NUM_THREADS`` says;
    this is the dygraph counterpart of ``torch.set_num_threads``.
    """
    if threads < 1:
        raise DSNetError(f"threads must be >= 1, got {threads}")
    paddle = import_paddle()
    paddle.base.core.set_num_threads(threads)


def load_reference_dsnet() -> types.ModuleType:
    """PaddleClas' ``dsnet.py`` as a module (``DSNet_tiny``, ``DSNet_small``, ``DSNet_base``), imported once."""
    name = f"{_PRIVATE_ROOT}.arch.backbone.model_zoo.dsnet"
    if name in sys.modules:
        return sys.modules[name]
    import_paddle()  # before the model file imports it, so that the environment is kept
    spec = importlib.util.find_spec("paddleclas")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("paddleclas is not installed (see scripts/test.sh)")
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
        raise RuntimeError("the reference is only ever built with random weights here; nothing is downloaded")

    save_load.load_dygraph_pretrain = no_download
    save_load.load_dygraph_pretrain_from_url = no_download
    sys.modules[save_load.__name__] = save_load

    module_spec = importlib.util.spec_from_file_location(name, zoo / "dsnet.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def randomize_reference(model: Any, seed: int) -> None:
    """Random weights for a reference ``paddle.nn.Layer``, with activations of order 1 through 38 blocks (the
    reference's own initialisation gives logits of order 1e7) and BN running statistics far from (0, 1)."""
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


def set_reference_input_size(model: Any, height: int, width: int) -> None:
    """The reference asserts its build size in every PatchEmbed; tell a built ``paddle.nn.Layer`` the size it will
    see (the math is unchanged)."""
    for k, stride in enumerate((1, 4, 8, 16), start=1):
        getattr(model, f"patch_embed{k}").img_size = (height // stride, width // stride)
