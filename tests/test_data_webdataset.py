"""WebDataset shards through timm's reader: every sample once per epoch across torchrun ranks, deterministic streams,
exact mid-epoch resume, and the training loop on shards (data.dataset=wds)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from _engine_helpers import fast_overrides, killed_after_checkpoint
from dsnet.data.webdataset import WebDatasetSource
from dsnet.engine.config import load_config
from dsnet.engine.trainer import train
from dsnet.errors import DSNetError

TRAIN_SPLIT = "train-{0000..0003}.tar|24"
VAL_SPLIT = "val-{0000..0001}.tar|8"


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (16, 16), value).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(root: Path) -> Path:
    """4 training shards × 6 samples and 2 validation shards × 4; sample ``i`` is a flat grey image of value
    ``10 i`` (its id can be read back from any pixel) of class ``i % 2``."""
    root.mkdir(parents=True, exist_ok=True)
    for split, shards, per_shard in (("train", 4, 6), ("val", 2, 4)):
        for shard in range(shards):
            with tarfile.open(root / f"{split}-{shard:04d}.tar", "w") as tar:
                for j in range(per_shard):
                    i = shard * per_shard + j
                    for ext, data in (("png", _png(10 * i)), ("cls", str(i % 2).encode())):
                        info = tarfile.TarInfo(f"{split}{i:04d}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    return root


def sample_id(image: Image.Image) -> int:
    return image.getpixel((0, 0)) // 10


def read_ids(root: Path, *epochs: int, rank: int = 0, world: int = 1, skip: int = 0) -> list[int]:
    """The ids of ``epochs`` read one after the other from one source (a process that trains them in turn)."""
    source = WebDatasetSource(str(root), TRAIN_SPLIT, is_training=True, micro_batch=4, seed=0, mode="L",
                              world_size=world)  # fmt: skip
    return [item[0] for e in epochs for item in source.epoch(e, sample_id, seed=0, rank=rank, skip_batches=skip)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("wds"))


def test_one_process_reads_each_sample_once_in_a_seeded_order(shards):
    first = read_ids(shards, 0)
    assert sorted(first) == list(range(24))
    assert read_ids(shards, 0) == first  # a function of (seed, epoch)
    assert sorted(read_ids(shards, 1)) == list(range(24)) and read_ids(shards, 1) != first  # reshuffled
    assert read_ids(shards, 0, skip=2) == first[8:]  # resume after 2 micro-batches of 4
    assert read_ids(shards, 0, 1)[24:] == read_ids(shards, 1)  # an epoch does not depend on the ones read before


def test_shards_that_do_not_split_over_the_processes_are_refused(shards):
    with pytest.raises(DSNetError, match=r"4 shard\(s\), which do not split evenly over 3 process\(es\)"):
        WebDatasetSource(str(shards), TRAIN_SPLIT, is_training=True, micro_batch=4, seed=0, world_size=3)
    with pytest.raises(DSNetError, match="WebDataset"):
        WebDatasetSource(str(shards), "absent", is_training=True, micro_batch=4, seed=0)


_RANK_SCRIPT = """
import json, sys
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_data_webdataset import read_ids
dist.init_process_group("gloo")
rank = dist.get_rank()
ids = {{epoch: read_ids({root!r}, epoch, rank=rank, world=2) for epoch in (0, 1)}}
with open({out!r} + f"/rank{{rank}}.json", "w") as handle:
    json.dump(ids, handle)
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_two_torchrun_processes_see_every_sample_once_per_epoch(shards, tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(_RANK_SCRIPT.format(tests=str(Path(__file__).parent), root=str(shards), out=str(tmp_path)))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    proc = subprocess.run(launcher, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in ("0", "1"):
        a, b = ranks[0][epoch], ranks[1][epoch]
        assert len(a) == len(b) == 12 and not set(a) & set(b) and sorted(a + b) == list(range(24)), epoch
    # and the training loop on that split: 24 samples // global batch 8 = 3 updates an epoch, each process
    # stepping on its 4 of every 8; the 8 validation images (one shard per process) are counted once
    sets = [*_sets(shards, tmp_path / "runs"), "sched.epochs=1"]
    args = [*launcher[:-1], "-m", "dsnet.cli.main", "train"] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["processes"], summary["updates"], summary["final"]["num_samples"]) == (2, 3, 8)


def _sets(shards: Path, out: Path) -> list[str]:
    sets = fast_overrides(shards, out, **{"data.dataset": "wds", "model.num_classes": 2, "model.in_chans": 1,
                                          "train.batch_size": 8, "data.hflip": 0.5})  # fmt: skip
    return [*sets, f"data.train_split={TRAIN_SPLIT}", f"data.val_split={VAL_SPLIT}"]


def _config(shards: Path, out: Path, *extra: str):
    return load_config(None, [*_sets(shards, out), *extra])


def test_training_on_shards_resumes_exactly(shards, tmp_path, monkeypatch):
    whole = train(_config(shards, tmp_path / "whole", "train.ckpt_interval=2"), log=lambda s: None)
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["updates"] == 6 and summary["final"]["num_samples"] == 8  # 24 // 8 × 2 epochs; every val sample
    with killed_after_checkpoint(monkeypatch, 4):
        train(_config(shards, tmp_path / "cut", "train.ckpt_interval=2"), log=lambda s: None)
    (cut,) = (tmp_path / "cut").iterdir()
    train(resume=cut, log=lambda s: None)  # mid-epoch 2: the stream is re-read up to update 4
    a, b = load_file(whole / "checkpoints" / "last.safetensors"), load_file(cut / "checkpoints" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shards_need_the_number_of_classes(shards, tmp_path):
    cfg = _config(shards, tmp_path)
    cfg.model.num_classes = None
    with pytest.raises(DSNetError, match=r"set model\.num_classes"):
        train(cfg, log=lambda s: None)
