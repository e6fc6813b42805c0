"""Any zoo model's released checkpoint → our safetensors: the library side of ``dsnet convert``.

Reference DS-Net files (PaddleClas / SteveTsui names) go through :mod:`dsnet.convert.dsnet_reference`, which can
infer the variant. Every other file is mapped by the ``checkpoint_filter_fn`` of the target model's own module
(e.g. :func:`dsnet.models.transxnet.checkpoint_filter_fn` for the official TransXNet ``.pth.tar``,
:func:`dsnet.models.mixformer.checkpoint_filter_fn` for the official Paddle MixFormer ``.pdparams``), the same
function timm calls when such a file is passed as ``pretrained_cfg_overlay=dict(file=...)``. Both paths end in
:func:`dsnet.convert.checkpoint.finish_conversion` (verify every key and shape, refuse NaN/inf, write atomically).

Example:
    >>> from dsnet.convert.zoo import convert_checkpoint
    >>> result = convert_checkpoint("transx-t.pth.tar", "transxnet_t.safetensors", layout="torch",
    ...                             model="transxnet_t")  # doctest: +SKIP
    >>> print(result.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from dsnet.convert.checkpoint import CheckpointMismatchError, ConversionResult, finish_conversion, read_checkpoint
from dsnet.convert.dsnet_reference import convert_reference_state, is_reference_layout
from dsnet.errors import DSNetError
from dsnet.models._zoo import list_zoo

__all__ = ["convert_checkpoint", "filter_for_model"]

FilterFn = Callable[[dict[str, Any], nn.Module], Mapping[str, torch.Tensor]]


def _zoo_models() -> str:

    return ", ".join(list_zoo())


def filter_for_model(model: str) -> tuple[FilterFn, str]:
    """The ``checkpoint_filter_fn`` of the module that registers ``model`` in timm, and its qualified name.

    Raises:
        DSNetError: ``model`` is not a timm/dsnet model, or its module has no ``checkpoint_filter_fn``.
    """
    import timm

    if not timm.is_model(model):
        raise DSNetError(f"unknown model {model!r}; zoo models: {_zoo_models()}")
    module_name = timm.models.model_entrypoint(model).__module__
    fn = getattr(importlib.import_module(module_name), "checkpoint_filter_fn", None)
    if fn is None:
        raise DSNetError(
            f"{model} cannot be converted: its module {module_name} has no checkpoint_filter_fn to map foreign names"
        )
    return fn, f"{module_name}.checkpoint_filter_fn"


def _as_tensor(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        array = value if value.flags.writeable else value.copy()  # torch wants writable memory
        return torch.from_numpy(np.ascontiguousarray(array))
    return value


def _map_with_filter(
    raw: dict[str, Any], model: str, fn: FilterFn, fn_name: str, source: str
) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """(state dict, target model): ``fn`` applied against ``model`` built on the meta device, or on the CPU when
    the filter needs real tensors of the model. Every refusal of the filter becomes a DSNetError naming both."""
    import timm

    for device in ("meta", "cpu"):
        with torch.device(device):
            target = timm.create_model(model)
        try:
            state_dict = dict(fn(dict(raw), target))
        except CheckpointMismatchError as err:
            raise DSNetError(f"{source} does not fit {model} (mapped by {fn_name}):\n{err}") from None
        except (NotImplementedError, RuntimeError) as err:
            if device == "meta":
                continue  # e.g. the filter copies a tensor of the model: retry with a real one
            raise DSNetError(f"{source}: {fn_name} failed for {model}: {err}") from None
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise DSNetError(f"{source}: its keys do not map onto {model} ({fn_name}): {err}") from None
        if device == "meta" and any(getattr(v, "is_meta", False) for v in state_dict.values()):
            continue  # the filter returned some of the model's own (meta) tensors: retry with real ones
        not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
        if not_tensors:
            raise DSNetError(f"{source}: {fn_name} returned entries that are not tensors: {not_tensors[:10]}")
        return state_dict, target
    raise AssertionError("unreachable")  # pragma: no cover


def convert_checkpoint(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    layout: str,
    model: str | None = None,
    entry: str | None = None,
) -> ConversionResult:
    """Convert a released checkpoint of any zoo model into a safetensors file of our model.

    Args:
        source: a ``.pdparams`` (``layout="paddle"``) or ``.pth``/``.pth.tar`` (``layout="torch"``) file.
        output: the ``.safetensors`` file to write (atomically; an existing file is replaced).
        layout: the framework that wrote ``source``.
        model: the target model (e.g. ``"transxnet_t"``); required unless ``source`` is a reference DS-Net
            checkpoint, whose variant is inferred from its blocks per stage.
        entry: for ``.pth`` training checkpoints, the entry holding the state dict.

    Raises:
        FileNotFoundError, DSNetError: unreadable or unsafe file, no ``model`` for a non-DS-Net file, a model
            without ``checkpoint_filter_fn``, keys the filter refuses, or any key/shape mismatch (all listed).
    """
    source, output = os.fspath(source), os.fspath(output)
    raw, used_entry = read_checkpoint(source, layout, entry=entry)
    if is_reference_layout(raw):
        return convert_reference_state(raw, output, source=source, layout=layout, model=model, entry=used_entry)
    if model is None:
        raise DSNetError(
            f"{source}: not a reference DS-Net checkpoint (first keys: {sorted(raw)[:5]}), so the model cannot be "
            f"inferred; pass --model (zoo models: {_zoo_models()})"
        )
    fn, fn_name = filter_for_model(model)
    state_dict, target = _map_with_filter({k: _as_tensor(v) for k, v in raw.items()}, model, fn, fn_name, source)
    return finish_conversion(
        state_dict,
        target,
        source=source,
        output=output,
        model=model,
        layout=layout,
        names=f"{len(raw)} keys",
        mapping=f" by {fn_name}",
        entry=used_entry,
    )
