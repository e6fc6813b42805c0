"""``dsnet.engine.runtime``: the helpers both training loops share (non-finite loss, AMP, seeds, devices, allocator)."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from dsnet.engine.distributed import resolve_device
from dsnet.engine.runtime import (
    NonFiniteLossError,
    check_finite_loss,
    configure_memory,
    resolve_amp,
    seed_update,
    transparent_huge_pages,
    update_seed,
)
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
from dsnet.engine.runtime import configure_memory
print(configure_memory(sys.argv[1]))
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, above glibc's largest mmap threshold
before_free = rss()
del block
print((before_free - rss()) / 2**20)
"""


def _in_fresh_process(script: str, *args: str, env: dict[str, str] | None = None) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "DSNET_MALLOC")}
    completed = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=environ | (env or {})
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.strip().splitlines()


@pytest.mark.parametrize(("mode", "returned"), [("retain", False), ("hugepages", True), ("libc", True)])
def test_freed_memory_stays_for_reuse_only_when_retained(mode, returned):
    """glibc unmaps a freed 64 MiB tensor at once (RSS drops by 64 MiB) unless the "retain" mode ran (Linux)."""
    said, released_mib = _in_fresh_process(_RSS_AFTER_FREE, mode)
    assert ("glibc keeps freed memory" in said) == (mode == "retain"), said
    assert (float(released_mib) > 60) == returned, released_mib


_HUGE_PAGES_AFTER_CLI = """
import sys, torch
from dsnet.cli.main import main
try:
    main(sys.argv[1:])  # parses, configures memory, runs the subcommand: as every dsnet command starts
except SystemExit:
    pass
block = torch.ones(64 * 2**20 // 4)
print(sum(int(line.split()[1]) for line in open("/proc/self/smaps") if line.startswith("AnonHugePages")) // 1024)
"""


@pytest.mark.parametrize(("malloc", "huge"), [(None, True), ("libc", False)])
def test_the_dsnet_command_backs_large_tensors_with_huge_pages(malloc, huge):
    """After the command's own imports and start-up, a 64 MiB tensor lies on 2 MB pages unless DSNET_MALLOC=libc
    (needs the kernel to allow them: policy madvise, as on this project's machines, or always)."""
    policy = transparent_huge_pages()
    assert policy in ("always", "madvise", "never")
    env = {} if malloc is None else {"DSNET_MALLOC": malloc}
    huge_mib = _in_fresh_process(_HUGE_PAGES_AFTER_CLI, "info", env=env)[-1]  # after what info printed
    expected = policy == "always" or (huge and policy == "madvise")
    assert (int(huge_mib) >= 32) == expected, (policy, huge_mib)


def test_an_unknown_memory_mode_is_a_one_line_error():
    with pytest.raises(DSNetError, match=r"^DSNET_MALLOC='big' is not a memory mode; choose one of hugepages, retain"):
        configure_memory("big", key="DSNET_MALLOC")
    completed = subprocess.run(
        [sys.executable, "-m", "dsnet.cli.main", "info"],
        capture_output=True,
        text=True,
        env=os.environ | {"DSNET_MALLOC": "big"},
    )
    assert completed.returncode == 2
    assert completed.stderr.strip() == (
        "dsnet: error: DSNET_MALLOC='big' is not a memory mode; choose one of hugepages, retain, libc"
    )


def test_the_huge_page_policy_is_read_from_the_bracketed_choice(tmp_path):
    policy = tmp_path / "enabled"
    policy.write_text("always [madvise] never\n")
    assert transparent_huge_pages(str(policy)) == "madvise"
    policy.write_text("[never]\n")
    assert transparent_huge_pages(str(policy)) == "never"
    assert transparent_huge_pages(str(tmp_path / "missing")) == "never"
