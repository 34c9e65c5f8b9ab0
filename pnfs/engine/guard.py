"""The NaN/inf guard: skip a step whose loss or gradient is not finite, abort after N in a row."""

from __future__ import annotations

from dataclasses import dataclass


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class NonFiniteGuard:
    """Counts skipped steps; ``check`` raises after ``max_consecutive`` bad steps in a row.

    Every rank takes the same decision because the inputs (the loss summed over ranks and
    the gradient norm after the all-reduce) are identical on all ranks.
    """

    max_consecutive: int
    consecutive: int = 0
    total: int = 0

    def check(self, finite: bool, *, step: int, what: str, loss: float, lr: float) -> bool:
        """True: take the step. False: skip it (counted). Raises after too many in a row."""
        if finite:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{what}: non-finite loss or gradient for {self.consecutive} consecutive steps "
                f"(global step {step}, last loss {loss}, lr {lr:g}; train.max_bad_steps="
                f"{self.max_consecutive}). Lower train.lr, set train.grad_clip, or check the data."
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = int(state["consecutive"])
        self.total = int(state["total"])
