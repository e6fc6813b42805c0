"""Atomic file writes: the one helper every module that writes results uses (checkpoints, JSON, converted weights,
ONNX files, downloads), so that a kill, a full disk or an unwritable folder never leaves a half-written file under
its final name. JSON is written strict (:func:`strict_json`: NaN/inf become ``null``, never ``NaN``).

The temporary file is a new name beside the target, created by the writer itself like any other file, so it gets
the permissions every other file of the folder gets (``0o666`` minus the umask); ``tempfile.mkstemp`` would make
it ``0o600``. It is flushed to disk, optionally verified, then moved onto the target with ``os.replace`` (atomic on
POSIX), and the folder entry is flushed too. Only standard-library imports at module level (safetensors is imported
by :func:`atomic_write_safetensors` when called): any package module can use it.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write_text(folder / "a.json", '{"x": 1}\\n')
    >>> (folder / "a.json").read_text()
    '{"x": 1}\\n'
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "TMP_MARK",
    "WriteError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_safetensors",
    "atomic_write_text",
    "check_writable_folder",
    "remove_stale_temporaries",
    "replace_atomically",
    "strict_json",
    "write_error",
]

#: Temporary files are ``.<target stem>.<random>.tmp<target suffix>`` beside the target (writers that look at the
#: extension, e.g. ONNX's, see the target's); :func:`remove_stale_temporaries` finds them by this mark.
TMP_MARK = ".tmp"


class WriteError(OSError):
    """An ``OSError`` (``errno`` kept) whose text is one plain sentence naming the file, without ``[Errno N]``."""

    def __str__(self) -> str:
        return str(self.strerror)


def write_error(path: str | os.PathLike[str], err: OSError) -> OSError:
    """A one-line ``OSError`` (same ``errno``) naming ``path`` and what went wrong, e.g. a full disk."""
    reason = err.strerror or str(err) or type(err).__name__
    hint = {
        errno.ENOSPC: "; free some space or choose another folder",
        errno.EDQUOT: "; free some space or choose another folder",
        errno.EACCES: "; check the folder's permissions or choose another folder",
        errno.EROFS: "; choose a writable folder",
    }.get(err.errno or 0, "")
    return WriteError(err.errno, f"cannot write {os.fspath(path)}: {reason}{hint}")


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform / filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[Path], None],
    *,
    verify: Callable[[Path], None] | None = None,
    make_parents: bool = True,
) -> Path:
    """Call ``write(tmp)`` on a new file beside ``path``, flush it, ``verify(tmp)`` if given, then move it onto
    ``path`` atomically. On any failure (also Ctrl-C) the temporary file is removed and ``path`` is untouched.

    Args:
        path: the target file.
        write: writes the complete content to the path it is given (it creates the file).
        verify: re-reads the written file and raises if it is not what was meant (e.g. a truncated write).
        make_parents: create missing parent folders; otherwise a missing folder is a ``FileNotFoundError``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: the folder cannot be created or written (full disk, permissions): one line naming ``path``
            (see :func:`write_error`).
        FileNotFoundError: the parent folder does not exist and ``make_parents`` is false.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        if not make_parents:
            raise FileNotFoundError(f"{path}: the output folder {folder} does not exist")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(path, err) from None
    tmp = folder / f".{path.stem}.{uuid.uuid4().hex[:12]}{TMP_MARK}{path.suffix}"
    try:
        try:
            write(tmp)
            _fsync(tmp)
        except OSError as err:
            raise write_error(path, err) from None
        if verify is not None:
            verify(tmp)
        replace_atomically(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def replace_atomically(source: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Move the complete, flushed file ``source`` onto ``path`` (``os.replace``, atomic on POSIX) and flush the folder.

    For files that must keep a stable temporary name of their own (a resumable download's ``.partial``); everything
    else goes through :func:`atomic_write`, which calls this.

    Raises:
        OSError: one line naming ``path`` (see :func:`write_error`).
    """
    path = Path(path)
    try:
        os.replace(source, path)
    except OSError as err:
        raise write_error(path, err) from None
    _fsync_folder(path.parent)
    return path


def atomic_write_bytes(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    verify: Callable[[Path], None] | None = None,
    make_parents: bool = True,
) -> Path:
    """:func:`atomic_write` of ``data`` (plain ``open``: the folder's usual permissions)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    return atomic_write(path, write, verify=verify, make_parents=make_parents)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, make_parents: bool = True) -> Path:
    """:func:`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), make_parents=make_parents)


def _jsonable(value: Any) -> Any:
    """``value`` with NaN/±inf floats as None, dataclasses as dicts, tuples as lists, other objects as str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    return str(value)


def strict_json(value: Any, indent: int | None = None) -> str:
    """Strict JSON text (RFC 8259) for every file and output of the project: an undefined number (NaN, ±inf,
    e.g. COCO's AP of an empty size bucket) becomes ``null``, which jq, JavaScript and other non-Python readers
    accept, where Python's default would write ``NaN``."""
    return json.dumps(_jsonable(value), indent=indent, allow_nan=False)


def atomic_write_json(path: str | os.PathLike[str], value: Any, *, indent: int | None = 2) -> Path:
    """:func:`atomic_write_text` of ``value`` as :func:`strict_json` (NaN/inf as ``null``)."""
    return atomic_write_text(path, strict_json(value, indent=indent))


def atomic_write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
    *,
    make_parents: bool = False,
) -> Path:
    """Write a state dict as safetensors with :func:`atomic_write`, read back (its header) before it replaces ``path``.

    Tensors are moved to the CPU and made contiguous; shared storage is cloned (safetensors refuses aliases).

    Raises:
        FileNotFoundError: the output folder does not exist (and ``make_parents`` is false).
        OSError: the folder is not writable or the disk is full (one line naming ``path``).
    """
    from safetensors import safe_open
    from safetensors.torch import save

    own = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    data = save(own, metadata=dict(metadata or {}))

    def verify(tmp: Path) -> None:
        with safe_open(os.fspath(tmp), framework="pt") as handle:
            if len(handle.keys()) != len(own):
                raise OSError(f"{path}: the file read back is not the one just written")

    return atomic_write_bytes(path, data, verify=verify, make_parents=make_parents)


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_write` left in ``folder``; returns what was removed."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for stale in folder.glob(f".*{TMP_MARK}*"):
            if stale.is_file():
                stale.unlink(missing_ok=True)
                removed.append(stale)
    return removed


def check_writable_folder(folder: str | os.PathLike[str], label: str | None = None) -> Path:
    """Create ``folder`` if needed and check that a file can be written in it (a real write, so also meaningful
    for root, whom permission bits do not stop); ``label`` starts the message (default: the folder), e.g.
    ``"train.output_dir=runs"``.

    Raises:
        WriteError: one line naming the folder and the reason (a file in the way, read-only, full disk, ...).
    """
    folder = Path(folder).expanduser()
    label = label or str(folder)
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise WriteError(errno.ENOTDIR, f"{label}: cannot create the folder {folder}, {blocker} is a file")
    probe = folder / f".dsnet-write-test.{uuid.uuid4().hex[:12]}{TMP_MARK}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"0")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        raise WriteError(err.errno, f"{label}: folder {folder} is not writable ({err.strerror or err})") from None
    finally:
        probe.unlink(missing_ok=True)
    return folder
