"""The in-memory, per-batch tensor pipeline (``data.pipeline=tensor``): crop geometry, determinism, sharding, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dsnet.data.datasets import ShardedEpochSampler
from dsnet.data.tensor_batches import BatchRandomResizedCrop, TensorBatches, sample_uniforms
from dsnet.engine.config import load_config
from dsnet.engine.trainer import train


def test_uniforms_are_a_function_of_seed_epoch_and_index():
    a = sample_uniforms(0, 3, [5, 9, 11], 4)
    assert a.shape == (3, 4) and (a >= 0).all() and (a < 1).all()
    np.testing.assert_array_equal(a[1], sample_uniforms(0, 3, [9], 4)[0])  # not on the batch it sits in
    assert not np.allclose(a, sample_uniforms(0, 4, [5, 9, 11], 4))  # another epoch
    assert not np.allclose(a, sample_uniforms(1, 3, [5, 9, 11], 4))  # another seed
    draws = sample_uniforms(7, 0, np.arange(20_000), 1).ravel()
    assert abs(draws.mean() - 0.5) < 0.01 and abs(draws.var() - 1 / 12) < 0.005  # uniform


def test_full_crop_is_a_plain_resize_and_flip_mirrors():
    images = torch.rand(3, 2, 28, 28)
    u = torch.rand(3, 5)
    full = BatchRandomResizedCrop(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)(images, u)
    expected = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=0)
    flipped = BatchRandomResizedCrop(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)(images, u)
    torch.testing.assert_close(flipped, expected.flip(-1), atol=1e-5, rtol=0)


def test_crop_box_lands_where_the_draws_say():
    # an image whose value is its x pixel coordinate: bilinear sampling returns the sampled x exactly
    height, width, size = 20, 30, 16
    ramp = torch.arange(width, dtype=torch.float64).expand(1, 1, height, width).repeat(4, 1, 1, 1)
    u = torch.tensor(sample_uniforms(0, 0, range(4), 5))
    u[:, 4] = 0.9  # no flip
    crop = BatchRandomResizedCrop(size, scale=(0.2, 0.3), ratio=(0.8, 1.25), hflip=0.5)
    out = crop(ramp, u)
    area = (0.2 + 0.1 * u[:, 0]) * height * width
    aspect = torch.exp(np.log(0.8) + (np.log(1.25) - np.log(0.8)) * u[:, 1])
    crop_w = torch.sqrt(area * aspect)
    left = (width - crop_w) * u[:, 2]
    centres = torch.arange(size, dtype=torch.float64) + 0.5
    expected_x = left[:, None] + centres[None] * crop_w[:, None] / size - 0.5  # pixel-centre coordinates
    torch.testing.assert_close(out[:, 0, size // 2], expected_x, atol=1e-6, rtol=0)


def _batches(images, sampler, micro=8):
    return TensorBatches(images, torch.arange(len(images)), sampler, micro, BatchRandomResizedCrop(32), (0.5,), (0.25,))


def test_a_sample_looks_the_same_whichever_rank_draws_it_and_after_resume():
    images = torch.randint(0, 256, (48, 1, 28, 28), dtype=torch.uint8)
    single = {}
    sampler = ShardedEpochSampler(48, 16, seed=3)
    sampler.set_epoch(2)
    for x, y, bad in _batches(images, sampler):
        assert bad == [] and x.shape[1:] == (1, 32, 32)
        single.update({int(i): xi for i, xi in zip(y, x)})
    assert len(single) == 48
    for rank in (0, 1):
        shard = ShardedEpochSampler(48, 16, rank=rank, world_size=2, seed=3)
        shard.set_epoch(2, start_update=1)  # also: resumed after the first update of the epoch
        seen = 0
        for x, y, _ in _batches(images, shard):
            for i, xi in zip(y, x):
                torch.testing.assert_close(xi, single[int(i)], atol=0, rtol=0)
                seen += 1
        assert seen == 16  # two remaining updates of 16, half of each
    images_mean = ((images.float() / 255 - 0.5) / 0.25).mean()
    assert abs(torch.stack(list(single.values())).mean() - images_mean) < 0.3  # normalised as asked


def test_bad_configs_name_the_key(tmp_path):
    from dsnet.data.build import build_tensor_batches

    cfg = load_config(None, ["data.dataset=imagefolder", "data.pipeline=tensor"])
    sampler = ShardedEpochSampler(10, 2)
    with pytest.raises(ValueError, match=r"data\.pipeline=tensor needs a dataset held in memory"):
        build_tensor_batches(cfg.data, object(), sampler, 2, 1, 0)  # type: ignore[arg-type]


def test_fashion_mnist_tensor_pipeline_trains_deterministically(tmp_path):
    """The trainer on data.pipeline=tensor: two runs with one seed end with the same weights, bit for bit.

    (Resume needs nothing of its own: the batches are a function of the sampler's keys, checked above, and the loop's
    resume is the one tests/test_engine_train.py kills and resumes.)
    """
    overrides = [
        "model.name=dsnet_tiny",
        "model.in_chans=1",
        "model.drop_path=0.0",
        "model.kwargs.global_strides=[2,2,1,1]",
        "model.kwargs.depths=[1,1,1,1]",
        "data.dataset=fashion_mnist",
        "data.pipeline=tensor",
        "data.input_size=32",
        "data.interpolation=bilinear",
        "data.aa=null",
        "data.color_jitter=0",
        "data.reprob=0",
        "data.mixup=0",
        "data.cutmix=0",
        "data.max_train_samples=128",
        "data.max_val_samples=32",
        "data.workers=0",
        "optim.lr_base_batch=0",
        "sched.epochs=2",
        "sched.warmup_epochs=0",
        "train.batch_size=32",
        "train.threads=1",
        f"train.output_dir={tmp_path}",
    ]
    runs = [train(load_config(None, [*overrides, f"train.name=r{i}"]), log=lambda s: None) for i in range(2)]
    a, b = (load_file(r / "checkpoints" / "last.safetensors") for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["final"]["num_samples"] == 32 and summary["updates"] == 8
    with pytest.raises(ValueError, match=r"data\.aa=rand-m9-mstd0\.5-inc1 needs data\.pipeline=pil"):
        train(load_config(None, [*overrides, "data.aa=rand-m9-mstd0.5-inc1"]), log=lambda s: None)
