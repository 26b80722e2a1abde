"""The ranks of a run started by torchrun (``torchrun --nproc-per-node N --no-python wordystore train
OUT``): DDP, each rank training on its share of the global batch, rank 0 the one that writes the store.

torchrun gives each process its ``RANK`` and ``WORLD_SIZE``; the Trainer's ``TrainingArguments``
join the process group (gloo on CPUs). What must be the same on every rank is decided once for
all: whether the store could be created or resumed (:func:`on_rank_0`), and when a signal stops the
run (:func:`any_rank`). One process is rank 0 of 1, and none of this communicates.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(this process's rank, the number of ranks): torchrun's ``RANK`` and ``WORLD_SIZE``, else (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def on_rank_0(action: Callable[[], T]) -> T | None:
    """``action()`` on rank 0 (None elsewhere), its failure raised on every rank: rank 0 raises its
    own error, the others a ValueError that points to it, so that no rank trains on alone."""
    rank, size = world()
    if size == 1:
        return action()
    result, error = None, None
    if rank == 0:
        try:
            result = action()
        except Exception as exc:  # raised below, once every rank knows
            error = exc
    failed = torch.tensor([error is not None], dtype=torch.int32)
    dist.broadcast(failed, src=0)
    if error is not None:
        raise error
    if failed.item():
        raise ValueError(f"rank {rank}: rank 0 could not open the store (its error says why); stopping")
    return result


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (every rank must ask, at the same point)."""
    if world()[1] == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def lost_a_rank(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a collective, says that another rank went away (killed, or failed:
    its connection closed or reset)."""
    text = str(exc)
    return world()[1] > 1 and (
        isinstance(exc, dist.DistError)
        or (isinstance(exc, RuntimeError) and "Connection" in text and ("gloo" in text or "NCCL" in text))
    )
