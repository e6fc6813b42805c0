"""``dsnet.engine.runtime``: the helpers both training loops share (non-finite loss, AMP, seeds, devices, allocator)."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from dsnet.engine.distributed import resolve_device
from dsnet.engine.runtime import NonFiniteLossError, check_finite_loss, resolve_amp, seed_update, update_seed
from dsnet.errors import DSNetError


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_loss_stops_with_the_step_and_advice(value):
    with pytest.raises(NonFiniteLossError) as err:
        check_finite_loss(torch.tensor(value), epoch=2, update=17, lr=0.25, advice="lower optim.lr")
    assert str(err.value) == f"training loss is {value:.4g} at epoch 3, update 17 (lr 0.25); lower optim.lr"
    assert isinstance(err.value, DSNetError)  # the CLI prints it as one line


def test_finite_loss_passes():
    check_finite_loss(torch.tensor(1.5, requires_grad=True) * 2, epoch=0, update=0, lr=1e-3, advice="-")


def test_detection_gets_its_own_key_in_amp_errors():
    with pytest.raises(DSNetError, match=r"^run\.amp=fp16 needs a CUDA device") as err:
        resolve_amp("fp16", torch.device("cpu"), key="run.amp")
    assert "train." not in str(err.value)
    with pytest.raises(DSNetError, match=r"unknown run\.amp 'fp8'"):
        resolve_amp("fp8", torch.device("cpu"), key="run.amp")


def test_device_errors_name_the_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DSNetError, match=r"^run\.device='cuda' but CUDA is not available"):
        resolve_device("cuda", key="run.device")


def test_seed_update_seeds_every_generator_the_same_way_each_time():
    def draws() -> tuple[float, float, float]:
        return torch.rand(()).item(), float(np.random.rand()), random.random()

    seed_update(3, 10, 0)
    first = draws()
    seed_update(3, 10, 0)
    assert draws() == first
    seed_update(3, 11, 0)
    assert draws() != first
    assert update_seed(3, 10, 0) != update_seed(3, 10, 1)  # ranks draw differently


_RSS_AFTER_FREE = """
import os, sys, torch
from dsnet.engine.runtime import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, above glibc's largest mmap threshold
before_free = rss()
del block
print(applied, (before_free - rss()) / 2**20)
"""


@pytest.mark.parametrize(("mode", "applied", "returned"), [("retain", True, False), ("default", False, True)])
def test_freed_memory_stays_for_reuse_only_when_retained(mode, applied, returned):
    """glibc unmaps a freed 64 MiB tensor at once (RSS drops by 64 MiB) unless retain_freed_memory ran (Linux)."""
    out = subprocess.run(
        [sys.executable, "-c", _RSS_AFTER_FREE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == str(applied)
    released_mib = float(out[1])
    assert (released_mib > 60) == returned, released_mib
