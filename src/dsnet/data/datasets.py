"""Classification datasets, timm transforms, and the deterministic sharded sampler the training loop relies on.

Reproducibility contract (what makes ``--resume`` and multi-process runs exact):

* :class:`ShardedEpochSampler` yields ``(index, epoch)`` keys: the permutation depends on ``(seed, epoch)`` only,
  each optimizer update consumes one contiguous slice of ``batch_size`` indices, rank ``r`` of ``w`` takes every
  ``w``-th index of that slice, and a run can restart in the middle of an epoch at any update;
* :class:`TransformedDataset` seeds the augmentation of each sample from ``(seed, epoch, index)``, so the crop of
  an image does not depend on the worker, the rank, or whether the run was resumed;
* a file that cannot be decoded is replaced by the next readable sample and reported with the batch (the loop warns
  and counts it) instead of killing the run.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from dsnet.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from dsnet.data.images import IMAGE_EXTENSIONS, ImageLoadError, load_image
from dsnet.errors import DSNetError

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "ClassificationDataset",
    "FashionMNISTDataset",
    "ImageFolderDataset",
    "ShardedEpochSampler",
    "TransformedDataset",
    "collate_with_bad_files",
    "sample_seed",
    "seeded_transform",
]

#: Per-channel statistics of the Fashion-MNIST training split (pixels scaled to 0…1).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530


class ClassificationDataset(Dataset):
    """Base: ``classes`` (names in label order), ``targets`` (one int per sample), ``load(i) -> PIL image``."""

    classes: tuple[str, ...]
    targets: Sequence[int]

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Human-readable origin of a sample (a file path, or dataset and index)."""
        return f"{type(self).__name__}[{index}]"

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load(index), int(self.targets[index])


class ImageFolderDataset(ClassificationDataset):
    """``root/<class>/<image>`` tree (the ImageNet ``train/`` / ``val/`` layout); classes sorted by folder name.

    Files without an image suffix are ignored; files that fail to decode raise :class:`ImageLoadError` at load time.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        DSNetError: ``root`` has no class folder or no image at all; with ``require_every_class`` (the training
            split, which defines the classes), also a class folder without images.
    """

    def __init__(
        self,
        root: str | Path,
        mode: str = "RGB",
        classes: Sequence[str] | None = None,
        *,
        require_every_class: bool = False,
    ) -> None:
        root = Path(root).expanduser()
        if root.exists() and not root.is_dir():
            raise DSNetError(f"dataset folder {root} is a file; expected a folder of class folders")
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder {root} does not exist")
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not found:
            raise DSNetError(f"dataset folder {root} has no class sub-folders (expected {root}/<class>/<image>)")
        if classes is not None:
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise DSNetError(f"{root}: class folders {unknown} are not among the training classes")
            found = list(classes)
        self.root, self.mode, self.classes = root, mode, tuple(found)
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            folder = root / name
            if folder.is_dir():
                files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
                self.samples.extend((p, label) for p in files)
        if not self.samples:
            raise DSNetError(
                f"dataset folder {root} has class folders but no image files ({', '.join(IMAGE_EXTENSIONS)})"
            )
        if require_every_class:
            empty = sorted(set(self.classes) - {self.classes[label] for _, label in self.samples})
            if empty:
                raise DSNetError(
                    f"dataset folder {root}: class folder(s) {empty} hold no image files "
                    f"({', '.join(IMAGE_EXTENSIONS)}); a training class needs images: add some or remove the folder"
                )
        self.targets = [label for _, label in self.samples]

    def load(self, index: int) -> Image.Image:
        return load_image(self.samples[index][0], self.mode)

    def describe(self, index: int) -> str:
        return str(self.samples[index][0])


