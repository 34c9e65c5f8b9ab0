"""The whole training step replayed from one CUDA graph: ``train.cuda_graph`` (docs/design.md §8).

The lean step (:mod:`pnfs.engine.step`) never waits for the device, so everything it launches
-- forward, backward (with DDP's all-reduces), the gradient norm, the fused Adam update and the
record -- can be recorded once and replayed with one launch:

    warm-up:  step(batch) eagerly, ``warmup`` times, on a side stream (builds Adam's state,
              lets cuDNN and DDP settle; these are real steps of the run)
    capture:  static <- empty buffers shaped like the batch; record step(static) in a graph
    replay:   static.image <- batch.image, static.keypoints <- batch.keypoints (in place,
              asynchronous); graph.replay()

A replay reads only tensors whose storage never moves: the static inputs, the parameters,
Adam's moments and step counts, the learning rate (a device tensor that the schedule fills in
place, :func:`pnfs.engine.schedule.set_learning_rate`) and the record. A batch of another shape
(a resumed epoch's final partial batch) runs the same step eagerly; it updates the same tensors.

Only :func:`capture_cuda_graph` needs CUDA; the rest runs on any device with another
``capture`` (the tests replay the recorded function eagerly on the static buffers).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

# Warm-up steps before capture. PyTorch's CUDA-graph notes ask for at least 11 DDP-enabled eager
# iterations before capturing a backward with DDP's collectives; a single process needs few.
WARMUP_STEPS = 3
WARMUP_STEPS_DDP = 11


class Replayable(Protocol):
    def replay(self) -> None: ...


Capture = Callable[[Callable[[], None]], Replayable]


@dataclass
class StaticBatch:
    """The graph's input buffers: what :func:`pnfs.loss.batch_loss` reads of a PoseBatch.

    image:     [N, 3, H, W] on the device, the loader's dtype
    keypoints: [N, K, 3] float32 on the device
    """

    image: torch.Tensor
    keypoints: torch.Tensor

    @classmethod
    def like(cls, batch: Any, device: torch.device) -> StaticBatch:
        """Buffers of ``batch``'s shapes and dtypes on ``device``, holding a copy of it."""
        static = cls(
            torch.empty_like(batch.image, device=device),
            torch.empty_like(batch.keypoints, device=device),
        )
        static.copy_(batch)
        return static

    def fits(self, batch: Any) -> bool:
        """Same shapes and dtypes as ``batch`` (a host-side check: no device read)."""
        return all(
            mine.shape == theirs.shape and mine.dtype == theirs.dtype
            for mine, theirs in ((self.image, batch.image), (self.keypoints, batch.keypoints))
        )

    def copy_(self, batch: Any) -> None:
        """``batch`` into the buffers, in place and asynchronous (pinned or device sources)."""
        self.image.copy_(batch.image, non_blocking=True)
        self.keypoints.copy_(batch.keypoints, non_blocking=True)


def capture_cuda_graph(fn: Callable[[], None], pool: Any = None) -> torch.cuda.CUDAGraph:
    """Record ``fn``'s launches in a CUDA graph (nothing runs until ``replay``). ``thread_local``:
    only this thread is held to what a capture forbids, so the loaders' threads (the ``gpu``
    loader's producer, DALI's workers) may go on using CUDA meanwhile."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        fn()
    return graph


def cuda_graph_capture(pool: Any) -> Capture:
    """:func:`capture_cuda_graph` into the memory pool ``pool`` (darts1's two graphs share one:
    they replay one after the other, in the order they were captured)."""
    return lambda fn: capture_cuda_graph(fn, pool)


@contextmanager
def side_stream(device: torch.device):
    """Run the block on a fresh CUDA stream that waits for, and is waited on by, the current
    one (the warm-up PyTorch asks for before a capture); nothing on other devices."""
    if device.type != "cuda":
        yield
        return
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


class GraphedStep:
    """``step(batch)`` run eagerly ``warmup`` times, then captured once and replayed.

    ``step`` is a whole training step that reads the batch only through ``.image`` and
    ``.keypoints`` (:func:`pnfs.engine.step.weight_step` or ``arch_step`` bound to their parts)
    and makes no host read. ``capture`` records a function and returns something to ``replay``.
    """

    def __init__(self, step: Callable[[Any], None], device: torch.device, warmup: int, capture: Capture):
        if warmup < 1:
            raise ValueError(
                f"GraphedStep: warmup must be >= 1 (Adam's state is built eagerly), got {warmup}"
            )
        self.step = step
        self.device = device
        self.warmup = warmup
        self.capture = capture
        self.eager_steps = 0
        self.static: StaticBatch | None = None
        self.graph: Replayable | None = None

    def __call__(self, batch: Any) -> None:
        if self.graph is None and self.eager_steps < self.warmup:
            with side_stream(self.device):
                self.step(batch)
            self.eager_steps += 1
            return
        if self.graph is None or self.static is None:
            static = StaticBatch.like(batch, self.device)
            self.static = static
            self.graph = self.capture(lambda: self.step(static))
        elif not self.static.fits(batch):
            self.step(batch)
            self.eager_steps += 1
            return
        else:
            self.static.copy_(batch)
        self.graph.replay()
