"""``train.compile`` (issue 29 §1, regional compilation): the training forward compiled cell by
cell (``train.compile_scope: cells``, the default) or whole (``model``), the model itself left
eager.

On the CPU ``torch.compile`` is given the ``aot_eager`` backend (Dynamo and AOTAutograd trace the
forward and derive the backward; Inductor's C++ build would take a minute); the real compilation
with ``reduce-overhead`` is the ``gpu`` test below (also ``slow``).
"""

from __future__ import annotations

import copy
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters

from pnfs.config import ConfigError, load_config
from pnfs.engine.compilation import CompiledCells, allow_graphs, compile_forward, compile_mode, fabric_cells
from pnfs.engine.run import check_compile
from pnfs.engine.step import weight_step
from pnfs.loss import batch_loss
from pnfs.model.batched import BatchedCell
from pnfs.model.cell import Cell
from tests.engine.test_step import random_batch, step_parts, tiny

CPU = torch.device("cpu")


@pytest.fixture
def traced_compile(monkeypatch):
    """torch.compile with the aot_eager backend; records each call's mode."""
    real = torch.compile
    modes: list = []

    def aot_eager(fn, mode=None, **kwargs):
        modes.append(mode)
        return real(fn, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", aot_eager)
    torch._dynamo.reset()
    counters.clear()
    yield modes
    torch._dynamo.reset()


@pytest.fixture
def recorded_compile(monkeypatch):
    """torch.compile replaced by a recorder that compiles nothing: (what it was given, its mode)."""
    calls: list = []

    def record(fn, mode=None, **kwargs):
        calls.append((fn, mode))
        return fn

    monkeypatch.setattr(torch, "compile", record)
    return calls


@pytest.mark.parametrize("batched", ["false", "true"])
def test_compiled_cells_train_to_where_the_eager_model_trains(traced_compile, batched):
    """Through the compiled cells (per-part and batched parts: Cell and BatchedCell) a forward and
    backward gives the eager model's gradients (within 1e-5 of each tensor's norm), and three
    weight steps on three batches the eager model's losses (1e-5 relative; Adam turns the last
    bits of a near-zero gradient into steps of up to lr, so weights are not compared). Every
    cell was compiled, and cells of one structure shared their graphs."""
    overrides = ("model.num_parts=3", f"model.batched_parts={batched}")
    cfg, model = tiny(*overrides)
    _, twin = tiny(*overrides)
    cells = fabric_cells(twin)
    # the tiny model's backbone is a fabric of Cells; its parts are Cells or BatchedCells
    assert {type(c) for c in cells} == ({Cell, BatchedCell} if batched == "true" else {Cell})
    forward = CompiledCells(twin, cells, mode=None)
    assert traced_compile == [None] * len(cells)
    eager, compiled = step_parts(cfg, model), step_parts(cfg, twin, forward=forward)
    batch = random_batch(cfg, seed=10)
    for parts in (eager, compiled):
        batch_loss(parts.forward, batch, parts.setup).backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert (a.grad - b.grad).norm() <= 1e-5 * a.grad.norm() + 1e-9, name
        a.grad = b.grad = None
    for seed in range(3):
        batch = random_batch(cfg, seed=seed)
        weight_step(eager, batch)
        weight_step(compiled, batch)
        want = eager.record.read(step=seed, lr=1e-3, world_size=1)
        got = compiled.record.read(step=seed, lr=1e-3, world_size=1)
        assert got == pytest.approx(want, rel=1e-5)
    assert not counters["unimplemented"], list(counters["unimplemented"])  # e.g. the recompile limit
    assert counters["frames"]["ok"] == counters["frames"]["total"] == counters["stats"]["unique_graphs"]
    assert 1 < counters["stats"]["unique_graphs"] < len(cells)


def test_outside_its_forward_the_model_is_the_eager_model(traced_compile):
    """Between calls no cell carries a compiled forward (one left there would run the original
    cell in a deep copy), so a deep copy (freezing, export, ``with_part_layout``) computes with its
    own weights, and the state dict keys are the model's. An error inside the forward also takes
    the compiled forwards off again."""
    cfg, model = tiny("model.num_parts=3")
    keys = list(model.state_dict())
    forward = CompiledCells(model, fabric_cells(model), mode=None)
    images = random_batch(cfg).image
    forward(images).sum().backward()
    assert all("forward" not in vars(cell) for cell in fabric_cells(model))
    assert list(model.state_dict()) == keys
    twin = copy.deepcopy(model)
    assert all(getattr(cell.forward, "__self__", None) is cell for cell in fabric_cells(twin))

    with pytest.raises(RuntimeError):
        forward(images[:, :2])  # two colour channels: the stem's conv refuses
    assert all("forward" not in vars(cell) for cell in fabric_cells(model))


def test_the_cells_are_compiled_while_the_forward_runs(recorded_compile, monkeypatch):
    """During the call each cell's forward is the compiled one (here the recorder's pass-through,
    seen by a cell that checks its own attribute)."""
    cfg, model = tiny("model.num_parts=3")
    forward = CompiledCells(model, fabric_cells(model), mode=None)
    seen = []
    real = Cell.__call__

    def spy(cell, *args, **kwargs):
        seen.append("forward" in vars(cell))
        return real(cell, *args, **kwargs)

    monkeypatch.setattr(Cell, "__call__", spy)
    forward(random_batch(cfg).image)
    assert seen and all(seen) and len(seen) == len(fabric_cells(model))


def test_scope_model_and_models_without_cells_compile_whole(recorded_compile):
    """``compile_scope: model`` hands the forward model itself to torch.compile, as does a model
    with no fabric cells (SimpleBaseline) whatever the scope; ``cells`` hands it each cell."""
    _, model = tiny("model.num_parts=3")
    got, said = compile_forward(model, model, "model", CPU)
    assert recorded_compile == [(model, None)] and got is model and said == "the whole model, mode None"
    recorded_compile.clear()
    got, said = compile_forward(model, model, "cells", CPU)
    assert isinstance(got, CompiledCells) and got.inner is model
    assert said == f"{len(fabric_cells(model))} fabric cells, mode None"
    assert [fn.__self__ for fn, _ in recorded_compile] == fabric_cells(model)
    recorded_compile.clear()
    baseline = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    got, said = compile_forward(baseline, baseline, "cells", CPU)
    assert recorded_compile == [(baseline, None)] and said == "the whole model, mode None"
    no_cells = r"^CompiledCells: the model has no fabric cells; compile the whole model$"
    with pytest.raises(ValueError, match=no_cells):
        CompiledCells(baseline, [], mode=None)


def test_on_cuda_the_mode_is_reduce_overhead(recorded_compile):
    """CUDA graphs replay the compiled pieces on a GPU; elsewhere PyTorch's default mode. (The
    device is only passed, never used: no GPU is needed.)"""
    assert compile_mode(torch.device("cuda", 0)) == "reduce-overhead"
    assert compile_mode(CPU) is None
    _, model = tiny("model.num_parts=3")
    compile_forward(model, model, "cells", torch.device("cuda", 0))
    assert {mode for _, mode in recorded_compile} == {"reduce-overhead"}
    recorded_compile.clear()
    compile_forward(model, model, "model", torch.device("cuda", 0))
    assert recorded_compile == [(model, "reduce-overhead")]


def test_the_recompile_limit_is_raised_to_the_number_of_cells_never_lowered():
    """On torch's ``recompile_limit``, or ``cache_size_limit`` where an older torch has only that."""
    new = SimpleNamespace(recompile_limit=8, cache_size_limit=8)
    allow_graphs(new, 27)
    assert (new.recompile_limit, new.cache_size_limit) == (27, 8)
    allow_graphs(new, 5)
    assert new.recompile_limit == 27
    old = SimpleNamespace(cache_size_limit=8)
    allow_graphs(old, 11)
    assert vars(old) == {"cache_size_limit": 11}


def test_compile_is_refused_with_deepspeed_and_the_scope_is_checked():
    """DeepSpeed runs its own forward and backward: a compiled forward model would never run."""
    cfg = load_config("demo", ["train.compile=true"])
    with pytest.raises(ConfigError, match=r"train\.compile.*--deepspeed"):
        check_compile(cfg, use_deepspeed=True)
    check_compile(cfg, use_deepspeed=False)
    check_compile(load_config("demo", []), use_deepspeed=True)
    with pytest.raises(ConfigError, match=r"train\.compile_scope"):
        load_config("demo", ["train.compile_scope=layers"])


@pytest.mark.gpu
@pytest.mark.slow  # Inductor builds ~10 cell graphs: longer than bench/gpu_acceptance.sh's test box;
# there its train_step stage compares the compiled path's loss and gradient norm with eager's
def test_compiled_cells_on_cuda_train_to_where_the_eager_model_trains():
    """Inductor with reduce-overhead (CUDA graphs of each compiled cell), fp32: eight steps end
    with the eager model's losses within 1e-4 relative and weights within 1e-3 of their norm."""
    torch._dynamo.reset()
    cuda = torch.device("cuda")
    overrides = ("model.num_parts=3", "model.batched_parts=true", "train.device=cuda")
    cfg, model = tiny(*overrides)
    _, twin = tiny(*overrides)
    model, twin = model.to(cuda), twin.to(cuda)
    forward, _ = compile_forward(twin, twin, "cells", cuda)
    setup = partial(step_parts, cfg)
    eager, compiled = setup(model, device=cuda), setup(twin, forward=forward, device=cuda)
    for seed in range(8):
        batch = random_batch(cfg, seed=seed).to(cuda)
        weight_step(eager, batch)
        weight_step(compiled, batch)
        want = eager.record.read(step=seed, lr=1e-3, world_size=1)
        got = compiled.record.read(step=seed, lr=1e-3, world_size=1)
        assert got == pytest.approx(want, rel=1e-4)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        if a.is_floating_point():
            assert (a - b).norm() <= 1e-3 * a.norm() + 1e-6
    torch._dynamo.reset()
