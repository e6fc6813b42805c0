"""Process-group helpers for runs launched with ``torchrun`` (DDP: gloo on CPU, nccl on CUDA).

A plain ``python`` / ``dsnet`` run is a world of one process and every helper degrades to a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from dsnet.errors import DSNetError

T = TypeVar("T")

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "init_distributed",
    "rank_and_world",
    "resolve_device",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the run."""

    rank: int = 0  # global rank
    local_rank: int = 0  # rank on this machine (selects the GPU)
    world_size: int = 1  # number of processes

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0, *, key: str = "train.device") -> torch.device:
    """``"auto"`` → ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; explicit names are checked (an error
    names the setting ``key`` the name came from)."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DSNetError(f"{key}={name!r} but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(device_name: str = "auto", *, key: str = "train.device") -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1), else stay alone.

    ``device_name`` goes through :func:`resolve_device`; ``key`` is the config key it came from, for its errors."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank, key=key)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank, local_rank, world_size), device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks (in place; returned for chaining). No-op without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
            on_gpu = tensor.cuda()
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            tensor.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the current process group; ``(0, 1)`` without one."""
    if not _initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` (any picklable object) on every rank. Identity without a process group."""
    if not _initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_objects(value: T) -> list[T]:
    """``[value of rank 0, value of rank 1, ...]`` on every rank. ``[value]`` without a process group."""
    if not _initialized():
        return [value]
    gathered: list[T] = [value] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
