"""The one place that asks whether ``torch.distributed`` is up, and the few collectives ldm issues itself.

Everything works without a process group (one process): each helper then does the single-process thing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_device() -> torch.device:
    """Where tensors for a collective must live: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``tensor`` reduced over all ranks (``op``: sum or max); returned as is without a process group."""
    if not is_distributed():
        return tensor
    reduced = tensor.to(collective_device())
    dist.all_reduce(reduced, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return reduced.to(tensor.device)


def rank_zero_write(write: Callable[[], T]) -> T | None:
    """Run ``write`` (writing an export) on global rank 0 only; every rank returns once it is done.

    Under ``torch.distributed`` every rank must call this (an all-reduce doubles as the barrier): the other
    ranks wait for rank 0 and raise too if its ``write`` failed, instead of hanging. Without a process
    group ``write`` just runs. Returns ``write()``'s result on rank 0, ``None`` elsewhere.
    """
    if not is_distributed():
        return write()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = write()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks are told
            error = e
    failed = all_reduce(torch.tensor([int(error is not None)]), "max")
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError("the export failed on rank 0 (its error is in rank 0's log)")
    return result
