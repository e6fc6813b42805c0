"""Shared test helpers: checkpoints in the official layouts of the peer models, made from our models' weights.

The key lists in ``fixtures/`` were generated from the official implementations (see each file's header).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import timm
import torch
from timm.models.swin_transformer import get_relative_position_index
from torch import nn

from dsnet.convert.dsnet_reference import BLOCK_MODULE_MAP
from dsnet.models.mixformer import paddle_key_to_ours
from dsnet.models.transxnet import _rename_official_key

FIXTURES = Path(__file__).parent / "fixtures"
MIXFORMER_B0_KEYS = FIXTURES / "mixformer_b0_paddle_keys.txt"
TRANSXNET_T_KEYS = FIXTURES / "transxnet_t_official_keys.txt"


def official_keys(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key → (shape, dtype name) from a fixture key list (``key 3x4 float32`` lines; 0-d shapes are ``scalar``)."""
    keys = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, dtype = line.split()
            keys[key] = (() if shape == "scalar" else tuple(int(s) for s in shape.split("x")), dtype)
    return keys


def write_pdparams(path: Path, state: dict[str, np.ndarray], protocol: int = 4) -> Path:
    """As ``paddle.save`` writes it: a pickled dict of numpy arrays plus the structured-name table."""
    payload = dict(state)
    payload["StructuredToParameterName@@"] = {k: f"param_{i}" for i, k in enumerate(state)}
    with open(path, "wb") as f:
        pickle.dump(payload, f, protocol=protocol)
    return path


def mixformer_b0_to_paddle(model: nn.Module) -> dict[str, np.ndarray]:
    """``model``'s (a ``mixformer_b0``) weights in the official PaddleClas names and layout (Linear ``[in, out]``)."""
    ours = model.state_dict()
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    paddle = {}
    for key, (shape, _) in official_keys(MIXFORMER_B0_KEYS).items():
        new = paddle_key_to_ours(key)
        if new is None:  # the relative position index of a 7×7 window, stored by Paddle, computed by us
            paddle[key] = get_relative_position_index(7, 7).numpy()
            continue
        value = ours[new].numpy()
        paddle[key] = value.T.copy() if new.rpartition(".")[0] in linears and value.ndim == 2 else value
        assert paddle[key].shape == shape, key
    return paddle


def transxnet_t_official_state_dict(model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The official TransXNet-T state dict: zeros, or ``model``'s (a ``transxnet_t``) weights in official names."""
    ours = model.state_dict() if model is not None else None
    state_dict = {}
    for key, (shape, dtype) in official_keys(TRANSXNET_T_KEYS).items():
        if ours is None:
            state_dict[key] = torch.zeros(shape, dtype=getattr(torch, dtype))
        else:
            state_dict[key] = ours[_rename_official_key(key)].reshape(shape).clone()
    return state_dict


_INVERSE_BLOCK = {ours: ref for ref, ours in BLOCK_MODULE_MAP.items()}


def dsnet_reference_name(name: str) -> str:
    """Our DS-Net parameter name → the reference (PaddleClas / SteveTsui) name: the inverse of the converter's table."""
    if m := re.match(r"^stages\.(\d)\.downsample\.(\w+)$", name):
        return f"patch_embed{int(m[1]) + 1}.proj.{m[2]}"
    if m := re.match(r"^stages\.(\d)\.blocks\.(\d+)\.(.+)\.(\w+)$", name):
        return f"blocks{int(m[1]) + 1}.{m[2]}.{_INVERSE_BLOCK[m[3]]}.{m[4]}"
    return name.replace("head.fc.", "head.")


def dsnet_reference_state(model_name: str, layout: str = "paddle", seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights for the DS-Net ``model_name`` in the reference names and ``layout`` (numpy arrays): a
    ``.pdparams`` as PaddleClas writes it (Linear ``[in, out]``, BN ``_mean``/``_variance``) or a reference ``.pth``."""
    with torch.device("meta"):
        model = timm.create_model(model_name)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            if layout == "torch":
                out[dsnet_reference_name(name)] = np.array(5, dtype=np.int64)
            continue
        array = rng.standard_normal(tuple(value.shape)).astype(np.float32) * 0.02
        if name.endswith("running_var"):
            array = np.abs(array) + 0.5
        ref = dsnet_reference_name(name)
        if layout == "paddle":
            if name in linears:
                array = np.ascontiguousarray(array.T)
            ref = ref.replace(".running_mean", "._mean").replace(".running_var", "._variance")
        out[ref] = array
    return out
