"""Model-independent conversion plumbing: read foreign checkpoints safely, verify, write safetensors, summarise.

The unwrapper, the safe ``.pth``/safetensors readers and :func:`verify_state_dict` live in
:mod:`dsnet.models._checkpoint` (the models use them too, and must not import the converters); they are re-exported
here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dsnet._io import atomic_write_safetensors
from dsnet.convert.pickle_safe import load_pdparams
from dsnet.errors import DSNetError
from dsnet.models._checkpoint import (
    EMA_ENTRIES,
    STATE_DICT_ENTRIES,
    WEIGHT_ENTRIES,
    CheckpointMismatchError,
    choose_entry,
    entry_note,
    load_torch_checkpoint,
    pretrained_file_kwargs,
    read_weights_file,
    state_dict_entries,
    state_dict_of,
    strip_prefix,
    unwrap_state_dict,
    verify_state_dict,
)

__all__ = [
    "EMA_ENTRIES",
    "STATE_DICT_ENTRIES",
    "WEIGHT_ENTRIES",
    "CheckpointMismatchError",
    "ConversionResult",
    "choose_entry",
    "count_parameters",
    "entry_note",
    "finish_conversion",
    "load_torch_checkpoint",
    "pretrained_file_kwargs",
    "read_checkpoint",
    "read_weights_file",
    "state_dict_entries",
    "state_dict_of",
    "strip_prefix",
    "unwrap_state_dict",
    "verify_state_dict",
]


def count_parameters(state_dict: Mapping[str, torch.Tensor], skip: Iterable[str] = ()) -> int:
    """Number of elements in ``state_dict``, leaving out keys ending with any suffix in ``skip``."""
    suffixes = tuple(skip)
    return sum(v.numel() for k, v in state_dict.items() if not (suffixes and k.endswith(suffixes)))


def read_checkpoint(
    path: str | os.PathLike[str],
    layout: str,
    *,
    entry: str | None = None,
    report: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], str | None]:
    """Read a foreign checkpoint without executing code: (state dict, entry used).

    ``layout="paddle"`` reads a ``.pdparams`` with the numpy-only unpickler (values are numpy arrays);
    ``layout="torch"`` reads a ``.pth``/``.pth.tar`` with :func:`load_torch_checkpoint` (values are tensors;
    ``report`` gets the line saying which entry is used).

    Raises:
        FileNotFoundError, DSNetError: as the two readers do; also for any other ``layout``.
    """
    if layout == "paddle":
        return dict(load_pdparams(path)), None
    if layout == "torch":
        return load_torch_checkpoint(path, entry=entry, report=report)
    raise DSNetError(f"layout must be 'paddle' or 'torch', got {layout!r}")


@dataclass
class ConversionResult:
    """What a conversion to safetensors did (printed by ``dsnet convert``)."""

    source: str
    output: str
    layout: str
    model: str
    num_classes: int
    num_keys: int
    num_params: int
    sha256: str
    names: str = "reference DS-Net names"
    mapping: str = ""
    depths: tuple[int, ...] | None = None
    entry: str | None = None
    transposed: list[str] = field(default_factory=list)

    def summary(self) -> str:
        entry = f" (entry {self.entry!r})" if self.entry else ""
        depths = f"{list(self.depths)} blocks per stage, " if self.depths else ""
        lines = [
            f"read      {self.source}{entry}: {self.layout} layout, {self.names}",
            f"model     {self.model}: {depths}{self.num_classes} classes",
            f"mapped    {self.num_keys} keys{self.mapping}",
            f"verified  every key and shape matches {self.model}; {self.num_params:,} parameters "
            f"({self.num_params / 1e6:.3f}M)",
            f"wrote     {self.output} (sha256 {self.sha256})",
            f'load with timm.create_model("{self.model}", pretrained=True, '
            f'pretrained_cfg_overlay=dict(file="{self.output}"))',
        ]
        return "\n".join(lines)


def finish_conversion(
    state_dict: Mapping[str, torch.Tensor],
    target: nn.Module,
    *,
    source: str,
    output: str,
    model: str,
    layout: str,
    hint: str | None = None,
    **details: Any,
) -> ConversionResult:
    """The common tail of every conversion: verify against ``target``, refuse non-finite values, write, summarise.

    Args:
        state_dict: the converted state dict (our names → tensors).
        target: the model it must fit (may live on the meta device: only names and shapes are read).
        source: the input file (for messages and the ``converted_from`` metadata).
        output: the ``.safetensors`` file to write atomically.
        model: the target's model name.
        layout: the input's framework (``"paddle"`` or ``"torch"``).
        hint: an extra sentence for a mismatch message.
        details: further :class:`ConversionResult` fields (``names``, ``mapping``, ``depths``, ``entry``, ...).

    Raises:
        CheckpointMismatchError: keys or shapes differ from ``target`` (every difference listed).
        DSNetError: NaN or inf in a floating-point tensor.
    """
    expected = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    verify_state_dict(state_dict, expected, source=source, target=model, hint=hint)
    non_finite = sorted(k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if non_finite:
        raise DSNetError(f"{source}: non-finite values (NaN/inf) in {len(non_finite)} tensors: {non_finite[:10]}")

    metadata = {"format": "pt", "dsnet_model": model, "converted_from": f"{layout}:{os.path.basename(source)}"}
    atomic_write_safetensors(output, state_dict, metadata)
    digest = hashlib.sha256()
    with open(output, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    param_names = {name for name, _ in target.named_parameters()}
    return ConversionResult(
        source=source,
        output=output,
        layout=layout,
        model=model,
        num_classes=int(getattr(target, "num_classes", 0)),
        num_keys=len(state_dict),
        num_params=sum(state_dict[k].numel() for k in param_names),
        sha256=digest.hexdigest(),
        **details,
    )