class FashionMNISTDataset(ClassificationDataset):
    """Fashion-MNIST from its IDX files (see :func:`dsnet.data.fashion_mnist.load_fashion_mnist`)."""

    def __init__(self, split: str, root: str | Path | None = None, mode: str = "L") -> None:
        self.images, labels = load_fashion_mnist(split, root)  # type: ignore[arg-type]
        self.targets = labels.tolist()
        self.classes, self.mode, self.split = FASHION_MNIST_CLASSES, mode, split

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index], mode="L").convert(self.mode)

    def describe(self, index: int) -> str:
        return f"fashion_mnist/{self.split}[{index}]"


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of the augmentation of sample ``index`` in ``epoch``: the same whichever rank or worker loads it."""
    return (seed * 1_000_003 + epoch * 10_000_019 + index * 7919) % (2**31 - 1)


def seeded_transform(transform: Callable[[Image.Image], Any], image: Image.Image, seed: int) -> Any:
    """``transform(image)`` with torch, ``random`` and numpy seeded by ``seed``; the global generators are left as
    they were (so augmentation never depends on, nor disturbs, what else the process draws)."""
    with torch.random.fork_rng(devices=[]):
        state = random.getstate(), np.random.get_state()
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            return transform(image)
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])


class TransformedDataset(Dataset):
    """``base`` samples through ``transform``, seeded per ``(seed, epoch, index)``; bad files are replaced.

    Keys are ints or ``(index, epoch)`` pairs (as :class:`ShardedEpochSampler` yields). Items are
    ``(tensor, target, bad)`` where ``bad`` lists the files skipped to produce this sample (usually empty).
    With ``replace_bad=False`` (evaluation) an unreadable file gives ``(None, target, [message])`` instead, which
    :func:`collate_with_bad_files` drops: evaluation then counts only the images it really saw.
    """

    def __init__(
        self,
        base: ClassificationDataset,
        transform: Callable[[Image.Image], Any],
        seed: int = 0,
        replace_bad: bool = True,
    ) -> None:
        self.base, self.transform, self.seed, self.replace_bad = base, transform, seed, replace_bad

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int, list[str]]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        bad: list[str] = []
        for attempt in range(min(len(self.base), 50)):
            current = (index + attempt) % len(self.base)
            try:
                image = self.base.load(current)
            except ImageLoadError as err:
                bad.append(str(err))
                if not self.replace_bad:
                    return None, int(self.base.targets[current]), bad
                continue
            sample = seeded_transform(self.transform, image, sample_seed(self.seed, epoch, current))
            return sample, int(self.base.targets[current]), bad
        raise ImageLoadError(f"{len(bad)} consecutive unreadable images, the last: {bad[-1]}")


def collate_with_bad_files(items: list[tuple[Any, int, list[str]]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stack ``(tensor, target, bad)`` items into ``(images (B, C, H, W), targets (B,), bad files)``.

    Items whose tensor is ``None`` (unreadable, not replaced) are left out of the batch.
    """
    bad = [b for item in items for b in item[2]]
    kept = [item for item in items if item[0] is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), bad
    images = torch.stack([item[0] for item in kept])
    targets = torch.tensor([item[1] for item in kept], dtype=torch.int64)
    return images, targets, bad


class ShardedEpochSampler(Sampler):
    """Training order of one rank: ``(index, epoch)`` keys, resumable mid-epoch (see the module docstring).

    Args:
        num_samples: dataset length.
        batch_size: GLOBAL samples per optimizer update; the last incomplete update of an epoch is dropped
            (``shuffle=True``) or kept and sharded unevenly (``shuffle=False``, evaluation: no sample is repeated).
        rank, world_size: this process and the number of processes.
        shuffle: permute with a generator seeded by ``seed + epoch``.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if batch_size % world_size:
            raise DSNetError(f"global batch {batch_size} is not divisible by the {world_size} processes")
        if shuffle and num_samples < batch_size:
            raise DSNetError(f"the dataset has {num_samples} samples, fewer than one global batch of {batch_size}")
        self.num_samples, self.batch_size, self.rank, self.world_size = num_samples, batch_size, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.epoch, self.start_update = 0, 0

    @property
    def updates_per_epoch(self) -> int:
        if self.shuffle:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int, start_update: int = 0) -> None:
        """Select the epoch, and skip its first ``start_update`` optimizer updates (resume)."""
        self.epoch, self.start_update = epoch, start_update

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=generator)[
            : self.updates_per_epoch * self.batch_size
        ].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._order()
        for start in range(self.start_update * self.batch_size, len(order), self.batch_size):
            for index in order[start : start + self.batch_size][self.rank :: self.world_size]:
                yield index, self.epoch

    def __len__(self) -> int:
        order_len = self.updates_per_epoch * self.batch_size if self.shuffle else self.num_samples
        count = 0
        for start in range(self.start_update * self.batch_size, order_len, self.batch_size):
            size = min(self.batch_size, order_len - start)
            count += len(range(self.rank, size, self.world_size))
        return count
