"""Where a run stands, as the host keeps it between device reads (docs/design.md §4)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


@dataclass
class Position:
    """Where the run stands: the next sample to read is sample ``samples_seen`` (counted over
    all ranks) of epoch ``epoch``; ``global_step`` optimizer steps were taken so far."""

    epoch: int = 0
    samples_seen: int = 0
    global_step: int = 0
    arch_epoch: int = 0  # darts1: the held-out stream's own epoch and position
    arch_samples_seen: int = 0

    def state_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Window:
    """The host's side of one log window: images trained and when the window opened."""

    images: int = 0
    start: float = field(default_factory=time.perf_counter)


@dataclass
class RunState:
    """What a checkpoint carries besides tensors: the position, the best score, the last metrics."""

    position: Position = field(default_factory=Position)
    best_score: float = -math.inf
    last_metrics: dict[str, float] = field(default_factory=dict)
