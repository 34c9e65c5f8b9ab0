"""``train.compile``: the training forward through ``torch.compile``, cell by cell or whole
(docs/design.md §8).

A PNFS supernet is a fabric of cells that share one structure, so the default
(``train.compile_scope: cells``) compiles the cells, not the network: Dynamo traces
``Cell.forward`` (or ``BatchedCell.forward``) once per distinct cell shape and structure and
reuses that code for every cell like it, as parameters are graph inputs. The stem, the adapters
and the heads stay eager. On the project's CPU the first forward+backward of
``mpii_mobilenetv2_p3_256`` (18 cells, 3 distinct graphs) compiled in 44 s this way against 178 s
for the whole network (``train.compile_scope: model``), whose step was then 10 % faster there
(docs/design.md §8 gives the command and the numbers).

The model itself is never changed: :class:`CompiledCells` puts the compiled forwards on the
cells only while its own forward runs. Outside it -- evaluation, checkpoints, deep copies,
freezing and export -- the cells are the eager modules they were, as with the ``model`` scope,
where only the forward model is compiled. (Cells compiled in place with ``nn.Module.compile``
would also compile evaluation, in another mode and batch size: more graphs, longer start-up.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pnfs.config import CompileScope
from pnfs.model.batched import BatchedCell
from pnfs.model.cell import Cell

CELL_TYPES = (Cell, BatchedCell)


def compile_mode(device: torch.device) -> str | None:
    """``reduce-overhead`` on CUDA (Inductor, then CUDA graphs replay each compiled piece);
    PyTorch's default mode elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else None


def fabric_cells(model: nn.Module) -> list[nn.Module]:
    """Every fabric cell of ``model`` (:class:`Cell` or :class:`BatchedCell`), in module order."""
    return [m for m in model.modules() if isinstance(m, CELL_TYPES)]


def allow_graphs(config: Any, count: int) -> None:
    """Let Dynamo keep at least ``count`` graphs of one function (``config``: ``torch._dynamo.config``).

    Dynamo keeps at most ``recompile_limit`` (default 8; ``cache_size_limit`` in older torch)
    graphs of one function, and every distinct cell (its parameters' shapes, its inputs) may
    need one: past the limit the remaining cells would silently run eagerly. Only raises it.
    """
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), count))


class CompiledCells(nn.Module):
    """``forward_model`` (the model, or its DDP wrapper) with each cell's ``forward`` compiled for
    the length of one call.

    ``forward(*args, **kwargs)`` is ``forward_model(*args, **kwargs)``; during it each cell's
    ``forward`` is its compiled one (an instance attribute, deleted again when the call ends,
    also on an error). The compiled functions are made once, here.
    """

    def __init__(self, forward_model: nn.Module, cells: list[nn.Module], mode: str | None) -> None:
        super().__init__()
        if not cells:
            raise ValueError("CompiledCells: the model has no fabric cells; compile the whole model")
        self.inner = forward_model
        self._cells = cells  # a plain list: the cells stay registered under the model only
        allow_graphs(torch._dynamo.config, len(cells))
        self._compiled: list[Callable[..., Any]] = [torch.compile(cell.forward, mode=mode) for cell in cells]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for cell, compiled in zip(self._cells, self._compiled):
            cell.forward = compiled
        try:
            return self.inner(*args, **kwargs)
        finally:
            for cell in self._cells:
                del cell.forward


def compile_forward(
    forward_model: nn.Module, model: nn.Module, scope: CompileScope, device: torch.device
) -> tuple[nn.Module, str]:
    """(the compiled forward model, what was compiled, for the run's log). ``model`` is the bare
    model inside ``forward_model``; a model without fabric cells (the baselines) is compiled whole
    whatever ``scope`` says."""
    mode = compile_mode(device)
    cells = fabric_cells(model) if scope == "cells" else []
    if cells:
        return CompiledCells(forward_model, cells, mode), f"{len(cells)} fabric cells, mode {mode}"
    # on a Module torch.compile returns an OptimizedModule (a Module); its stub says Callable
    whole: nn.Module = torch.compile(forward_model, mode=mode)  # type: ignore[assignment]
    return whole, f"the whole model, mode {mode}"
