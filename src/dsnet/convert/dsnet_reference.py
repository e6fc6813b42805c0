"""Reference DS-Net checkpoint files (PaddleClas ``DSNet_*_pretrained.pdparams``, SteveTsui/DS-Net ``.pth``) →
safetensors files of our model.

The key map itself (a fixed table, nothing guessed; Paddle's Linear weights transposed, its BN statistics renamed)
lives with the model, in :mod:`dsnet.models._dsnet_keys`, and is re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import timm
import torch

from dsnet.convert.checkpoint import ConversionResult, finish_conversion, read_checkpoint
from dsnet.errors import DSNetError
from dsnet.models._dsnet_keys import (
    BLOCK_MODULE_MAP,
    PADDLE_LINEAR_MODULES,
    REFERENCE_BATCHNORMS,
    TOP_MODULE_MAP,
    VARIANT_DEPTHS,
    Layout,
    detect_layout,
    infer_depths,
    is_reference_layout,
    reference_to_dsnet,
    variant_for_depths,
    variant_hint,
)

__all__ = [
    "BLOCK_MODULE_MAP",
    "PADDLE_LINEAR_MODULES",
    "REFERENCE_BATCHNORMS",
    "TOP_MODULE_MAP",
    "VARIANT_DEPTHS",
    "ConversionResult",
    "Layout",
    "convert_reference_checkpoint",
    "convert_reference_state",
    "detect_layout",
    "infer_depths",
    "is_reference_layout",
    "reference_to_dsnet",
    "variant_for_depths",
    "variant_hint",
]


# --------------------------------------------------------------------------------------------------------------------
# Whole files: read → map → verify against the model → write safetensors (the tail is shared with other models:
# :func:`dsnet.convert.checkpoint.finish_conversion`)


def convert_reference_checkpoint(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    layout: Layout,
    model: str | None = None,
    entry: str | None = None,
) -> ConversionResult:
    """Convert a reference DS-Net checkpoint file into a safetensors file of our model.

    Args:
        source: a PaddleClas ``.pdparams`` (``layout="paddle"``) or reference PyTorch ``.pth`` (``layout="torch"``).
        output: the ``.safetensors`` file to write (atomically; an existing file is replaced).
        layout: the framework that wrote ``source``; it must agree with the BN statistic names inside.
        model: our model name (e.g. ``"dsnet_tiny"``); None infers it from the blocks per stage.
        entry: for ``.pth`` training checkpoints, the entry holding the state dict (default: ``model``/``state_dict``).

    Raises:
        FileNotFoundError, DSNetError: unreadable or unsafe file, names outside the key map, unknown model, or a
            mismatch with the model (:class:`~dsnet.convert.checkpoint.CheckpointMismatchError` lists it all).
    """
    raw, used_entry = read_checkpoint(source, layout, entry=entry)
    return convert_reference_state(raw, output, source=os.fspath(source), layout=layout, model=model, entry=used_entry)


def convert_reference_state(
    raw: Mapping[str, np.ndarray | torch.Tensor],
    output: str | os.PathLike[str],
    *,
    source: str,
    layout: Layout,
    model: str | None = None,
    entry: str | None = None,
) -> ConversionResult:
    """:func:`convert_reference_checkpoint` for a state dict already read from ``source`` (by ``entry``)."""
    output = os.fspath(output)
    if not is_reference_layout(raw):
        sample = sorted(raw)[:5]
        raise DSNetError(
            f"{source}: not a reference DS-Net checkpoint (no patch_embed1.proj.* or blocks1.* keys; first keys: "
            f"{sample}). Files already in dsnet names load directly with load_state_dict."
        )
    try:
        state_dict = reference_to_dsnet(raw, layout=layout)
    except ValueError as err:
        raise DSNetError(f"{source}: {err}") from None

    depths = infer_depths(state_dict)
    if model is None:
        model = variant_for_depths(depths)
        if model is None:
            known = ", ".join(f"{n} {list(d)}" for n, d in VARIANT_DEPTHS.items())
            raise DSNetError(
                f"{source}: cannot infer the model: {list(depths)} blocks per stage match no released variant "
                f"({known}); pass --model"
            )
    if model not in timm.list_models():
        raise DSNetError(f"unknown model {model!r}; DS-Net models: {', '.join(timm.list_models('dsnet*'))}")
    head = state_dict.get("head.fc.weight")
    num_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else 1000
    with torch.device("meta"):
        target = timm.create_model(model, num_classes=num_classes)
    transposed = sorted(
        k for k in raw if layout == "paddle" and k.endswith(".weight") and k.rsplit(".", 2)[-2] in PADDLE_LINEAR_MODULES
    )
    mapping = f"; {len(transposed)} Linear weights transposed" + (
        ", BN _mean/_variance → running_mean/running_var, num_batches_tracked added" if layout == "paddle" else ""
    )
    return finish_conversion(
        state_dict,
        target,
        source=source,
        output=output,
        model=model,
        layout=layout,
        hint=variant_hint(state_dict, model),
        mapping=mapping,
        depths=depths,
        entry=entry,
        transposed=transposed,
    )
