"""The learning-rate schedule as a pure function of the epoch (paper: Adam 1e-3, x0.25 at 90/120/150)."""

from __future__ import annotations

from collections.abc import Sequence


def learning_rate(epoch: int, base_lr: float, milestones: Sequence[int], factor: float) -> float:
    """Step decay: ``base_lr * factor ** #{m in milestones : m <= epoch}`` (epochs count from 0).

    >>> learning_rate(89, 1e-3, [90, 120, 150], 0.25), learning_rate(90, 1e-3, [90, 120, 150], 0.25)
    (0.001, 0.00025)
    """
    passed = sum(1 for m in milestones if m <= epoch)
    return base_lr * factor**passed
