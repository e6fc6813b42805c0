"""WebDataset shards (``.tar`` files of ``<key>.png|jpg`` + ``<key>.cls``) read through timm's ``wds/`` reader.

timm's :class:`~timm.data.readers.reader_wds.ReaderWds` (``timm.data.create_dataset("wds/", ...)``) finds the shards
(``_info.json`` split descriptions, or a split written as ``"train-{0000..0007}.tar|4000"``: brace pattern and sample
count), gives each process and DataLoader worker its own shards, shuffles the shard order per epoch (seeded) and
samples through a buffer, and decodes the images. What it yields is a stream without sample indices, so this
module adds what the training loop's map-style datasets give by index:

* augmentation seeded per ``(seed, epoch, rank, worker, position in the stream)``, not by the global generators, so
  the same stream gets the same crops whoever reads it and whenever;
* restart inside an epoch: the stream of an ``(epoch, rank, worker)`` is a function of the seed alone (shard order
  seeded by the epoch, the shuffle buffer by rank and worker), so a resumed run reads and drops the samples of the
  updates already done, then continues exactly where the interrupted run was.

Every process must read the same number of batches: the shards must split evenly over processes × workers
(:class:`WebDatasetSource` checks the count). Unreadable samples are dropped by timm's reader with a logged warning
(they are not counted in ``summary.json``, unlike image folders).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from dsnet.data.datasets import sample_seed, seeded_transform
from dsnet.errors import DSNetError

__all__ = ["WebDatasetEpoch", "WebDatasetSource"]

#: Positions of one stream stay below this; the seed key combines (rank, worker, position).
_STREAM_SPAN = 10_000_000


class WebDatasetSource:
    """One split of a WebDataset: ``root`` holds the shards (and ``_info.json``); ``split`` names the split.

    Args:
        root: folder of the shards.
        split: a split of ``_info.json``, or ``"<name>-{0000..0003}.tar|<number of samples>"``.
        is_training: shuffle (shards per epoch, samples in a buffer); evaluation reads in shard order.
        micro_batch: samples per process and forward pass (timm sizes each worker's share in whole batches).
        seed: shard-order seed, shared by every process.
        mode: ``"RGB"`` or ``"L"``.
        world_size, workers: processes, and DataLoader workers per process.
        num_samples: read only this many (``data.max_*_samples``).
    """

    def __init__(
        self,
        root: str,
        split: str,
        *,
        is_training: bool,
        micro_batch: int,
        seed: int,
        mode: str = "RGB",
        world_size: int = 1,
        workers: int = 0,
        num_samples: int | None = None,
    ) -> None:
        try:
            import webdataset  # noqa: F401  (timm's reader needs it; say so before timm's own message)
        except ImportError:
            raise DSNetError(
                "data.dataset=wds needs the webdataset package: pip install 'dsnet[data]' (or webdataset)"
            ) from None
        from timm.data import create_dataset

        try:
            self.dataset = create_dataset(
                "wds/", root=root, split=split, is_training=is_training, batch_size=micro_batch, seed=seed,
                input_img_mode=mode, num_samples=num_samples,
            )  # fmt: skip
        except (RuntimeError, KeyError, ValueError, FileNotFoundError, IndexError) as err:
            raise DSNetError(f"WebDataset {root!r} split {split!r}: {err}") from None
        info = self.dataset.reader.split_info
        self.num_shards = len(info.filenames)
        self.num_samples = int(self.dataset.reader.num_samples)
        self.is_training = is_training
        readers = world_size * max(workers, 1)
        if self.num_shards % readers and (is_training or world_size > 1):
            raise DSNetError(
                f"WebDataset {root!r} split {split!r} has {self.num_shards} shard(s), which do not split evenly over "
                f"{world_size} process(es) × {max(workers, 1)} DataLoader worker(s); use a multiple of {readers} "
                "shards or change data.workers"
            )
        if not self.num_samples:
            raise DSNetError(f"WebDataset {root!r} split {split!r}: the number of samples is unknown; write it "
                             "into _info.json or the split (e.g. 'train-{0000..0003}.tar|1000')")  # fmt: skip

    def epoch(
        self, epoch: int, transform: Callable[[Any], Any], seed: int, rank: int, skip_batches: int = 0
    ) -> WebDatasetEpoch:
        """The samples of ``epoch`` for this process, after its first ``skip_batches`` micro-batches."""
        return WebDatasetEpoch(self, epoch, transform, seed, rank, skip_batches)


class WebDatasetEpoch(IterableDataset):
    """``(tensor, target, [])`` items of one epoch of a :class:`WebDatasetSource`, for a DataLoader."""

    def __init__(
        self, source: WebDatasetSource, epoch: int, transform: Callable[[Any], Any], seed: int, rank: int, skip: int
    ) -> None:
        self.source, self.epoch, self.transform, self.seed, self.rank, self.skip = (
            source, epoch, transform, seed, rank, skip,
        )  # fmt: skip

    def __iter__(self) -> Iterator[tuple[Any, int, list[str]]]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        # the DataLoader takes whole batches from its workers in turn: batch b comes from worker b % workers
        batch = self.source.dataset.reader.batch_size
        drop = math.ceil(max(self.skip - worker_id, 0) / workers) * batch
        reader = self.source.dataset.reader
        reader.set_epoch(self.epoch)
        # timm builds the pipeline once per reader, with a sample-shuffle generator that then runs on across epochs;
        # a fresh pipeline per epoch makes the stream of an epoch independent of the epochs read before it (a resumed
        # process starts at its epoch, not at the first)
        reader.ds = None
        stream = (self.rank * 64 + worker_id) * _STREAM_SPAN
        for position, (image, target) in enumerate(self.source.dataset):
            if position < drop:
                continue
            seed = sample_seed(self.seed, self.epoch, stream + position)
            yield seeded_transform(self.transform, image, seed), int(target), []
