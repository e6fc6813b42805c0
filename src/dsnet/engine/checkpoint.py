"""Checkpoints: weights as safetensors, training state as a ``torch.load(weights_only=True)``-safe file.

A checkpoint ``<tag>`` (``last`` or ``best``) in ``<run>/checkpoints/`` is

* ``<tag>.safetensors`` — the model weights, with metadata (model name, classes, epoch, update, token);
* ``<tag>_ema.safetensors`` — the EMA weights, when EMA is on;
* ``<tag>-<token>.state.pt`` — optimizer, scheduler, EMA, grad scaler, RNG states and loop position.

Every file is written through :func:`dsnet._io.atomic_write` (a new file beside the target, flushed, read back and
checked, then moved into place with ``os.replace``). The state file is written first under a new name, the weights
file last: replacing the weights is the commit point, and its metadata names the state file that belongs to it.
A checkpoint saved with a training state keeps the one it replaces as ``<tag>.prev.safetensors`` (with its state
file) until the new one is complete and verified, so a kill at any instant, or a damaged newest file, still leaves
an intact pair to resume from: :func:`load_resume_point` takes the newest intact one and says what it skipped.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from dsnet._io import atomic_write, remove_stale_temporaries
from dsnet.errors import DSNetError
from dsnet.models._checkpoint import load_torch_checkpoint

__all__ = [
    "ResumePoint",
    "capture_rng",
    "capture_training_state",
    "load_resume_point",
    "load_training_state",
    "load_weights",
    "read_metadata",
    "resolve_checkpoint",
    "resolve_run",
    "restore_rng",
    "restore_training_state",
    "save_checkpoint",
]

#: Suffix of the tag that keeps the checkpoint a new save replaced (``last`` → ``last.prev``).
PREVIOUS = ".prev"


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors needs contiguous tensors that do not share memory
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


#: Test hook: ``"<n>"`` makes the n-th checkpoint file write of this process write half of its bytes, then
#: SIGKILL the process, so that a test can kill a real run inside a checkpoint write.
_KILL_ENV = "DSNET_TEST_KILL_IN_CHECKPOINT_WRITE"
_writes = 0


def _write_bytes(path: Path, data: bytes) -> None:
    """The one place checkpoint bytes reach the disk (plain ``open``: the folder's usual permissions, and a full
    disk is an ``OSError``, which torch's and safetensors' own writers would turn into other errors)."""
    global _writes
    _writes += 1
    kill_at = os.environ.get(_KILL_ENV)
    with open(path, "wb") as handle:
        if kill_at and int(kill_at) == _writes:
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        handle.write(data)


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


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
    resume_dir = Path(resume).expanduser() if resume is not None else None
    if resume_dir is not None:
        if not resume_dir.exists():
            raise FileNotFoundError(f"cannot resume: {resume_dir} is not a run folder: it does not exist")
        if not resume_dir.is_dir():
            raise DSNetError(f"cannot resume: {resume_dir} is a file; --resume takes a run folder of dsnet train")
        if not (resume_dir / "config.yaml").is_file():
            raise FileNotFoundError(
                f"cannot resume: {resume_dir} is not a run folder ({resume_dir / 'config.yaml'} does not exist)"
            )
        cfg = load(resume_dir / "config.yaml")
    if cfg is None:
        raise DSNetError("train() needs a config or a run folder to resume")
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


def _token_of(path: Path) -> str | None:
    """The save token of a weights file, or None when it is missing or unreadable."""
    try:
        return read_metadata(path).get("token")
    except (SafetensorError, OSError, ValueError):
        return None


def _check_weights_file(path: Path, token: str) -> None:
    """Re-open a written weights file: a header covering the whole file, and the token of this save."""
    found = _token_of(path)
    if found != token:
        raise OSError(f"{path}: the file read back is not the one just written (truncated write?)")


def _check_state_file(path: Path, token: str) -> None:
    state = _read_state(path)
    if state.get("token") != token:
        raise OSError(f"{path}: the file read back is not the one just written (truncated write?)")


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for truncated or foreign files
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DSNetError(f"{path}: not a readable training state, truncated or corrupt ({first})") from None
    if not isinstance(state, dict):
        raise DSNetError(f"{path}: not a training state (found {type(state).__name__})")
    return state


def save_checkpoint(
    folder: Path,
    tag: str,
    model: nn.Module,
    *,
    ema: nn.Module | None = None,
    training_state: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write checkpoint ``tag`` into ``folder`` (see the module docstring); call on rank 0 only.

    With ``training_state``, the checkpoint it replaces stays as ``<tag>.prev`` until this one is written and read
    back; state files of older saves are then removed.

    Raises:
        OSError: the folder cannot be written (full disk, permissions): one line naming the file; the previous
            checkpoint is left intact.
    """
    token = uuid.uuid4().hex
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta["token"] = token
    keep_previous = training_state is not None
    current = folder / f"{tag}.safetensors"
    previous_token = _token_of(current) if keep_previous else None  # None: missing or damaged, not worth keeping

    def rotate(name: str) -> None:
        """Move the intact current file ``name`` to its ``.prev`` name, just before the new one replaces it."""
        if previous_token is not None and (folder / f"{tag}{name}").is_file():
            (folder / f"{tag}{name}").replace(folder / f"{tag}{PREVIOUS}{name}")

    def write_weights(name: str, tensors: dict[str, torch.Tensor], extra: dict[str, str]) -> None:
        data = safetensors_bytes(tensors, {**meta, **extra})

        def verify(tmp: Path) -> None:
            _check_weights_file(tmp, token)
            if keep_previous:
                rotate(name)

        atomic_write(folder / f"{tag}{name}", lambda p: _write_bytes(p, data), verify=verify)

    if training_state is not None:
        state = {**training_state, "token": token}
        if ema is not None:
            state["ema"] = _tensors(ema.state_dict())
        state_path = folder / f"{tag}-{token}.state.pt"
        data = _torch_bytes(state)
        atomic_write(state_path, lambda p: _write_bytes(p, data), verify=lambda p: _check_state_file(p, token))
    if ema is not None:
        write_weights("_ema.safetensors", _tensors(ema.state_dict()), {"ema": "1"})
    write_weights(".safetensors", _tensors(model.state_dict()), {})
    keep = {f"{tag}-{token}.state.pt"}
    prev_token = _token_of(folder / f"{tag}{PREVIOUS}.safetensors")
    if prev_token is not None:
        keep.add(f"{tag}-{prev_token}.state.pt")
    for stale in folder.glob(f"{tag}-*.state.pt"):
        if stale.name not in keep:
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
    """The metadata of a safetensors file, JSON values decoded.

    Raises:
        DSNetError: not a readable safetensors file (truncated, corrupt or another format); the message names it.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise DSNetError(f"{path}: not a readable safetensors file, truncated or corrupt ({err})") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            out[key] = value
    return out


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, metadata)`` of a ``.safetensors`` file, or of a ``.pt``/``.pth`` file via weights_only loading
    (a training checkpoint is unwrapped by :func:`dsnet.models._checkpoint.unwrap_state_dict`).

    Raises:
        DSNetError: unreadable (truncated, corrupt) or not a weights file; the message names the file.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path)), read_metadata(path)
        except (SafetensorError, OSError) as err:
            raise DSNetError(f"{path}: not a readable safetensors file, truncated or corrupt ({err})") from None
    state, _ = load_torch_checkpoint(
        path,
        report=lambda line: print(line, file=sys.stderr),
        choose_with="`dsnet convert torch FILE OUT.safetensors --entry ENTRY`, then load OUT.safetensors",
    )
    return state, {}


@dataclass
class ResumePoint:
    """An intact checkpoint to resume from: its training state, its weights and where they came from."""

    state: dict[str, Any]
    weights: dict[str, torch.Tensor]
    metadata: dict[str, Any]  #: of the weights file: model, classes, epoch, update, ...
    weights_path: Path
    skipped: list[str]  #: why newer checkpoints were not used (one reason each)


def _read_pair(
    folder: Path, name: str, tag: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any], Path]:
    """The state, weights and metadata of weights file ``<name>.safetensors``; its state file is
    ``<tag>-<token>.state.pt`` (``last.prev`` keeps the state file ``last`` wrote)."""
    weights_path = folder / f"{name}.safetensors"
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} does not exist")
    token = read_metadata(weights_path).get("token")
    state_path = folder / f"{tag}-{token}.state.pt"
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path} (the training state of {weights_path.name}) does not exist")
    state = _read_state(state_path)
    if state.get("token") != token:
        raise DSNetError(f"{state_path} and {weights_path} come from different saves (token mismatch)")
    weights, metadata = load_weights(weights_path)
    return state, weights, metadata, weights_path


def load_resume_point(folder: Path, tag: str = "last", log: Callable[[str], None] | None = None) -> ResumePoint | None:
    """The newest intact checkpoint ``tag`` in ``folder``: ``<tag>``, else the ``<tag>.prev`` it replaced; None when
    the run has no checkpoint at all (it was stopped before its first save).

    When the newest is damaged (truncated or corrupt weights or state file) or missing, ``log`` gets one line naming
    what was wrong and what is used instead. Temporary files of a killed write are removed.

    Raises:
        DSNetError: no checkpoint is intact; the message names each file and what is wrong with it.
    """
    remove_stale_temporaries(folder)
    candidates = (tag, f"{tag}{PREVIOUS}")
    if not any((folder / f"{name}.safetensors").exists() for name in candidates):
        return None
    reasons: list[str] = []
    for candidate in candidates:
        try:
            state, weights, metadata, path = _read_pair(folder, candidate, tag)
        except (FileNotFoundError, ValueError) as err:
            reasons.append(str(err))
            continue
        if reasons and log is not None:
            log(f"newest checkpoint not usable: {reasons[0]}; resuming from the previous one, {path}")
        return ResumePoint(state, weights, metadata, path, reasons)
    raise DSNetError(f"cannot resume: no intact checkpoint in {folder}: " + "; ".join(reasons))


def load_training_state(folder: Path, tag: str = "last") -> tuple[dict[str, Any], Path]:
    """``(training_state, weights_path)`` of the newest intact checkpoint ``tag`` in ``folder`` (see
    :func:`load_resume_point`)."""
    point = load_resume_point(folder, tag)
    if point is None:
        raise FileNotFoundError(f"cannot resume: no checkpoint in {folder}")
    return point.state, point.weights_path
