"""Fashion-MNIST (Xiao et al., 2017) read from its four IDX files, checksums verified.

The files are looked up, in order, in an explicit ``root``; the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``); ``~/.cache/dsnet/fashion-mnist``; and torchvision's layout
``<dir>/FashionMNIST/raw`` under ``./data`` and ``~/.cache/torchvision``. Each file may be gzipped (``.gz``,
as published) or already decompressed. The official MD5 of the published ``.gz`` is accepted; otherwise the
decompressed payload must match its official MD5 (the Debian package ships recompressed ``.gz`` files whose
bytes differ while their content is identical).

Example:
    >>> from dsnet.data.fashion_mnist import load_fashion_mnist, FASHION_MNIST_CLASSES
    >>> images, labels = load_fashion_mnist("test")
    >>> images.shape, images.dtype, labels.shape, labels.dtype
    ((10000, 28, 28), dtype('uint8'), (10000,), dtype('int64'))
    >>> FASHION_MNIST_CLASSES[labels[0]]
    'Ankle boot'
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path
from typing import Literal

import numpy as np

from dsnet.errors import DSNetError

__all__ = ["FASHION_MNIST_CLASSES", "find_fashion_mnist_root", "load_fashion_mnist", "read_idx"]

#: Class names in label order (0 … 9), as published by Zalando Research.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: Debian package ``dataset-fashion-mnist`` install location.
DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")

# split -> (images file, labels file), without the .gz suffix
_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Official MD5 of the published .gz files (github.com/zalandoresearch/fashion-mnist README).
_MD5_GZ: dict[str, str] = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
# Official MD5 of the decompressed IDX payloads.
_MD5_RAW: dict[str, str] = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
_COUNTS = {"train": 60_000, "test": 10_000}

_INSTALL_HINT = (
    "install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; or `bash scripts/setup.sh "
    "--with-data`), or put the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in a folder and pass it with --data-dir / root="
)


def _candidate_dirs(root: str | Path | None) -> list[Path]:
    """Folders that may hold the IDX files, most specific first."""
    if root is not None:
        root = Path(root).expanduser()
        return [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return [
        DEBIAN_ROOT,
        cache / "dsnet" / "fashion-mnist",
        Path("data") / "FashionMNIST" / "raw",
        cache / "torchvision" / "FashionMNIST" / "raw",
    ]


def _locate(folder: Path, name: str) -> Path | None:
    for path in (folder / f"{name}.gz", folder / name):
        if path.is_file():
            return path
    return None


def find_fashion_mnist_root(root: str | Path | None = None) -> Path:
    """The first candidate folder holding all four Fashion-MNIST files (see the module docstring).

    Raises:
        FileNotFoundError: no candidate folder has the four files; the message lists where it looked and how
            to install them.
    """
    candidates = _candidate_dirs(root)
    names = [n for pair in _FILES.values() for n in pair]
    for folder in candidates:
        if all(_locate(folder, n) is not None for n in names):
            return folder
    looked = ", ".join(str(c) for c in candidates)
    if root is not None and Path(root).expanduser().is_dir():
        missing = [n for n in names if _locate(Path(root).expanduser(), n) is None]
        lacking = ", ".join(f"{m}[.gz]" for m in missing)
        raise FileNotFoundError(f"Fashion-MNIST: {root} lacks {lacking}; {_INSTALL_HINT}")
    raise FileNotFoundError(f"Fashion-MNIST not found (looked in {looked}); {_INSTALL_HINT}")


def _read_verified(path: Path, name: str) -> bytes:
    """The decompressed bytes of ``path``, checked against the official MD5s."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        gz_md5 = hashlib.md5(data).hexdigest()
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise DSNetError(
                f"{path}: not a valid gzip file ({err}); expected MD5 {_MD5_GZ[name]}, got {gz_md5}. "
                "Re-install or re-download it."
            ) from err
    raw_md5 = hashlib.md5(data).hexdigest()
    if raw_md5 != _MD5_RAW[name]:
        where = "decompressed content of " if path.suffix == ".gz" else ""
        raise DSNetError(
            f"checksum mismatch for {where}{path}: expected MD5 {_MD5_RAW[name]} (official .gz: {_MD5_GZ[name]}), "
            f"got {raw_md5}. The file is corrupt or not Fashion-MNIST; re-install or re-download it."
        )
    return data


def read_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode an IDX array of unsigned bytes (magic ``0x0000 08 ndim``) into a numpy array.

    Raises:
        DSNetError: bad magic number, unsupported element type or a size that does not match the header.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DSNetError(f"{source}: not an IDX file (bad magic number {data[:4].hex()})")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise DSNetError(f"{source}: IDX element type 0x{dtype_code:02x} is not supported (expected 0x08, uint8)")
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise DSNetError(f"{source}: IDX header announces shape {shape} ({expected} bytes) but has {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(
    split: Literal["train", "test"], root: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64 of a Fashion-MNIST split, checksums verified.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        root: folder with the IDX files (or a torchvision root holding ``FashionMNIST/raw``); ``None`` searches
            the default locations listed in the module docstring.

    Raises:
        DSNetError: unknown split, or a file whose checksum does not match (the message names the file and the
            expected and actual MD5).
        FileNotFoundError: files missing (the message says how to install them).
    """
    if split not in _FILES:
        raise DSNetError(f"unknown Fashion-MNIST split {split!r}; expected one of {sorted(_FILES)}")
    folder = find_fashion_mnist_root(root)
    images_name, labels_name = _FILES[split]
    images_path, labels_path = _locate(folder, images_name), _locate(folder, labels_name)
    assert images_path is not None and labels_path is not None  # guaranteed by find_fashion_mnist_root
    images = read_idx(_read_verified(images_path, images_name), str(images_path))
    labels = read_idx(_read_verified(labels_path, labels_name), str(labels_path))
    n = _COUNTS[split]
    if images.shape != (n, 28, 28) or labels.shape != (n,):
        raise DSNetError(f"{folder}: unexpected shapes {images.shape} / {labels.shape} for split {split!r}")
    return images.copy(), labels.astype(np.int64)
