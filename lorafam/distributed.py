"""The few collective operations lorafam needs, as no-ops on a single process.

Variants use these too (LoRA-drop sums its importance over the processes' shares of the sample),
so they talk to torch.distributed directly and need no Accelerator at hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over every process, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a sharded DTensor (FSDP2 parameters); other tensors unchanged.

    A collective for DTensors: every process must call it, in the same order.
    """
    gather = getattr(tensor, "full_tensor", None)
    return gather() if gather is not None else tensor


@torch.no_grad()
def copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` where ``target`` may be a sharded DTensor and ``value`` a whole tensor:
    each process keeps its own shard of ``value``."""
    value = value.to(device=target.device, dtype=target.dtype)
    mesh = getattr(target, "device_mesh", None)
    if mesh is not None and not hasattr(value, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value, mesh, target.placements)
    target.copy_(value)


def is_sharded(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "device_mesh")


def is_partitioned(tensor: torch.Tensor) -> bool:
    """True for a parameter DeepSpeed ZeRO-3 partitioned: outside the engine's forward pass its
    ``data`` is empty and each process holds a slice in ``ds_tensor``."""
    return hasattr(tensor, "ds_id")


@contextmanager
def gathered(tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """Within the block, the DeepSpeed ZeRO-3 parameters among ``tensors`` hold their whole value on
    every process; changes made to them inside are dropped (read-only). No-op for other tensors.

    A collective when any tensor is partitioned: every process must enter it with the same tensors.
    """
    partitioned = [t for t in tensors if is_partitioned(t)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield
