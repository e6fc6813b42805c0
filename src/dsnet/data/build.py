"""Datasets and timm transforms from a :class:`dsnet.engine.config.DataConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

from dsnet.data.datasets import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    ClassificationDataset,
    FashionMNISTDataset,
    ImageFolderDataset,
    ShardedEpochSampler,
)
from dsnet.data.tensor_batches import BatchRandomResizedCrop, TensorBatches
from dsnet.errors import DSNetError

__all__ = ["DATASETS", "PIPELINES", "build_dataset", "build_tensor_batches", "build_transform", "normalization"]

#: Values accepted by ``data.dataset``.
DATASETS = ("imagefolder", "fashion_mnist", "wds")
#: Values accepted by ``data.pipeline``.
PIPELINES = ("pil", "tensor")


def normalization(data: Any, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` with ``in_chans`` entries: the config's, else the dataset's, else ImageNet's."""
    if data.mean is not None and data.std is not None:
        mean, std = tuple(data.mean), tuple(data.std)
    elif data.dataset == "fashion_mnist":
        mean, std = (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,)
    else:
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    if len(mean) != in_chans:
        if len(mean) == 1:
            mean, std = mean * in_chans, std * in_chans
        elif in_chans == 1:  # an RGB statistic for a grey model: its average
            mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
        else:
            raise DSNetError(f"data.mean/std have {len(mean)} values but the model takes {in_chans} channels")
    return mean, std


def build_transform(data: Any, in_chans: int, is_training: bool):
    """timm's train (RandomResizedCrop, flip, RandAugment, random erasing) or eval (resize, center crop) pipeline."""
    mean, std = normalization(data, in_chans)
    kwargs: dict[str, Any] = dict(
        input_size=(in_chans, data.input_size, data.input_size),
        is_training=is_training,
        interpolation=data.interpolation,
        mean=mean,
        std=std,
        crop_pct=data.crop_pct,
    )
    if is_training:
        kwargs.update(
            scale=tuple(data.scale),
            ratio=tuple(data.ratio),
            hflip=data.hflip,
            auto_augment=data.aa or None,
            color_jitter=data.color_jitter,
            re_prob=data.reprob,
            re_mode="pixel",
            re_count=1,
        )
    elif kwargs["interpolation"] == "random":
        kwargs["interpolation"] = "bicubic"
    return create_transform(**kwargs)


def build_dataset(
    data: Any, split: str, in_chans: int, classes: tuple[str, ...] | None = None
) -> ClassificationDataset:
    """The ``"train"`` or ``"val"`` dataset of ``data`` (a DataConfig), images in ``L`` when ``in_chans == 1``."""
    mode = "L" if in_chans == 1 else "RGB"
    if data.dataset == "fashion_mnist":
        dataset: ClassificationDataset = FashionMNISTDataset("train" if split == "train" else "test", data.root, mode)
    elif data.dataset == "imagefolder":
        if data.root is None:
            raise DSNetError("data.root is required for data.dataset=imagefolder (a folder holding train/ and val/)")
        sub = data.train_split if split == "train" else data.val_split
        dataset = ImageFolderDataset(Path(data.root) / sub, mode, classes=classes, require_every_class=split == "train")
    elif data.dataset == "wds":
        raise DSNetError("WebDataset shards are streams: the training loop reads them (dsnet.data.webdataset)")
    else:
        raise DSNetError(f"unknown data.dataset {data.dataset!r}; expected one of {', '.join(DATASETS)}")
    limit = data.max_train_samples if split == "train" else data.max_val_samples
    if limit is not None:
        _truncate(dataset, limit)
    return dataset


def _truncate(dataset: ClassificationDataset, limit: int) -> None:
    """Keep the first ``limit`` samples (in place)."""
    if isinstance(dataset, ImageFolderDataset):
        # every class should stay represented: take samples round-robin over the classes
        by_class: dict[int, list] = {}
        for sample in dataset.samples:
            by_class.setdefault(sample[1], []).append(sample)
        picked: list = []
        queues = [list(v) for _, v in sorted(by_class.items())]
        while len(picked) < limit and any(queues):
            for queue in queues:
                if queue and len(picked) < limit:
                    picked.append(queue.pop(0))
        dataset.samples = sorted(picked, key=lambda s: (s[1], str(s[0])))
        dataset.targets = [label for _, label in dataset.samples]
    elif isinstance(dataset, FashionMNISTDataset):
        dataset.images = dataset.images[:limit]
        dataset.targets = dataset.targets[:limit]


def build_tensor_batches(
    data: Any, dataset: ClassificationDataset, sampler: ShardedEpochSampler, micro_batch: int, in_chans: int, seed: int
) -> TensorBatches:
    """The ``data.pipeline=tensor`` training batches of ``dataset``: in memory, augmented per batch on tensors.

    Raises:
        DSNetError: the dataset is not held in memory, or the config asks for an augmentation only the per-image
            pipeline has (the message names the key).
    """
    if not isinstance(dataset, FashionMNISTDataset):
        raise DSNetError(
            f"data.pipeline=tensor needs a dataset held in memory (data.dataset=fashion_mnist); "
            f"data.dataset={data.dataset} reads image files: use data.pipeline=pil"
        )
    unsupported = {
        "data.aa": data.aa,
        "data.color_jitter": data.color_jitter,
        "data.reprob": data.reprob,
    }
    used = [f"{k}={v}" for k, v in unsupported.items() if v]
    if used:
        raise DSNetError(
            f"data.pipeline=tensor does RandomResizedCrop and flips only; {', '.join(used)} needs data.pipeline=pil"
        )
    if data.interpolation != "bilinear":
        raise DSNetError(
            f"data.pipeline=tensor resizes bilinearly; set data.interpolation=bilinear, got {data.interpolation!r}"
        )
    images = torch.from_numpy(dataset.images).unsqueeze(1)  # (N, 1, H, W) uint8
    if in_chans != 1:
        images = images.expand(-1, in_chans, -1, -1)
    targets = torch.as_tensor(dataset.targets, dtype=torch.int64)
    mean, std = normalization(data, in_chans)
    augment = BatchRandomResizedCrop(data.input_size, tuple(data.scale), tuple(data.ratio), data.hflip)
    return TensorBatches(images, targets, sampler, micro_batch, augment, mean, std, seed)
