"""The NaN/inf guard: skip a step whose loss or gradient is not finite, abort after N in a row
(docs/design.md §7).

:class:`NonFiniteGuard` holds the host-side counts and takes the abort decision;
:class:`StepRecord` keeps the per-step bookkeeping on the device, so that a step never waits
for the device: the host reads it once per ``train.log_every`` steps (and before a checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pnfs.process_group import all_reduce_sum_


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class NonFiniteGuard:
    """Counts skipped steps; raises once ``max_consecutive`` bad steps came in a row.

    Every rank takes the same decision because its input (finiteness of the gradient norm
    after the all-reduce, which a non-finite loss on any rank poisons) is the same on all ranks.
    """

    max_consecutive: int
    consecutive: int = 0
    total: int = 0

    def check(self, finite: bool, *, step: int, what: str, loss: float, lr: float) -> bool:
        """One step read on the host. True: take the step. False: skip it (counted)."""
        self.consecutive = 0 if finite else self.consecutive + 1
        self.total += not finite
        self._raise_if(self.consecutive, step=step, what=what, loss=loss, lr=lr)
        return finite

    def update(
        self, consecutive: int, skipped: int, longest: int, *, step: int, what: str, loss: float, lr: float
    ):
        """Steps read from the device in one go: the streak now, steps skipped, longest streak."""
        self.consecutive = consecutive
        self.total += skipped
        self._raise_if(longest, step=step, what=what, loss=loss, lr=lr)

    def _raise_if(self, streak: int, *, step: int, what: str, loss: float, lr: float) -> None:
        if streak >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{what}: non-finite loss or gradient for {streak} consecutive steps "
                f"(by global step {step}, mean loss {loss}, lr {lr:g}; train.max_bad_steps="
                f"{self.max_consecutive}). Lower train.lr, set train.grad_clip, or check the data."
            )

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = int(state["consecutive"])
        self.total = int(state["total"])


class StepRecord:
    """Device tensors over one log window: loss sum, steps, bad-step streak, longest streak, skips.

    ``add`` is a handful of in-place device ops (no host sync); ``read`` moves the window to the
    host in one transfer (one all-reduce of the loss sum under DDP), hands the counts to the
    guard (which may raise) and starts the next window.
    """

    LOSS, STEPS, STREAK, LONGEST, SKIPPED = range(5)

    def __init__(self, guard: NonFiniteGuard, device: torch.device) -> None:
        self.guard = guard
        self.values = torch.zeros(5, dtype=torch.float64, device=device)
        self.values[self.STREAK] = guard.consecutive
        self.values[self.LONGEST] = guard.consecutive

    def add(self, loss: torch.Tensor, finite: torch.Tensor) -> None:
        """One step: its loss (0-dim) and whether it was taken (0-dim bool); all on the device."""
        self.values[self.LOSS] += loss.detach().to(self.values.dtype)
        self.values[self.STEPS] += 1
        self.add_flag(finite)

    def add_flag(self, finite: torch.Tensor) -> None:
        """A step whose loss is not logged (darts1's architecture step): only the streak counts."""
        v = self.values
        bad = (~finite).to(v.dtype)
        v[self.STREAK] = (v[self.STREAK] + 1) * bad
        v[self.LONGEST] = torch.maximum(v[self.LONGEST], v[self.STREAK])
        v[self.SKIPPED] += bad

    def read(self, *, step: int, lr: float, world_size: int) -> float:
        """Mean loss over the window's steps and all ranks; raises NonFiniteLossError after too
        many bad steps in a row."""
        window = self.values.clone()
        window[self.LOSS] = all_reduce_sum_(window[self.LOSS : self.LOSS + 1])[0] / world_size
        loss, steps, streak, longest, skipped = window.tolist()
        self.values[self.LOSS : self.STEPS + 1] = 0
        self.values[self.LONGEST] = self.values[self.STREAK]
        self.values[self.SKIPPED] = 0
        mean = loss / max(steps, 1.0)
        self.guard.update(
            int(streak), int(skipped), int(longest), step=step, what="training step", loss=mean, lr=lr
        )
        return mean
