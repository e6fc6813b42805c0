"""Read pickled dicts of numpy arrays (PaddleClas ``.pdparams``) without executing pickled code.

A pickle is a small program: every ``GLOBAL`` it names is imported and may be called. ``paddle.save`` writes a
state dict as a plain ``dict`` of ``numpy.ndarray`` (plus one metadata entry, see below), so reading one needs
exactly the handful of callables that rebuild numpy arrays. :class:`NumpyOnlyUnpickler` admits those and refuses
every other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ``torch._utils``, ...) before it is
imported, naming the file and the global.

What ``paddle.save(layer.state_dict(), path)`` writes (checked with paddle 3.3 and numpy 2; older releases
differ only in the module path of ``_reconstruct`` and, for pickle protocol 2, in storing bytes through
``_codecs.encode``)::

    {"<structured name>": numpy.ndarray, ..., "StructuredToParameterName@@": {"<structured name>": "<param name>"}}

Example:
    >>> import pickle, tempfile, numpy as np
    >>> path = tempfile.mktemp(suffix=".pdparams")
    >>> with open(path, "wb") as f:
    ...     pickle.dump({"head.weight": np.ones((2, 3), np.float32)}, f, protocol=4)
    >>> {k: v.shape for k, v in load_pdparams(path).items()}
    {'head.weight': (2, 3)}
"""

from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
from typing import Any

import numpy as np

from dsnet.errors import DSNetError

__all__ = ["PADDLE_METADATA_KEYS", "NumpyOnlyUnpickler", "UnsafePickleError", "load_numpy_pickle", "load_pdparams"]

#: Entries ``paddle.save`` adds beside the arrays; they describe the file, hold no weights, and are dropped.
PADDLE_METADATA_KEYS: frozenset[str] = frozenset({"StructuredToParameterName@@"})

# numpy's array rebuilder, whatever module path this numpy version gives it (``numpy.core`` before 2.0).
_reconstruct = np.ndarray.__reduce__(np.empty(0))[0]


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as pickle protocol 2 uses it (str → bytes in latin-1), and nothing else."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(
            f"_codecs.encode is admitted only as str → latin-1 bytes, got encoding {encoding!r}"
        )
    return codecs.encode(text, "latin1")


class UnsafePickleError(DSNetError):
    """A pickle asked for something beyond numpy arrays (a global, a persistent id); nothing of it was run."""


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild ``dict``/``list`` containers of numpy arrays and nothing else.

    Args:
        file: binary file object holding the pickle.
        name: how error messages name the source (usually its path).
    """

    #: (module, name) → the object the pickle receives. Both numpy module paths are listed because files written
    #: with numpy < 2 say ``numpy.core.multiarray`` and files written with numpy ≥ 2 say ``numpy._core.multiarray``.
    ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {  # noqa: RUF012  (a read-only table)
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }

    def __init__(self, file: io.BufferedIOBase, name: str = "<pickle>") -> None:
        super().__init__(file)
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            allowed = ", ".join(sorted(f"{m}.{n}" for m, n in self.ALLOWED_GLOBALS))
            raise UnsafePickleError(
                f"{self.name}: refusing to load global '{module}.{name}': a weights file should hold only numpy "
                f"arrays (admitted: {allowed}). Nothing was executed. If you trust this file, load it with its own "
                "framework and save the state dict again."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(
            f"{self.name}: the pickle refers to external storage (persistent id {pid!r}); this is not a Paddle "
            "state dict of numpy arrays (PyTorch checkpoints are read with `dsnet convert torch`)"
        )


def _describe_non_pickle(path: str, head: bytes) -> str | None:
    """A reason why bytes starting with ``head`` are clearly not a pickle written by ``paddle.save``, or None."""
    if not head:
        return f"{path}: the file is empty"
    if head.startswith(b"PK\x03\x04"):
        return (
            f"{path}: this is a zip archive (the PyTorch checkpoint format), not a Paddle .pdparams pickle; "
            "convert it with `dsnet convert torch`"
        )
    if head.startswith(b"\x93NUMPY"):
        return f"{path}: this is a single .npy array, not a Paddle .pdparams state dict"
    if head[:1] != b"\x80":  # every pickle of protocol ≥ 2 starts with the PROTO opcode
        return f"{path}: not a pickle file (it starts with bytes {head[:8]!r}; a .pdparams file starts with b'\\x80')"
    return None


def load_numpy_pickle(path: str | os.PathLike[str]) -> Any:
    """Unpickle ``path`` admitting only numpy arrays and plain containers; returns the unpickled object.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafePickleError: the pickle names a global other than numpy's array rebuilders (nothing is executed).
        DSNetError: the file is not a pickle, or it is truncated or corrupt.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DSNetError(f"{path}: is a directory, expected a .pdparams file")
    with open(path, "rb") as f:
        reason = _describe_non_pickle(path, f.read(8))
        if reason:
            raise DSNetError(reason)
        f.seek(0)
        try:
            obj = NumpyOnlyUnpickler(f, name=path).load()
        except UnsafePickleError:
            raise
        except EOFError:
            raise DSNetError(f"{path}: the pickle ends early (truncated file?)") from None
        except (
            pickle.UnpicklingError,
            ValueError,
            TypeError,
            IndexError,
            KeyError,
            AttributeError,
            OverflowError,
        ) as err:
            raise DSNetError(f"{path}: corrupt or truncated pickle ({type(err).__name__}: {err})") from None
        if f.read(1):
            raise DSNetError(f"{path}: unexpected bytes after the end of the pickle (corrupt file?)")
    return obj


def load_pdparams(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a PaddlePaddle state dict (``paddle.save`` / PaddleClas ``.pdparams``) as ``{name: numpy array}``.

    No code from the file runs (see :class:`NumpyOnlyUnpickler`). Paddle's metadata entries
    (:data:`PADDLE_METADATA_KEYS`) are dropped; anything else that is not a numeric array is an error.

    Raises:
        FileNotFoundError, UnsafePickleError, DSNetError: see :func:`load_numpy_pickle`; also DSNetError when the
            pickle is not a dict of numeric numpy arrays.
    """
    path = os.fspath(path)
    obj = load_numpy_pickle(path)
    if not isinstance(obj, dict):
        raise DSNetError(f"{path}: expected a dict of arrays (a state dict), found {type(obj).__name__}")
    out: dict[str, np.ndarray] = {}
    bad: list[str] = []
    for key, value in obj.items():
        if key in PADDLE_METADATA_KEYS:
            continue
        if not isinstance(key, str):
            bad.append(f"{key!r} (key is {type(key).__name__}, not str)")
        elif not isinstance(value, np.ndarray):
            bad.append(f"{key!r} ({type(value).__name__})")
        elif value.dtype.kind not in "biuf":
            bad.append(f"{key!r} (array of dtype {value.dtype})")
        else:
            out[key] = value
    if bad:
        shown = ", ".join(bad[:10]) + (f", ... ({len(bad)} in all)" if len(bad) > 10 else "")
        raise DSNetError(f"{path}: entries that are not numeric arrays: {shown}")
    if not out:
        raise DSNetError(f"{path}: the state dict holds no arrays")
    return out
