"""Collectives over the current process group that training and evaluation share.

Each works with or without a process group: without one (a single process, or before
:func:`pnfs.engine.distributed.init_distributed` started one) it returns what one rank alone
would get. Setting the group up and the DDP-specific parts stay in
:mod:`pnfs.engine.distributed`; this module sits below both ``pnfs.engine`` and
``pnfs.evaluate`` (docs/design.md §9) so that evaluation imports nothing from the engine.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (a one-element list without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks of one tensor (a no-op without a process group); returns it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor
