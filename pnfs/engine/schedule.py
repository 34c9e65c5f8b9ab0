"""The learning-rate schedule as a pure function of the epoch (paper: Adam 1e-3, x0.25 at 90/120/150)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def learning_rate(epoch: int, base_lr: float, milestones: Sequence[int], factor: float) -> float:
    """Step decay: ``base_lr * factor ** #{m in milestones : m <= epoch}`` (epochs count from 0).

    >>> learning_rate(89, 1e-3, [90, 120, 150], 0.25), learning_rate(90, 1e-3, [90, 120, 150], 0.25)
    (0.001, 0.00025)
    """
    passed = sum(1 for m in milestones if m <= epoch)
    return base_lr * factor**passed


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate <- ``lr``. A tensor learning rate (``train.cuda_graph``,
    :func:`pnfs.engine.strategies.make_capturable`) is filled in place: a captured step holds that
    tensor, not its value, so the next replay steps with ``lr``. No host sync."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
