"""torchrun with 2 CPU processes (DDP over gloo) reaches the weights of 1 process at the same global batch.

The model is timm's ``test_convnext`` (LayerNorm, no BatchNorm: BN statistics would be computed per rank on
half batches and legitimately differ). Augmentation stays on (RandomResizedCrop, flips): it is seeded per sample,
so it is the same whichever rank loads an image. Mixup and stochastic depth are off: they draw per rank by design.
Tolerance: the gradient all-reduce sums the two half-batch means in another order than one full-batch mean, so
the weights agree only to float32 rounding, which AdamW amplifies for near-zero gradients (it divides by their
running RMS): max |Δ| ≤ 1e-4 after 8 updates (measured 1.5e-5). Each update moves weights by up to lr = 1e-2,
so a wrongly split batch (another sample, a sample twice) shows as differences of order 1e-2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from _engine_helpers import fast_overrides, make_imagefolder

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _train(nproc: int, root, out) -> dict:
    overrides = fast_overrides(root, out, **{"sched.epochs": 2, "train.batch_size": 6, "data.hflip": 0.5})
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    args = [*launcher, "-m", "dsnet.cli.main", "train"] + [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = list(out.iterdir())
    return {"dir": run_dir, "log": proc.stdout}


def test_two_processes_match_one(tmp_path):
    root = make_imagefolder(tmp_path / "data", per_class_train=9, per_class_val=5)
    one = _train(1, root, tmp_path / "one")
    two = _train(2, root, tmp_path / "two")
    assert "2 process(es)" in two["log"] and two["log"].count("run folder:") == 1  # rank 0 prints alone
    w1 = load_file(one["dir"] / "checkpoints" / "last.safetensors")
    w2 = load_file(two["dir"] / "checkpoints" / "last.safetensors")
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert diff <= 1e-4, diff
    s1 = json.loads((one["dir"] / "summary.json").read_text())
    s2 = json.loads((two["dir"] / "summary.json").read_text())
    assert s2["processes"] == 2 and s1["updates"] == s2["updates"] == 8  # 27 // 6 = 4 updates × 2 epochs
    # metrics are reduced over the ranks: the same 15 validation images are counted once each
    assert s1["final"]["num_samples"] == s2["final"]["num_samples"] == 15
    assert s1["final"]["confusion"] == s2["final"]["confusion"]
    assert len(list(two["dir"].parent.iterdir())) == 1  # one run folder, written by rank 0
