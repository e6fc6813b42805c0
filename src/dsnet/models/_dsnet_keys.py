"""The key map of reference DS-Net checkpoints (PaddleClas ``DSNet_*_pretrained.pdparams``, SteveTsui/DS-Net ``.pth``)
onto our names. It lives with the model (``checkpoint_filter_fn`` uses it); :mod:`dsnet.convert.dsnet_reference`
writes whole files with it.

Both references use the same parameter names; they differ in layout:

=================  ==========================  =================================================
                   Paddle (``.pdparams``)      PyTorch (``.pth``)
=================  ==========================  =================================================
Linear weight      ``[in, out]``               ``[out, in]``
BN running stats   ``_mean``, ``_variance``    ``running_mean``, ``running_var``
BN batch counter   absent                      ``num_batches_tracked``
=================  ==========================  =================================================

The conversion is a fixed table (:data:`BLOCK_MODULE_MAP`, :data:`TOP_MODULE_MAP`) plus a fixed list of the
Linear layers whose Paddle weights are transposed (:data:`PADDLE_LINEAR_MODULES`). Any name outside the table is
an error: nothing is guessed. The square Linear layers (``fuse_channel_*``, ``h × h``) would pass a shape check
with or without the transpose, which is why the layout is never inferred from shapes.

Example:
    >>> import numpy as np
    >>> sd = {"head.weight": np.zeros((512, 1000), np.float32), "head.bias": np.zeros(1000, np.float32),
    ...       "norm._mean": np.zeros(512, np.float32)}
    >>> out = reference_to_dsnet(sd, layout="paddle")
    >>> {k: tuple(v.shape) for k, v in out.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'head.fc.weight': (1000, 512), 'head.fc.bias': (1000,), 'norm.running_mean': (512,),
     'norm.num_batches_tracked': ()}
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np
import torch

from dsnet.errors import DSNetError

__all__ = [
    "BLOCK_MODULE_MAP",
    "PADDLE_LINEAR_MODULES",
    "REFERENCE_BATCHNORMS",
    "TOP_MODULE_MAP",
    "VARIANT_DEPTHS",
    "Layout",
    "detect_layout",
    "infer_depths",
    "is_reference_layout",
    "reference_to_dsnet",
    "variant_for_depths",
    "variant_hint",
]

Layout = Literal["paddle", "torch"]

#: Sub-module names inside a reference block ``blocks{k}.{j}`` → ours inside ``stages.{k-1}.blocks.{j}``.
BLOCK_MODULE_MAP: dict[str, str] = {
    "pos_embed": "pos_embed",
    "norm1": "norm1",
    "conv1": "proj_in",
    "norm_conv1": "local_norm",
    "conv": "local_conv",
    "norm_sa1": "global_norm",
    "channel_up": "global_qkv",
    "norm_conv2": "alignment.local_norm",
    "cross_channel_up_conv": "alignment.local_qkv",
    "norm_sa2": "alignment.global_norm",
    "cross_channel_up_sa": "alignment.global_qkv",
    "fuse_channel_conv": "alignment.local_proj",
    "fuse_channel_sa": "alignment.global_proj",
    "conv2": "proj_out",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}

#: Top-level reference modules → ours (the patch embeddings ``patch_embed{k}.proj`` are handled by pattern).
TOP_MODULE_MAP: dict[str, str] = {"norm": "norm", "head": "head.fc"}

#: Reference modules that are ``nn.Linear``: Paddle stores their weight ``[in, out]``, PyTorch ``[out, in]``.
#: (Every other 2-D-or-more weight is a convolution, whose layout is the same in both frameworks.)
PADDLE_LINEAR_MODULES: tuple[str, ...] = (
    "channel_up",
    "cross_channel_up_sa",
    "fuse_channel_conv",
    "fuse_channel_sa",
    "head",
)

#: Reference modules that are BatchNorm (in blocks, and the final ``norm``): their running statistics are renamed.
REFERENCE_BATCHNORMS: tuple[str, ...] = ("norm1", "norm_conv1", "norm_conv2", "norm2", "norm")

#: Blocks per stage of the variants with released weights (all share widths 64/128/320/512 and heads 1/2/5/8).
VARIANT_DEPTHS: dict[str, tuple[int, int, int, int]] = {
    "dsnet_tiny": (2, 2, 4, 1),
    "dsnet_small": (3, 4, 8, 3),
    "dsnet_base": (3, 4, 28, 3),
}

_PADDLE_BN_STATS = {"_mean": "running_mean", "_variance": "running_var"}
_TORCH_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
_PARAM = r"(weight|bias|_mean|_variance|running_mean|running_var|num_batches_tracked)"
_PATCH_EMBED = re.compile(r"^patch_embed([1-4])\.proj\.(weight|bias)$")
_BLOCK = re.compile(rf"^blocks([1-4])\.(\d+)\.(.+)\.{_PARAM}$")
_TOP = re.compile(rf"^(norm|head)\.{_PARAM}$")
_DEPTH_PATTERNS = (re.compile(r"^blocks([1-4])\.(\d+)\."), re.compile(r"^stages\.([0-3])\.blocks\.(\d+)\."))


def is_reference_layout(state_dict: Mapping[str, object]) -> bool:
    """True when ``state_dict`` uses the reference names (``patch_embed1.proj.weight``, ``blocks1.0...``)."""
    return any(_PATCH_EMBED.match(k) or _BLOCK.match(k) for k in state_dict)


def detect_layout(state_dict: Mapping[str, object]) -> Layout:
    """``"paddle"`` or ``"torch"`` from the BatchNorm statistic names (``_mean``/``_variance`` vs ``running_*``).

    Raises:
        DSNetError: both kinds of names are present, or neither (then the layout must be given explicitly).
    """
    paddle = any(k.endswith(("._mean", "._variance")) for k in state_dict)
    torch_ = any(k.endswith((".running_mean", ".running_var")) for k in state_dict)
    if paddle and torch_:
        raise DSNetError("the state dict mixes Paddle (_mean/_variance) and PyTorch (running_mean/var) BN statistics")
    if not (paddle or torch_):
        raise DSNetError("cannot tell Paddle from PyTorch layout: the state dict has no BatchNorm running statistics")
    return "paddle" if paddle else "torch"


def _to_tensor(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    array = np.ascontiguousarray(value)
    if not array.flags.writeable:  # some numpy versions unpickle arrays onto read-only bytes; torch wants writable
        array = array.copy()
    return torch.from_numpy(array)


def _map_name(key: str) -> tuple[str, str, str] | None:
    """(our module name, reference module name, param) for a reference ``key``, or None if it is not in the table."""
    if m := _PATCH_EMBED.match(key):
        return f"stages.{int(m[1]) - 1}.downsample", "patch_embed", m[2]
    if m := _BLOCK.match(key):
        module = m[3]
        if module not in BLOCK_MODULE_MAP:
            return None
        return f"stages.{int(m[1]) - 1}.blocks.{m[2]}.{BLOCK_MODULE_MAP[module]}", module, m[4]
    if m := _TOP.match(key):
        return TOP_MODULE_MAP[m[1]], m[1], m[2]
    return None


def reference_to_dsnet(
    state_dict: Mapping[str, np.ndarray | torch.Tensor], layout: Layout | None = None
) -> dict[str, torch.Tensor]:
    """Rename a reference DS-Net state dict to our names and layout.

    Args:
        state_dict: reference names → numpy arrays (Paddle) or tensors (PyTorch).
        layout: ``"paddle"`` (Linear weights ``[in, out]`` are transposed, BN ``_mean``/``_variance`` renamed to
            ``running_mean``/``running_var``, ``num_batches_tracked`` added as 0) or ``"torch"`` (names only).
            None detects it from the BN statistic names (:func:`detect_layout`); when given, it must agree with them.

    Returns:
        our names → tensors, ready for :func:`dsnet.convert.checkpoint.verify_state_dict` and ``load_state_dict``.

    Raises:
        DSNetError: a name outside the key map, a statistic on a module that is not BatchNorm, a Linear weight that
            is not 2-D, or a layout that contradicts the BN statistic names. The message lists every offending key.
    """
    detected = detect_layout(state_dict)
    if layout is None:
        layout = detected
    elif layout not in ("paddle", "torch"):
        raise DSNetError(f"layout must be 'paddle' or 'torch', got {layout!r}")
    elif layout != detected:
        raise DSNetError(
            f"the state dict is in {detected} layout (its BatchNorm statistics are named "
            f"{'_mean/_variance' if detected == 'paddle' else 'running_mean/running_var'}), not {layout} layout"
        )

    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    bad: list[str] = []
    for key, value in state_dict.items():
        mapped = _map_name(key)
        if mapped is None:
            unknown.append(key)
            continue
        ours, module, param = mapped
        tensor = _to_tensor(value)
        is_stat = param in _PADDLE_BN_STATS or param in _TORCH_BN_STATS
        if is_stat and module not in REFERENCE_BATCHNORMS:
            bad.append(f"{key}: BatchNorm statistic on {module!r}, which is not a BatchNorm")
            continue
        if is_stat and (param in _PADDLE_BN_STATS) != (layout == "paddle"):
            bad.append(f"{key}: {param!r} does not belong in a {layout}-layout state dict")
            continue
        if param in _PADDLE_BN_STATS:
            param = _PADDLE_BN_STATS[param]
        elif module in PADDLE_LINEAR_MODULES and param == "weight":
            if tensor.ndim != 2:
                bad.append(f"{key}: a Linear weight must be 2-D, got shape {list(tensor.shape)}")
                continue
            if layout == "paddle":
                tensor = tensor.t().contiguous()  # [in, out] → [out, in]
        out[f"{ours}.{param}"] = tensor
        if param == "running_mean" and layout == "paddle":  # Paddle keeps no batch counter; torch's starts at 0
            out[f"{ours}.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    if unknown or bad:
        parts = ["the state dict does not follow the reference DS-Net names:"]
        if unknown:
            parts.append(f"  keys outside the key map ({len(unknown)}): {sorted(unknown)[:20]}")
        if bad:
            parts.append("  invalid entries:\n" + "\n".join(f"    {b}" for b in bad[:20]))
        raise DSNetError("\n".join(parts))
    return out


def infer_depths(keys: Iterable[str]) -> tuple[int, int, int, int]:
    """Blocks per stage, read off block indices of reference (``blocks{k}.{j}``) or our (``stages.i.blocks.j``) keys."""
    depths = [0, 0, 0, 0]
    for key in keys:
        for pattern in _DEPTH_PATTERNS:
            if m := pattern.match(key):
                stage = int(m[1]) - 1 if pattern is _DEPTH_PATTERNS[0] else int(m[1])
                depths[stage] = max(depths[stage], int(m[2]) + 1)
    return (depths[0], depths[1], depths[2], depths[3])


def variant_for_depths(depths: tuple[int, ...]) -> str | None:
    """The model name in :data:`VARIANT_DEPTHS` with these blocks per stage, or None."""
    return next((name for name, d in VARIANT_DEPTHS.items() if d == tuple(depths)), None)


def variant_hint(state_dict: Mapping[str, object], target: str) -> str | None:
    """A sentence saying which variant a checkpoint looks like when that is not ``target``, else None."""
    depths = infer_depths(state_dict)
    if not any(depths):
        return None
    found = variant_for_depths(depths)
    if found == target:
        return None
    expected = VARIANT_DEPTHS.get(target)
    target_part = f", {target} has {list(expected)}" if expected else ""
    if found:
        return (
            f"The checkpoint has {list(depths)} blocks per stage{target_part}: it looks like {found} (--model {found})."
        )
    return f"The checkpoint has {list(depths)} blocks per stage{target_part}, which matches no released DS-Net variant."
