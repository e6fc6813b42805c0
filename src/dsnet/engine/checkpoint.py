"""Checkpoints: weights as safetensors, training state as a ``torch.load(weights_only=True)``-safe file.

A checkpoint ``<tag>`` (``last`` or ``best``) in ``<run>/checkpoints/`` is

* ``<tag>.safetensors`` — the model weights, with metadata (model name, classes, epoch, update, token);
* ``<tag>_ema.safetensors`` — the EMA weights, when EMA is on;
* ``<tag>-<token>.state.pt`` — optimizer, scheduler, EMA, grad scaler, RNG states and loop position.

Every file is written to a temporary name and moved into place with ``os.replace`` (atomic on POSIX). The state
file is written first under a new name, the weights file last: replacing the weights is the commit point, and its
metadata names the state file that belongs to it. A run killed at any instant therefore resumes from a consistent
pair, the previous one or the new one.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "atomic_write",
    "capture_rng",
    "capture_training_state",
    "load_training_state",
    "load_weights",
    "resolve_checkpoint",
    "resolve_run",
    "restore_rng",
    "restore_training_state",
    "save_checkpoint",
]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it onto ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors needs contiguous tensors that do not share memory
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def capture_rng() -> dict[str, Any]:
    """The Python, numpy, torch (and CUDA) generator states as plain, weights_only-loadable values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


ConfigT = TypeVar("ConfigT")


def resolve_run(
    cfg: ConfigT | None, resume: str | Path | None, load: Callable[[Path], ConfigT]
) -> tuple[ConfigT, Path | None]:
    """``(config, run folder to resume or None)`` for a training entry point: ``cfg`` for a new run, else the
    config saved in the ``resume`` folder (read with ``load``)."""
    resume_dir = Path(resume) if resume is not None else None
    if resume_dir is not None:
        if not (resume_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"cannot resume: {resume_dir / 'config.yaml'} does not exist (not a run folder?)")
        cfg = load(resume_dir / "config.yaml")
    if cfg is None:
        raise ValueError("train() needs a config or a run folder to resume")
    return cfg, resume_dir


def capture_training_state(
    optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler, **progress: Any
) -> dict[str, Any]:
    """What an exact resume needs besides the weights: optimizer, schedule (a timm scheduler), grad scaler and RNG
    states, plus the loop's own ``progress`` counters (epoch, update, best score, ...)."""
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": capture_rng(),
        **progress,
    }


def restore_training_state(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler
) -> dict[str, Any]:
    """Inverse of :func:`capture_training_state`: load the states into the objects; returns the progress counters
    (and any other entry, e.g. ``ema``)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"])
    return {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "scaler", "rng")}


def save_checkpoint(
    folder: Path,
    tag: str,
    model: nn.Module,
    *,
    ema: nn.Module | None = None,
    training_state: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write checkpoint ``tag`` into ``folder`` (see the module docstring); call on rank 0 only."""
    token = uuid.uuid4().hex
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta["token"] = token
    if training_state is not None:
        state = {**training_state, "token": token}
        if ema is not None:
            state["ema"] = _tensors(ema.state_dict())
        atomic_write(folder / f"{tag}-{token}.state.pt", lambda p: torch.save(state, p))
    if ema is not None:
        ema_state = _tensors(ema.state_dict())
        atomic_write(folder / f"{tag}_ema.safetensors", lambda p: save_file(ema_state, str(p), {**meta, "ema": "1"}))
    weights = _tensors(model.state_dict())
    atomic_write(folder / f"{tag}.safetensors", lambda p: save_file(weights, str(p), meta))
    for stale in folder.glob(f"{tag}-*.state.pt"):
        if stale.name != f"{tag}-{token}.state.pt":
            stale.unlink(missing_ok=True)


def resolve_checkpoint(path: str | Path, tag: str = "best", ema: bool = False) -> Path:
    """The weights file meant by ``path``: a ``.safetensors`` file, or a run folder (→ ``checkpoints/<tag>``).

    Raises:
        FileNotFoundError: nothing usable at ``path`` (the message lists what was looked for).
    """
    path = Path(path).expanduser()
    suffix = "_ema" if ema else ""
    if path.is_dir():
        candidates = [path / "checkpoints" / f"{tag}{suffix}.safetensors", path / f"{tag}{suffix}.safetensors"]
        if tag == "best":
            candidates.append(path / "checkpoints" / f"last{suffix}.safetensors")
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"no {'EMA ' if ema else ''}checkpoint in {path} (looked for {', '.join(str(c) for c in candidates)})"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata of a safetensors file, JSON values decoded."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata() or {}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            out[key] = value
    return out


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, metadata)`` of a ``.safetensors`` file, or of a ``.pt``/``.pth`` file via weights_only loading.

    Raises:
        ValueError: unreadable or not a weights file (the message names the file).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path)), read_metadata(path)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for foreign files
        raise ValueError(f"{path}: not a weights file torch.load(weights_only=True) can read ({err})") from err
    for key in ("state_dict", "model", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return obj, {}


def load_training_state(folder: Path, tag: str = "last") -> tuple[dict[str, Any], Path]:
    """``(training_state, weights_path)`` of checkpoint ``tag`` in ``folder``, consistency-checked.

    Raises:
        FileNotFoundError: missing files.
        ValueError: the weights and the state come from different saves.
    """
    weights_path = folder / f"{tag}.safetensors"
    if not weights_path.is_file():
        raise FileNotFoundError(f"cannot resume: {weights_path} does not exist")
    token = read_metadata(weights_path).get("token")
    state_path = folder / f"{tag}-{token}.state.pt"
    if not state_path.is_file():
        raise FileNotFoundError(f"cannot resume: {state_path} (the training state of {weights_path}) does not exist")
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    if state.get("token") != token:
        raise ValueError(f"cannot resume: {state_path} and {weights_path} come from different saves (token mismatch)")
    return state, weights_path
