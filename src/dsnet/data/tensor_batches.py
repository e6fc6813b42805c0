"""Training batches straight from an in-memory uint8 tensor, augmented per batch on tensors instead of per image in PIL.

A dataset that fits in memory as one array (Fashion-MNIST: 60,000 × 28 × 28 bytes = 47 MB) does not need a
``DataLoader`` with worker processes and a PIL pipeline per image: on a 2-core CPU the worker competes with the
training threads, and the per-image path cost the main job about 40 % of its step rate. :class:`TensorBatches` takes
the keys of the same :class:`~dsnet.data.datasets.ShardedEpochSampler` (so resume and torchrun sharding are
unchanged), gathers the micro-batch from the array and applies :class:`BatchRandomResizedCrop`: one
``affine_grid`` / ``grid_sample`` call does timm's RandomResizedCrop (area ``scale``, log-uniform aspect ``ratio``),
the horizontal flip and the resize to the training size for the whole batch at once.

Every random draw of a sample is a hash of ``(seed, epoch, index)`` (:func:`sample_uniforms`), not the state of a
generator: the crop of an image is the same whichever rank draws it and whether the run was resumed, as with the
per-image path.

Example:
    >>> import torch
    >>> from dsnet.data.datasets import ShardedEpochSampler
    >>> images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    >>> targets = torch.arange(64) % 10
    >>> sampler = ShardedEpochSampler(64, batch_size=16, seed=0)
    >>> batches = TensorBatches(images, targets, sampler, 16, BatchRandomResizedCrop(32), (0.286,), (0.353,))
    >>> x, y, bad = next(iter(batches))
    >>> x.shape, y.shape, bad
    (torch.Size([16, 1, 32, 32]), torch.Size([16]), [])
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dsnet.data.datasets import ShardedEpochSampler
from dsnet.errors import DSNetError

__all__ = ["BatchRandomResizedCrop", "TensorBatches", "sample_uniforms"]

_MASK64 = (1 << 64) - 1


def sample_uniforms(seed: int, epoch: int, indices: Sequence[int] | np.ndarray, count: int) -> np.ndarray:
    """``(len(indices), count)`` uniforms in [0, 1): a SplitMix64 hash of ``(seed, epoch, index, k)``.

    Counter-based, so the draws of a sample depend only on these four numbers (not on batch composition or rank).
    """
    key = ((seed & 0xFFFFFFFF) << 32 | (epoch & 0xFFFFFFFF)) * 0x9E3779B97F4A7C15 & _MASK64
    x = np.asarray(indices, dtype=np.uint64)[:, None] * np.uint64(0xD1B54A32D192ED03)
    x = x + np.arange(1, count + 1, dtype=np.uint64)[None, :] * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class BatchRandomResizedCrop:
    """RandomResizedCrop + horizontal flip + resize for a batch (B, C, H, W) in one bilinear ``grid_sample``.

    As timm's ``RandomResizedCropAndInterpolation``, the crop covers a fraction of the image area drawn uniformly from
    ``scale`` with an aspect ratio drawn log-uniformly from ``ratio``; instead of re-drawing up to ten times when the
    box does not fit, the box is clipped to the image (same distribution where it fits, which is everywhere for the
    default ranges on square images). The crop's position is uniform over the positions where it fits.

    Args:
        size: output side (square).
        scale: range of the crop's area as a fraction of the image.
        ratio: range of the crop's aspect ratio (width / height).
        hflip: probability of a horizontal flip.
    """

    #: uniforms consumed per sample: area, log-ratio, x, y, flip
    draws = 5

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
    ) -> None:
        if size < 1:
            raise DSNetError(f"crop size must be positive, got {size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise DSNetError(f"data.scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise DSNetError(f"data.ratio must satisfy 0 < low <= high, got {ratio}")
        if not 0 <= hflip <= 1:
            raise DSNetError(f"data.hflip must lie in [0, 1], got {hflip}")
        self.size, self.scale, self.ratio, self.hflip = size, scale, ratio, hflip

    def __call__(self, images: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """Augment ``images`` (B, C, H, W), float, with per-sample ``uniforms`` (B, 5) → (B, C, size, size)."""
        batch, _, height, width = images.shape
        u = uniforms.to(images.device, torch.float64)
        area = (self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0]) * (height * width)
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
        crop_w = torch.sqrt(area * aspect).clamp(max=width)  # pixels
        crop_h = torch.sqrt(area / aspect).clamp(max=height)
        left = (width - crop_w) * u[:, 2]
        top = (height - crop_h) * u[:, 3]
        flip = torch.where(u[:, 4] < self.hflip, -1.0, 1.0).to(torch.float64)
        # affine_grid maps output coordinates in [-1, 1] to input coordinates in [-1, 1] (align_corners=False):
        # x_in = (left + (x_out + 1) / 2 * crop_w) / width * 2 - 1, and likewise for y.
        theta = torch.zeros(batch, 2, 3, dtype=torch.float64, device=images.device)
        theta[:, 0, 0] = crop_w / width * flip
        theta[:, 0, 2] = (2 * left + crop_w) / width - 1
        theta[:, 1, 1] = crop_h / height
        theta[:, 1, 2] = (2 * top + crop_h) / height - 1
        grid = F.affine_grid(
            theta.to(images.dtype), [batch, images.shape[1], self.size, self.size], align_corners=False
        )
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class TensorBatches:
    """An iterable of training micro-batches ``(images, targets, [])`` drawn from in-memory tensors.

    Stands in for ``DataLoader(TransformedDataset(...), sampler=sampler, batch_size=micro_batch)``: same keys from
    ``sampler``, same ``(images (B, C, size, size) float, targets (B,) int64, bad files)`` triples (the list is always
    empty: decoded arrays have no unreadable files).

    Args:
        images: (N, C, H, W) uint8 images (C = the model's input channels; grey is expanded with ``expand``).
        targets: (N,) int64 labels.
        sampler: the epoch sampler yielding ``(index, epoch)`` keys for this rank.
        micro_batch: samples per yielded batch.
        augment: the batch augmentation.
        mean, std: normalisation per channel (pixels scaled to 0…1 first).
        seed: the run's seed (the augmentation hash's key).
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        sampler: ShardedEpochSampler,
        micro_batch: int,
        augment: BatchRandomResizedCrop,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DSNetError(f"TensorBatches needs (N, C, H, W) uint8 images, got {images.dtype} {tuple(images.shape)}")
        channels = images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise DSNetError(f"mean/std have {len(mean)}/{len(std)} values for {channels}-channel images")
        self.images, self.targets, self.sampler = images, targets, sampler
        self.micro_batch, self.augment, self.seed = micro_batch, augment, seed
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.micro_batch)

    def _batch(self, keys: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        indices = np.fromiter((k[0] for k in keys), dtype=np.int64, count=len(keys))
        epoch = keys[0][1]
        index = torch.from_numpy(indices)
        images = self.images[index].float().div_(255)  # (B, C, H, W) in 0…1
        uniforms = torch.from_numpy(sample_uniforms(self.seed, epoch, indices, self.augment.draws))
        images = self.augment(images, uniforms)
        return images.sub_(self.mean).div_(self.std), self.targets[index], []

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        keys: list[tuple[int, int]] = []
        for key in self.sampler:
            keys.append(key)
            if len(keys) == self.micro_batch:
                yield self._batch(keys)
                keys = []
        if keys:
            yield self._batch(keys)
