"""Runtime choices shared by the classification and the detection training loops.

CPU threads (:func:`auto_threads`, :func:`set_threads`), how CPU memory is allocated (:func:`configure_memory`:
huge pages, reuse of freed memory), the autocast dtype (:func:`resolve_amp`,
:func:`autocast_context`), the seeds drawn inside an update (:func:`update_seed`, :func:`seed_update`) and the stop on
a non-finite loss (:func:`check_finite_loss`). Messages name the config key the caller passes (``key=``), so that a
detection run is told about its own keys rather than the classification ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dsnet.engine.distributed import all_reduce_sum
from dsnet.errors import DSNetError

__all__ = [
    "AMP_MODES",
    "MEMORY_MODES",
    "NonFiniteLossError",
    "auto_threads",
    "autocast_context",
    "busy_cores",
    "check_finite_loss",
    "configure_memory",
    "cpu_has_native_bf16",
    "cpu_times",
    "resolve_amp",
    "retain_freed_memory",
    "seed_update",
    "set_threads",
    "transparent_huge_pages",
    "update_seed",
    "use_huge_pages",
]

#: Values of the ``amp`` config key, see :func:`resolve_amp`.
AMP_MODES: tuple[str, ...] = ("auto", "native", "none", "bf16", "fp16")


class NonFiniteLossError(DSNetError):
    """The training loss became NaN or infinite."""


def check_finite_loss(
    loss: torch.Tensor, *, epoch: int, update: int, lr: float, advice: str, world_size: int = 1
) -> None:
    """Stop training with :class:`NonFiniteLossError` when ``loss`` is NaN or infinite on any rank.

    With several processes the finiteness flag is summed over the ranks (a collective: every rank must call this
    at the same update), so that all of them stop together rather than some waiting forever in the next all-reduce.

    Args:
        loss: the loss of this step (a scalar).
        epoch: the 0-based epoch, reported 1-based.
        update: the optimizer update about to be taken.
        lr: the current learning rate, reported.
        advice: what to change, e.g. ``"lower optim.lr, set optim.clip_grad, or use train.amp=none"``.
        world_size: processes of the run.

    Raises:
        NonFiniteLossError: the message gives the loss, epoch, update and learning rate, then ``advice``.
    """
    finite = torch.isfinite(loss.detach()).to(torch.float64).reshape(())
    if world_size > 1:
        finite = all_reduce_sum(finite.clone()) / world_size
    if float(finite) < 1:
        value = loss.detach().float().reshape(-1)[0].item() if loss.numel() else float("nan")
        raise NonFiniteLossError(
            f"training loss is {value:.4g} at epoch {epoch + 1}, update {update} (lr {lr:.3g}); {advice}"
        )


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (the ``avx512_bf16`` or ``amx_bf16`` flag of Linux's ``cpuinfo``).

    Without those instructions oneDNN emulates bf16 and is slower than fp32. ``False`` where ``cpuinfo`` cannot be
    read (other operating systems)."""
    try:
        with open(cpuinfo) as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(
    amp: str, device: torch.device, *, key: str = "train.amp", cpuinfo: str = "/proc/cpuinfo"
) -> torch.dtype | None:
    """The autocast dtype for the ``amp`` setting on ``device`` (``None``: full fp32).

    * ``auto``: bf16 on CUDA devices that support it, fp32 on CPU;
    * ``native``: bf16 wherever the hardware has bf16 arithmetic: CUDA devices that support it, and CPUs with
      AVX512-BF16 or AMX (:func:`cpu_has_native_bf16`); fp32 elsewhere. Training on a CPU without those instructions
      would emulate bf16 and run slower than fp32, hence the check; ``benchmarks/train_throughput.py --amp`` measures
      the gain on a given machine;
    * ``bf16`` (any device), ``fp16`` (CUDA only, with a gradient scaler), ``none``.

    bf16 on CPU is not the default because of a oneDNN defect in torch 2.14.1: the bf16 weight gradient of a
    stride-2 3×3 convolution applied to a 1×1 map comes out non-finite (RetinaNet's P7 on images of 64 px or less).

    Raises:
        DSNetError: an unknown mode, or fp16 without CUDA; the message names ``key``.
    """
    if amp == "none":
        return None
    if amp in ("auto", "native"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if amp == "native" and device.type == "cpu" and cpu_has_native_bf16(cpuinfo) else None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise DSNetError(f"{key}=fp16 needs a CUDA device; use bf16 or none on CPU")
        return torch.float16
    raise DSNetError(f"unknown {key} {amp!r}; expected {', '.join(AMP_MODES[:-1])} or {AMP_MODES[-1]}")


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``amp_dtype`` on ``device``, or a null context when AMP is off."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def cpu_times(stat_path: str = "/proc/stat") -> tuple[int, int]:
    """(total, idle) CPU time of all cores so far, in clock ticks, from the first line of ``/proc/stat``."""
    with open(stat_path) as handle:
        values = [int(v) for v in handle.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    if len(values) < 5:
        raise ValueError(f"{stat_path}: not a cpu line")
    return sum(values), values[3] + values[4]


def busy_cores(
    window: float = 0.3,
    *,
    read_times: Callable[[], tuple[int, int]] = cpu_times,
    sleep: Callable[[float], None] = time.sleep,
    cores: int | None = None,
) -> float:
    """Cores in use right now: two ``read_times()`` readings (total, idle) ``window`` seconds apart (by default
    ``/proc/stat``), or the 1-minute load average where they cannot be read. The load average lags by a minute:
    right after a finished job it still reports the cores busy, and a new run would start on too few threads.

    ``read_times``, ``sleep`` and ``cores`` (default ``os.cpu_count()``) are injectable so the arithmetic can be
    tested on given readings rather than on the load of the machine running the test.
    """
    try:
        total0, idle0 = read_times()
        sleep(window)
        total1, idle1 = read_times()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0
    if total1 <= total0:
        return 0.0
    busy_share = 1.0 - (idle1 - idle0) / (total1 - total0)
    return (cores or os.cpu_count() or 1) * min(1.0, max(0.0, busy_share))


def auto_threads(local_processes: int = 1) -> int:
    """CPU threads per process: the cores not busy right now (:func:`busy_cores`), shared by the local ranks.

    On a machine shared with other jobs, more torch threads than free cores makes every step wait for preempted
    threads: dsnet_tiny at 32 px trained at 35 img/s with 2 threads and 157 img/s with 1 thread on 2 cores
    under a load of 6. On an idle machine this returns torch's default (one thread per physical core).
    """
    cores = torch.get_num_threads()
    free = max(1, min(cores, round((os.cpu_count() or cores) - busy_cores())))
    return max(1, free // max(local_processes, 1))


def set_threads(requested: int | None, device: torch.device) -> None:
    """torch CPU threads of a training process: ``requested``, or on CPU :func:`auto_threads` shared by the ranks
    torchrun started on this machine (``LOCAL_WORLD_SIZE``); GPU runs keep torch's default unless asked."""
    if requested or device.type == "cpu":
        torch.set_num_threads(requested or auto_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


#: glibc's ``mallopt`` parameters (malloc.h) and the value that turns both thresholds off (the largest it accepts)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _NO_THRESHOLD = -1, -3, 2**31 - 1
#: the kernel's transparent huge page policy: ``always [madvise] never``, the bracketed one in force
_THP_POLICY = "/sys/kernel/mm/transparent_hugepage/enabled"
#: PyTorch's own switch (c10/core/alloc_cpu.cpp): CPU blocks of 2 MB and more are 2 MB aligned and ``madvise``d
_TORCH_THP = "THP_MEM_ALLOC_ENABLE"

#: Values of :func:`configure_memory` (and of ``DSNET_MALLOC`` for the ``dsnet`` command).
MEMORY_MODES: tuple[str, ...] = ("hugepages", "retain", "libc")


def transparent_huge_pages(policy_path: str = _THP_POLICY) -> str:
    """The kernel's transparent huge page policy (``always``, ``madvise`` or ``never``; ``never`` off Linux)."""
    try:
        text = Path(policy_path).read_text()
    except OSError:
        return "never"
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "never"


def use_huge_pages() -> bool:
    """Ask torch to back every CPU tensor of 2 MB or more with transparent huge pages.

    Large activations are allocated and freed at every forward pass; glibc serves each with a fresh ``mmap`` and
    the kernel then faults it in 4 kB page by 4 kB page. With huge pages it faults 2 MB at a time: dsnet_tiny alone
    in a process (as ``dsnet predict``/``serve`` run it) went from 13.0-16.3 to 21.2-21.5 img/s at batch 16 on a
    2-core machine (``benchmarks/throughput.py --models dsnet_tiny --peers --malloc libc`` against the default, two
    alternating runs each), and memory is still returned to the system on free. This sets PyTorch's own switch,
    ``THP_MEM_ALLOC_ENABLE=1``, which torch reads at its first CPU allocation: call it before any tensor is
    made. A value the user already set wins. Returns whether huge pages are in effect (the kernel must allow them:
    policy ``always`` or ``madvise``).
    """
    os.environ.setdefault(_TORCH_THP, "1")
    return os.environ[_TORCH_THP] == "1" and transparent_huge_pages() != "never"


def retain_freed_memory() -> bool:
    """Let glibc's allocator keep the memory torch frees and hand it out again, instead of returning it to the OS.

    torch allocates CPU tensors with the C allocator. glibc serves every block above a threshold (at most 32 MB by
    default) with a fresh ``mmap`` and unmaps it on free, so each forward pass at batch 16 faults in its large
    activations again. With both of glibc's thresholds (mmap, trim) at their maximum, freed blocks stay in the
    process and are reused. The cost: the process keeps its peak memory (per malloc arena) until it exits, and a
    process that holds many models and runtime thread pools can grow far beyond what it uses (a benchmark process
    holding 13 models and their ONNX Runtime / OpenVINO sessions reached 23 GB), so this is opt-in
    (:func:`configure_memory` ``"retain"``). Returns whether the setting was applied (never elsewhere than glibc).
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _NO_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NO_THRESHOLD))


def configure_memory(mode: str = "hugepages", key: str = "memory mode") -> str:
    """Set how this process allocates CPU memory; returns what took effect, in words (for logs and table headers).

    ``"hugepages"`` (the ``dsnet`` command's default): :func:`use_huge_pages`, bounded — freed memory goes back to
    the system. ``"retain"``: huge pages and :func:`retain_freed_memory` (a little faster again, keeps the peak).
    ``"libc"``: the C library's and kernel's defaults. Call it before the first tensor is made; ``key`` names the
    setting in the error for an unknown mode (``DSNET_MALLOC`` for the command line).
    """
    if mode not in MEMORY_MODES:
        raise DSNetError(f"{key}={mode!r} is not a memory mode; choose one of {', '.join(MEMORY_MODES)}")
    done = []
    if mode != "libc" and use_huge_pages():
        done.append("torch huge pages")
    if mode == "retain" and retain_freed_memory():
        done.append("glibc keeps freed memory")
    return ", ".join(done) or "C library default"


def update_seed(seed: int, update: int, rank: int) -> int:
    """Seed of the generators used inside optimizer update ``update`` on ``rank`` (stochastic depth, mixup, samplers
    inside detectors): a function of the run's seed only, so a resumed run draws what the uninterrupted one drew."""
    return (seed * 1_000_003 + update * 7_919 + rank * 104_729 + 17) % (2**31 - 1)


def seed_update(seed: int, update: int, rank: int) -> None:
    """Seed torch, NumPy and :mod:`random` with :func:`update_seed` before optimizer update ``update``."""
    value = update_seed(seed, update, rank)
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
