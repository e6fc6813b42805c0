"""Checkpoint plumbing the models need: the one state-dict unwrapper, safe readers of weights files, and the check
that a state dict fits a model.

Every place of the package that takes weights out of a checkpoint container — ``checkpoint_filter_fn`` of each zoo
family, files given to ``timm.create_model`` as ``pretrained_cfg_overlay=dict(file=...)``, ``init_weights``,
``dsnet convert`` — goes through :func:`unwrap_state_dict` (or its lenient form :func:`state_dict_of`): the entry
rule of :func:`choose_entry` and the ``module.`` prefix of DataParallel/DDP removed by :func:`strip_prefix`.

Verification refuses to guess: the state dict must have exactly the target's keys, each with exactly the target's
shape; otherwise :class:`CheckpointMismatchError` lists every missing key, every unexpected key and every shape
mismatch (both shapes), so that one run tells the whole story.

It lives in :mod:`dsnet.models` (below :mod:`dsnet.convert`, which re-exports it) so that models never import the
converters.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dsnet.errors import DSNetError

__all__ = [
    "EMA_ENTRIES",
    "STATE_DICT_ENTRIES",
    "WEIGHT_ENTRIES",
    "CheckpointMismatchError",
    "choose_entry",
    "entry_note",
    "load_torch_checkpoint",
    "pretrained_file_kwargs",
    "read_weights_file",
    "state_dict_entries",
    "state_dict_of",
    "strip_prefix",
    "unwrap_state_dict",
    "verify_state_dict",
]

#: Entries of a training checkpoint that may hold the model's weights, in the order they are preferred: the trained
#: weights before their EMA, as the official training code of every zoo family evaluates and releases them
#: (DeiT-style scripts, which the reference DS-Net uses, save ``{"model": ..., "model_ema": ...}``; timm-style scripts,
#: which TransXNet and Mobile-Former use, ``{"state_dict": ..., "state_dict_ema": ...}``). timm's own loader prefers
#: the EMA entry instead, so files given as ``pretrained_cfg_overlay=dict(file=...)`` are read here
#: (:func:`pretrained_file_kwargs`).
WEIGHT_ENTRIES: tuple[str, ...] = ("model", "state_dict", "model_state_dict")
EMA_ENTRIES: tuple[str, ...] = ("state_dict_ema", "model_ema")
STATE_DICT_ENTRIES: tuple[str, ...] = WEIGHT_ENTRIES + EMA_ENTRIES


class CheckpointMismatchError(DSNetError):
    """A state dict does not fit the target model (keys or shapes); the message lists every difference."""


def _shape(t: object) -> tuple[int, ...]:
    return tuple(t.shape)  # type: ignore[attr-defined]


def _listing(title: str, items: Sequence[str], limit: int) -> str:
    shown = "\n".join(f"    {item}" for item in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def verify_state_dict(
    state_dict: Mapping[str, object],
    expected: Mapping[str, Sequence[int]],
    *,
    source: str,
    target: str,
    hint: str | None = None,
    limit: int = 20,
) -> None:
    """Check that ``state_dict`` has exactly the keys of ``expected`` and, key by key, the same shapes.

    Args:
        state_dict: name → tensor/array (anything with ``.shape``).
        expected: name → shape of the target model (e.g. ``{k: v.shape for k, v in model.state_dict().items()}``).
        source: how the message names the checkpoint (its path).
        target: how the message names the target (its model name).
        hint: an extra sentence for the message (e.g. which variant the file looks like).
        limit: at most this many entries are printed per list.

    Raises:
        CheckpointMismatchError: listing missing keys, unexpected keys and shape mismatches.
    """
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    mismatched = sorted(
        f"{k}: checkpoint {list(_shape(v))} vs model {list(expected[k])}"
        for k, v in state_dict.items()
        if k in expected and _shape(v) != tuple(expected[k])
    )
    if not (missing or unexpected or mismatched):
        return
    parts = [f"{source} does not fit {target}:"]
    if missing:
        parts.append(_listing("missing keys", missing, limit))
    if unexpected:
        parts.append(_listing("unexpected keys", unexpected, limit))
    if mismatched:
        parts.append(_listing("shape mismatches", mismatched, limit))
    if hint:
        parts.append(hint)
    raise CheckpointMismatchError("\n".join(parts))


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Remove ``prefix`` (DataParallel/DDP's ``module.``) when EVERY key carries it; otherwise return a copy."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def state_dict_entries(checkpoint: Mapping[str, Any]) -> list[str]:
    """The entries of :data:`STATE_DICT_ENTRIES` that ``checkpoint`` holds as mappings, in the order preferred."""
    return [e for e in STATE_DICT_ENTRIES if isinstance(checkpoint.get(e), Mapping)]


def choose_entry(checkpoint: Mapping[str, Any], *, source: str, entry: str | None = None) -> str | None:
    """The one rule for which entry of a training checkpoint holds the weights: ``entry`` if given, else the first
    of :data:`STATE_DICT_ENTRIES` present (trained weights before EMA), else None (the checkpoint is the state dict).

    Raises:
        DSNetError: ``entry`` is not in the checkpoint (the message lists what is).
    """
    if entry is not None:
        if entry not in checkpoint:
            raise DSNetError(
                f"{source}: no entry {entry!r} in the checkpoint (entries: {sorted(map(str, checkpoint))})"
            )
        return entry
    present = state_dict_entries(checkpoint)
    return present[0] if present else None


def state_dict_of(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """``checkpoint``'s weights by the rule of :func:`choose_entry` (the mapping itself when it has no such entry),
    without a ``module.`` prefix (:func:`strip_prefix`); lenient about the values (``checkpoint_filter_fn``s also get
    Paddle's numpy arrays). The form of :func:`unwrap_state_dict` for the ``checkpoint_filter_fn`` of each family."""
    used = choose_entry(checkpoint, source="checkpoint")
    return strip_prefix(checkpoint[used] if used is not None else checkpoint)


def entry_note(source: str, checkpoint: Mapping[str, Any], used: str, choose_with: str) -> str:
    """One line saying which entry of ``checkpoint`` is used, which others it holds, and how to pick another."""
    others = [e for e in state_dict_entries(checkpoint) if e != used]
    line = f"{source}: using the weights of entry {used!r}"
    if others:
        ema = " (the trained weights, not their EMA, as the official training code evaluates them)"
        line += f"{ema if used in WEIGHT_ENTRIES and set(others) & set(EMA_ENTRIES) else ''}; the file also holds "
        line += f"{', '.join(map(repr, others))}: choose with {choose_with}"
    return line


def unwrap_state_dict(
    checkpoint: object,
    *,
    source: str,
    entry: str | None = None,
    report: Callable[[str], None] | None = None,
    choose_with: str = "--entry",
) -> tuple[dict, str | None]:
    """The state dict inside a training checkpoint, by the rule of :func:`choose_entry`; the checkpoint itself when
    it already maps names to tensors. Returns (state dict, entry used); ``report`` gets :func:`entry_note`'s line
    when an entry was used. This is the one unwrapper of the package (``dsnet convert``, ``init_weights``, files
    given to ``timm.create_model`` with ``pretrained_cfg_overlay=dict(file=...)``, ``checkpoint_filter_fn``).

    Raises:
        DSNetError: the requested entry is absent, or no mapping of names to tensors is found.
    """
    if not isinstance(checkpoint, Mapping):
        raise DSNetError(
            f"{source}: expected a dict (a state dict or a training checkpoint), found {type(checkpoint).__name__}"
        )
    used = choose_entry(checkpoint, source=source, entry=entry)
    if used is None:
        if not (checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values())):
            raise DSNetError(
                f"{source}: found no state dict: the checkpoint is not a mapping of names to tensors and has none of "
                f"the entries {list(STATE_DICT_ENTRIES)} (entries: {sorted(map(str, checkpoint))}); "
                f"pick one with {choose_with}"
            )
        found = checkpoint
    else:
        found = checkpoint[used]
    where = f"{source}[{used!r}]" if used else source
    if not isinstance(found, Mapping):
        raise DSNetError(f"{where}: expected a mapping of names to tensors, found {type(found).__name__}")
    not_tensors = sorted(str(k) for k, v in found.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise DSNetError(f"{where}: entries that are not tensors: {not_tensors[:10]}")
    if not found:
        raise DSNetError(f"{where}: the state dict is empty")
    if used is not None and report is not None:
        report(entry_note(source, checkpoint, used, choose_with))
    return dict(found), used


def load_torch_checkpoint(
    path: str | os.PathLike[str],
    *,
    entry: str | None = None,
    report: Callable[[str], None] | None = None,
    choose_with: str = "--entry",
) -> tuple[dict[str, torch.Tensor], str | None]:
    """Read a PyTorch ``.pth`` checkpoint without executing pickled code and return (state dict, entry used).

    Uses ``torch.load(weights_only=True)``; the only global admitted beyond torch's own safe set is
    ``argparse.Namespace`` (DeiT-style training scripts store their arguments in the checkpoint; it is a bag of
    attributes and runs nothing). The entry is chosen by :func:`unwrap_state_dict` (``report``, ``choose_with``: see
    there). A ``module.`` prefix on every key is removed.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DSNetError: the file is not a readable PyTorch checkpoint, or holds no state dict (see
            :func:`unwrap_state_dict`); also when it asks for a global outside the safe set.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DSNetError(f"{path}: is a directory, expected a .pth file")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise DSNetError(f"{path}: the file is empty")
    # a pickle that is not a zip archive: a legacy torch.save file, or (more likely) a Paddle .pdparams
    hint = " (a Paddle .pdparams file? convert it with `dsnet convert paddle`)" if head[:1] == b"\x80" else ""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Detected pickle protocol 4": we explain below
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.startswith(boilerplate)]
        refused = next((line for line in lines if "global" in line.lower()), None)
        if refused is not None:  # torch explains at length; keep the line that names the refused global
            raise DSNetError(
                f"{path}: refusing to load: the checkpoint needs more than plain tensors ({refused}). "
                f"Nothing was executed.{hint}"
            ) from None
        raise DSNetError(
            f"{path}: not a readable PyTorch checkpoint ({lines[0] if lines else 'unpickling error'}){hint}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, AttributeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DSNetError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({first}){hint}") from None
    state_dict, used = unwrap_state_dict(checkpoint, source=path, entry=entry, report=report, choose_with=choose_with)
    return strip_prefix(state_dict), used


def read_weights_file(
    path: str | os.PathLike[str],
    *,
    entry: str | None = None,
    report: Callable[[str], None] | None = None,
    choose_with: str = "--entry",
) -> dict[str, torch.Tensor]:
    """The state dict of a local weights file without executing code: a ``.safetensors`` file, or a ``.pth`` /
    ``.pth.tar`` (training) checkpoint unwrapped by :func:`unwrap_state_dict`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DSNetError: unreadable file, unknown ``entry``, or ``entry`` given for a safetensors file.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        if entry is not None:
            raise DSNetError(f"{path}: a safetensors file holds one state dict; entry={entry!r} applies to .pth files")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise DSNetError(f"{path}: not a readable safetensors file, truncated or corrupt ({err})") from None
    state_dict, _ = load_torch_checkpoint(path, entry=entry, report=report, choose_with=choose_with)
    return state_dict


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def pretrained_file_kwargs(
    variant: str, pretrained: bool, filter_fn: Callable[..., Mapping[str, Any]], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """``kwargs`` for timm's ``build_model_with_cfg`` in which a local file given as
    ``pretrained_cfg_overlay=dict(file=PATH)`` is read by :func:`read_weights_file` (no code executed; the entry
    rule of :func:`choose_entry`, printed on stderr) and then mapped by ``filter_fn``, instead of by timm's loader,
    which would take the EMA weights of a training checkpoint holding both. ``pretrained_cfg_overlay=dict(file=PATH,
    entry="state_dict_ema")`` picks another entry. Every zoo family's builder calls this.

    How: timm loads a ``state_dict`` overlay before a ``file`` one and passes it to the filter; the overlay gets a
    small placeholder there (naming the file), and the filter returned here reads the file when timm calls it.

    Example:
        >>> model = timm.create_model("transxnet_t", pretrained=True,  # doctest: +SKIP
        ...     pretrained_cfg_overlay=dict(file="transx-t.pth.tar"))
        transx-t.pth.tar: using the weights of entry 'state_dict' (the trained weights, not their EMA, ...)
    """
    out = dict(kwargs)
    overlay = dict(out.get("pretrained_cfg_overlay") or {})
    entry = overlay.pop("entry", None)
    file = overlay.get("file")
    if entry is not None and not file:
        raise DSNetError(f"{variant}: pretrained_cfg_overlay entry={entry!r} needs file=<weights file>")
    if "pretrained_cfg_overlay" in out:
        out["pretrained_cfg_overlay"] = overlay
    out["pretrained_filter_fn"] = filter_fn
    if not (pretrained and file) or overlay.get("state_dict"):
        return out
    path = os.fspath(file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{variant}: pretrained_cfg_overlay file {path} does not exist")

    def read_then_filter(_placeholder: Mapping[str, Any], model: nn.Module) -> Mapping[str, Any]:
        state_dict = read_weights_file(
            path, entry=entry, report=_stderr, choose_with="pretrained_cfg_overlay=dict(file=..., entry=...)"
        )
        try:
            return filter_fn(state_dict, model)
        except TypeError as err:  # timm would retry a TypeError with one argument and hide this one
            raise DSNetError(f"{path}: does not map onto {variant}: {err}") from None

    out["pretrained_cfg_overlay"] = {**overlay, "state_dict": {"read_by_dsnet": path}}
    out["pretrained_filter_fn"] = read_then_filter
    return out
