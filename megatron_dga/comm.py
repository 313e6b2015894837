"""Every collective the trainer, checkpointing, optimizer glue, data and mixing code issue.

One rule decides whether a call communicates: :func:`size` of the group is above 1. A
single process without torch.distributed (tools, unit tests) is a group of one, and every
function here is then the identity, so callers never test ``dist.is_initialized()``
themselves. Groups come from ``platform.ParallelContext.groups`` (megatron-core's
parallel_state groups); ``None`` is the world.

megatron-core's own collectives (DDP grad sync, the optimizer's grad-norm reduction and
the distributed optimizer's gathers, the pipeline schedule's send/recv) stay inside
megatron-core; this module is everything *we* add on top.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.distributed as dist

# torch.distributed.checkpoint's collective save reports every rank's failure in one exception, a
# BaseException (not an Exception): callers that catch a failed save take the name from here.
from torch.distributed.checkpoint.api import CheckpointException as DistCheckpointException  # noqa: F401 - re-exported

Group = Optional["dist.ProcessGroup"]
MAX = dist.ReduceOp.MAX
"""Reduction op for :func:`all_reduce` (its default is the sum)."""


def initialized() -> bool:
    """torch.distributed is up (a world of one is still 'up')."""
    return dist.is_available() and dist.is_initialized()


def size(group: Group = None) -> int:
    """Ranks in ``group`` (1 without torch.distributed)."""
    return dist.get_world_size(group) if initialized() else 1


def rank(group: Group = None) -> int:
    """This process's rank in ``group`` (0 without torch.distributed)."""
    return dist.get_rank(group) if initialized() else 0


def global_rank(group: Group, group_rank: int) -> int:
    """The world rank of ``group_rank`` in ``group``."""
    if not initialized() or group is None:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def all_reduce(tensor: torch.Tensor, group: Group = None, op=None) -> torch.Tensor:
    """In-place sum (or ``op``) over ``group``; returns the tensor."""
    if size(group) > 1:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=group)
    return tensor


def broadcast(tensor: torch.Tensor, src_group_rank: int = 0, group: Group = None) -> torch.Tensor:
    """In-place broadcast from ``src_group_rank`` of ``group``; returns the tensor."""
    if size(group) > 1:
        dist.broadcast(tensor, src=global_rank(group, src_group_rank), group=group)
    return tensor


def broadcast_object(obj: Any, src_group_rank: int = 0, group: Group = None) -> Any:
    """A picklable object from ``src_group_rank`` of ``group`` on every rank of it."""
    if size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=global_rank(group, src_group_rank), group=group)
    return box[0]


def all_gather_object(obj: Any, group: Group = None) -> List[Any]:
    """Every rank's ``obj``, in group-rank order."""
    if size(group) == 1:
        return [obj]
    out: List[Any] = [None] * size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group: Group = None) -> None:
    if size(group) > 1:
        dist.barrier(group=group)
