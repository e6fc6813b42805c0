"""The training loop end to end on a tiny ImageFolder: run folder, checkpoints, bad files, NaN, exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from _engine_helpers import CLASSES, fast_overrides, make_imagefolder
from dsnet.engine.checkpoint import load_training_state, read_metadata
from dsnet.engine.config import load_config
from dsnet.engine.inference import load_checkpoint
from dsnet.engine.runtime import NonFiniteLossError
from dsnet.engine.trainer import train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One short training run (2 epochs) with one unreadable image in the training set."""
    root = make_imagefolder(tmp_path_factory.mktemp("data"))
    (root / "train" / "square" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, fast_overrides(root, out, **{"train.ema": 0.9, "sched.epochs": 3}))
    with pytest.warns(UserWarning, match=r"zz_broken\.png"):
        run_dir = train(cfg, log=lambda s: None)
    return run_dir, root


def test_run_folder_contents(tiny_run):
    run_dir, _ = tiny_run
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "confusion.png", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert load_config(run_dir / "config.yaml").model.name == "test_convnext"  # the resolved config reloads
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["update"] for r in steps] == list(range(1, 13))  # 25 images // batch 6 = 4 updates × 3 epochs
    assert len(epochs) == 3 and all("top1" in r and "lr" in r for r in epochs)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["bad_files"] == 1 and "zz_broken.png" in summary["bad_file_messages"][0]
    assert summary["final"]["num_samples"] == 12
    assert set(summary["final"]["per_class"]) == set(CLASSES)
    assert summary["final_ema"] is not None
    assert Image.open(run_dir / "curves.png").size[0] > 500


def test_checkpoints_are_safetensors_and_weights_only(tiny_run):
    run_dir, _ = tiny_run
    folder = run_dir / "checkpoints"
    for name in ("last.safetensors", "last_ema.safetensors", "best.safetensors", "best_ema.safetensors"):
        assert load_file(folder / name), name
    meta = read_metadata(folder / "last.safetensors")
    assert meta["model"] == "test_convnext" and meta["classes"] == list(CLASSES) and meta["epoch"] == 3
    state, _ = load_training_state(folder)  # torch.load(weights_only=True) inside
    assert {"optimizer", "scheduler", "scaler", "rng", "ema"} <= set(state) and state["update"] == 12
    # stale states are removed: one for `last`, one for the `last.prev` it replaced (kept as a fallback)
    tokens = {read_metadata(folder / f"{tag}.safetensors")["token"] for tag in ("last", "last.prev")}
    assert {p.name for p in folder.glob("last-*.state.pt")} == {f"last-{t}.state.pt" for t in tokens}
    assert len(tokens) == 2 and read_metadata(folder / "last.prev.safetensors")["epoch"] == 2
    for state_file in folder.glob("last-*.state.pt"):
        torch.load(state_file, weights_only=True)


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    root = make_imagefolder(tmp_path / "data", per_class_train=2, per_class_val=1)
    cfg = load_config(None, fast_overrides(root, tmp_path / "runs", **{"optim.lr": 1e30, "optim.opt": "sgd"}))
    with pytest.raises(
        NonFiniteLossError, match=r"training loss is (nan|inf) at epoch \d, update \d+ \(lr [0-9.e+]+\); lower optim.lr"
    ):
        train(cfg, log=lambda s: None)


def test_dataset_errors_are_clear(tmp_path):
    cfg = load_config(None, fast_overrides(tmp_path / "nothing", tmp_path / "runs"))
    with pytest.raises(FileNotFoundError, match="nothing/train does not exist"):
        train(cfg, log=lambda s: None)
    root = make_imagefolder(tmp_path / "data", per_class_train=2, per_class_val=1)
    cfg = load_config(None, fast_overrides(root, tmp_path / "runs", **{"model.num_classes": 5}))
    with pytest.raises(ValueError, match=r"model\.num_classes=5 but the training set has 3 classes"):
        train(cfg, log=lambda s: None)


def _final_weights(run_dir):
    return load_file(run_dir / "checkpoints" / "last.safetensors")


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    """SIGKILL mid-epoch, resume, and end bit-identical to a run that was never interrupted.

    Everything random is on: RandomResizedCrop, flips, RandAugment, random erasing, mixup/cutmix, stochastic depth
    and EMA. Mid-epoch checkpoints come every 3 updates; the test hook pauses the run after the one of update 6
    (epoch 2 of 3, 2 of its 4 updates done), and the test kills it during that pause.
    """
    root = make_imagefolder(tmp_path / "data")
    extra = {
        "data.aa": "rand-m9-mstd0.5-inc1",
        "data.reprob": 0.25,
        "data.mixup": 0.8,
        "data.cutmix": 1.0,
        "model.drop_path": 0.1,
        "train.ema": 0.9,
        "train.ckpt_interval": 3,  # mid-epoch checkpoints at updates 3, 6 and 9
        "sched.epochs": 3,
    }
    overrides = fast_overrides(root, tmp_path / "killed", **extra)
    args = [sys.executable, "-m", "dsnet.cli.main", "train"] + [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DSNET_TEST_PAUSE_AFTER_CHECKPOINT": "6:120"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            found = list((tmp_path / "killed").glob("*/checkpoints/last.safetensors"))
            if found and read_metadata(found[0]).get("update") == 6:
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint at update 6 within 240 s")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed_dir = found[0].parents[1]
    state, _ = load_training_state(killed_dir / "checkpoints")
    assert (state["epoch"], state["update_in_epoch"], state["update"]) == (1, 2, 6)
    assert not (killed_dir / "summary.json").exists()

    train(resume=killed_dir, log=lambda s: None)
    reference = train(load_config(None, fast_overrides(root, tmp_path / "straight", **extra)), log=lambda s: None)
    resumed, straight = _final_weights(killed_dir), _final_weights(reference)
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key  # bitwise
    ema_resumed = load_file(killed_dir / "checkpoints" / "last_ema.safetensors")
    ema_straight = load_file(reference / "checkpoints" / "last_ema.safetensors")
    assert all(torch.equal(ema_resumed[k], ema_straight[k]) for k in ema_straight)
    steps = [json.loads(line) for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in steps if r["kind"] == "step"] == list(range(1, 13))  # no duplicated records


def test_fashion_mnist_grey_one_channel_dsnet_tiny(tmp_path):
    """The real dataset path: IDX files → grey PIL → in_chans=1 dsnet_tiny at 32 px (64 images, one epoch)."""
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist" / "dsnet_tiny.yaml",
        [
            "data.dataset=fashion_mnist",
            "data.max_train_samples=64",
            "data.max_val_samples=40",
            "data.workers=0",
            "model.name=dsnet_tiny",
            "model.in_chans=1",
            "data.input_size=32",
            "train.batch_size=32",
            "sched.epochs=1",
            "train.threads=1",
            f"train.output_dir={tmp_path}",
        ],
    )
    run_dir = train(cfg, log=lambda s: None)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["num_samples"] == 40 and summary["updates"] == 2
    assert read_metadata(run_dir / "checkpoints" / "last.safetensors")["in_chans"] == 1
    model, info = load_checkpoint(run_dir, tag="last")  # strict load into a 1-channel dsnet_tiny
    assert info.in_chans == 1 and model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    """2 micro-batches of 3 accumulate to the update of one batch of 6 (no BatchNorm, no mixup)."""
    root = make_imagefolder(tmp_path / "data", per_class_train=4, per_class_val=1)
    runs = []
    for accum in (1, 2):
        cfg = load_config(None, fast_overrides(root, tmp_path / f"a{accum}", **{"train.accum_steps": accum}))
        runs.append(load_file(train(cfg, log=lambda s: None) / "checkpoints" / "last.safetensors"))
    diff = max((runs[0][k] - runs[1][k]).abs().max().item() for k in runs[0])
    assert diff <= 1e-4, diff  # float32 summation order only (see test_engine_distributed for the tolerance)


def test_schedule_in_updates_ends_mid_epoch(tmp_path):
    """sched.updates=6 with 4 updates per epoch: one epoch and a half, the cosine reaching min_lr at update 6."""
    root = make_imagefolder(tmp_path / "data")
    extra = {"sched.updates": 6, "sched.epochs": 99, "sched.min_lr": 1e-4, "optim.lr": 0.01}
    run_dir = train(load_config(None, fast_overrides(root, tmp_path / "runs", **extra)), log=lambda s: None)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["update"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[-1]["lr"] == pytest.approx(1e-4, rel=1e-6) and steps[0]["lr"] > 5e-3
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["updates"] == 6 and summary["epochs"] == 1.5
