"""The errors a user can cause, and how the entry points print them.

Every class here is a mistake in what the user gave (a config key, a data file, a
checkpoint, weights, the machine): its message names the key or file, the value and what to
do. The entry points (``launch/train.py``, ``launch/evaluate.py``, ``launch/predict.py``,
``launch/demo.py``, ``data_prep/shard_*.py``, ``python -m pnfs.summary``) run their work
under :func:`user_errors`, which prints such an error as one line ``error: ...`` and exits
with :data:`EXIT_USER_ERROR` (2). Anything else is a bug and keeps its traceback.

Older modules raise their own classes (``CheckpointError`` of :mod:`pnfs.engine.checkpoint`,
``NonFiniteLossError``, ``PretrainedWeightsUnavailable``, ``KeypointSetError``,
``BadSampleError``); :func:`user_error_types` adds them to the family without importing
those modules here (they import torch and the engine).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pnfs.config import ConfigError

EXIT_USER_ERROR = 2


class PnfsUserError(Exception):
    """A mistake in the user's input; the message names the key/file, the value and the fix."""


class DataError(PnfsUserError, ValueError):
    """Shards, annotations, head sizes or detections missing, unreadable or not what the config says."""


class CheckpointFileError(PnfsUserError, ValueError):
    """A checkpoint to load is missing, unreadable or does not fit the model."""


class WeightsError(PnfsUserError, ValueError):
    """``model.backbone.weights`` is missing, unreadable or does not fit the backbone."""


class EnvironmentProblem(PnfsUserError, RuntimeError):
    """The machine cannot run this: run folder not writable, disk too small, world size too big."""


class PreflightFailed(PnfsUserError):
    """The preflight found problems; ``problems`` holds one line each (already in the message).

    ``outcome`` says what did not happen ("nothing was trained", "nothing was evaluated")."""

    def __init__(self, problems: list[str], outcome: str = "nothing was trained") -> None:
        self.problems = list(problems)
        n = len(self.problems)
        head = f"preflight found {n} problem{'s' if n != 1 else ''}; {outcome}"
        super().__init__(head + "".join(f"\n  - {p}" for p in self.problems))


def user_error_types() -> tuple[type[BaseException], ...]:
    """The whole family: the classes above, :class:`pnfs.config.ConfigError` and the user-error
    classes of modules that are already imported (a module never imported cannot have raised)."""
    types: list[type[BaseException]] = [PnfsUserError, ConfigError]
    for module, name in (
        ("pnfs.engine.checkpoint", "CheckpointError"),
        ("pnfs.engine.guard", "NonFiniteLossError"),
        ("pnfs.model.backbones", "PretrainedWeightsUnavailable"),
        ("pnfs.keypoints", "KeypointSetError"),
        ("pnfs.data.bad_samples", "BadSampleError"),
    ):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            types.append(cls)
    return tuple(types)


def is_main_rank() -> bool:
    """Rank 0 of a torchrun/DeepSpeed launch (``RANK`` unset: a single process)."""
    return os.environ.get("RANK", "0") == "0"


def report(err: BaseException) -> int:
    """Print ``error: <message>`` once (rank 0 only under torchrun) and return the exit code."""
    if is_main_rank():
        sys.stderr.write(f"error: {err}\n")
        sys.stderr.flush()
    return EXIT_USER_ERROR


@contextmanager
def user_errors(extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn a user error raised inside into ``SystemExit(2)`` after one ``error:`` line.

    ``extra`` adds classes a particular entry point knows to be user-caused (e.g.
    ``FileNotFoundError`` for a CLI whose only files are its arguments)."""
    try:
        yield
    except user_error_types() + tuple(extra) as err:
        raise SystemExit(report(err)) from None


def run_main(main: Callable[[], int | None], extra: tuple[type[BaseException], ...] = ()) -> int:
    """``sys.exit(run_main(main))``: ``main()``'s code, or 2 after one line for a user error."""
    try:
        with user_errors(extra):
            return main() or 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        raise  # SystemExit("message"): Python prints it and exits 1
