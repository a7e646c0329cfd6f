"""The few torch.distributed operations the mixer needs, safe without a process group and on any backend.

Collectives run on the tensor's own device: an NCCL process group has no CPU path, so whatever is reduced must live
on the parameters' (CUDA) device; gloo takes either. Means are SUM then divide: ReduceOp.AVG is missing on gloo in
some of the torch versions the package allows.
"""
from __future__ import annotations

import torch


def is_distributed() -> bool:
    """Whether a torch.distributed process group is initialized."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if is_distributed():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of n items split as evenly as possible (sizes differ by at most 1,
    the larger shares first), so that the shares of all ranks, in rank order, are the n items."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank = {rank}: expected 0 <= rank < world_size ({world_size})")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the sum of `tensor` over the ranks (a no-op without a process group)."""
    if is_distributed():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the mean of `tensor` over the ranks (a no-op without a process group); SUM then divide."""
    if is_distributed():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        tensor.div_(torch.distributed.get_world_size())
    return tensor
