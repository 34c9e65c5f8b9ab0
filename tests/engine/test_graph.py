"""``train.cuda_graph`` (issue 29 §1): the whole step -- forward, backward, norm, fused Adam, the
record -- replayed from one CUDA graph after eager warm-up steps, with the batch copied into
static buffers and a tensor learning rate that the schedule fills in place.

On the CPU everything but ``torch.cuda.graph`` itself runs: :class:`Rerun` stands in for a
capture and replays the recorded step eagerly on the static buffers, so a batch not copied in,
a warm-up that does not count, or an optimizer that leaves the tensor learning rate shows
here. The real capture is compared with the eager step on a GPU (``gpu`` tests, below).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.distributed as dist

from pnfs.config import ConfigError, load_config
from pnfs.engine.checkpoint import optimizer_state
from pnfs.engine.distributed import wrap_ddp
from pnfs.engine.graph import WARMUP_STEPS, WARMUP_STEPS_DDP, GraphedStep, StaticBatch, cuda_graph_capture
from pnfs.engine.guard import NonFiniteGuard, StepRecord
from pnfs.engine.run import check_cuda_graph
from pnfs.engine.schedule import set_learning_rate
from pnfs.engine.step import StepParts, arch_step, weight_step
from pnfs.engine.strategies import build_optimizers, make_capturable
from pnfs.loss import loss_setup
from tests.engine.test_step import Rerun, random_batch, snapshot, step_parts, tiny

CPU = torch.device("cpu")


def batches(cfg, count: int, n: int = 3) -> list:
    return [random_batch(cfg, n=n, seed=i) for i in range(count)]


def run_steps(step, parts: StepParts, stream: list, lrs: list[float]) -> list[float]:
    """Run ``step`` over ``stream`` with the learning rate of each step; the logged losses."""
    losses = []
    for batch, lr in zip(stream, lrs):
        set_learning_rate(parts.optimizer, lr)
        step(batch)
        losses.append(parts.record.read(step=0, lr=lr, world_size=1))
    return losses


def test_graphed_steps_end_where_eager_steps_end():
    """6 steps (2 warm-up, capture, 3 replays) on 6 different batches with a learning rate that
    drops mid-way: the same losses and bitwise the same weights and Adam state as the eager step."""
    cfg, model = tiny("model.num_parts=3")
    _, twin = tiny("model.num_parts=3")
    eager, graphed = step_parts(cfg, model), step_parts(cfg, twin)
    make_capturable(graphed.optimizer, CPU)
    lr = graphed.optimizer.param_groups[0]["lr"]
    stream, lrs = batches(cfg, 6), [1e-3] * 3 + [2.5e-4] * 3
    Rerun.captured = 0
    step = GraphedStep(partial(weight_step, graphed), CPU, warmup=2, capture=Rerun)
    want = run_steps(partial(weight_step, eager), eager, stream, lrs)
    got = run_steps(step, graphed, stream, lrs)
    assert got == want
    assert all(torch.equal(a, b) for a, b in zip(snapshot(eager), snapshot(graphed)))
    assert step.eager_steps == 2 and Rerun.captured == 1
    assert graphed.optimizer.param_groups[0]["lr"] is lr  # the tensor a graph holds, filled in place


def test_darts1_replays_the_architecture_step_as_a_second_graph():
    cfg, model = tiny("model.num_parts=3", "search.strategy=darts1")
    _, twin = tiny("model.num_parts=3", "search.strategy=darts1")

    def parts(m):
        opts = build_optimizers(m, cfg, fused_weights=True)
        weights = step_parts(cfg, m)
        weights.optimizer = opts.weights
        weights.params = [p for g in opts.weights.param_groups for p in g["params"]]
        arch = StepParts(m, m, opts.arch, list(m.arch_parameters()), weights.setup, weights.record, 0.0)
        return weights, arch

    (w_eager, a_eager), (w_graph, a_graph) = parts(model), parts(twin)
    for opt in (w_graph.optimizer, a_graph.optimizer):
        make_capturable(opt, CPU)
    Rerun.captured = 0
    graphed_arch = GraphedStep(partial(arch_step, a_graph, world_size=1), CPU, warmup=1, capture=Rerun)
    graphed_weights = GraphedStep(partial(weight_step, w_graph), CPU, warmup=1, capture=Rerun)
    train, held_out = batches(cfg, 4), [random_batch(cfg, seed=100 + i) for i in range(4)]
    for batch, arch_batch in zip(train, held_out):
        arch_step(a_eager, arch_batch, world_size=1)
        weight_step(w_eager, batch)
        graphed_arch(arch_batch)
        graphed_weights(batch)
    assert Rerun.captured == 2
    assert torch.equal(w_eager.record.values, w_graph.record.values)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(w_eager), snapshot(w_graph)))
    assert all(torch.equal(a, b) for a, b in zip(snapshot(a_eager), snapshot(a_graph)))
    assert not torch.equal(model.arch_parameters()[0], tiny("model.num_parts=3")[1].arch_parameters()[0])


def test_a_batch_of_another_shape_runs_eagerly_and_the_graph_stays():
    cfg, model = tiny("model.num_parts=3")
    _, twin = tiny("model.num_parts=3")
    eager, graphed = step_parts(cfg, model), step_parts(cfg, twin)
    make_capturable(graphed.optimizer, CPU)
    step = GraphedStep(partial(weight_step, graphed), CPU, warmup=1, capture=Rerun)
    stream = [*batches(cfg, 3), random_batch(cfg, n=2, seed=7), random_batch(cfg, seed=8)]
    for batch in stream:
        weight_step(eager, batch)
        step(batch)
    assert step.eager_steps == 2  # the warm-up and the short batch
    assert not step.static.fits(stream[3]) and step.static.fits(stream[4])
    assert all(torch.equal(a, b) for a, b in zip(snapshot(eager), snapshot(graphed)))


def test_the_static_batch_is_a_copy_that_each_batch_overwrites_in_place():
    cfg, _ = tiny()
    first, second = random_batch(cfg, seed=0), random_batch(cfg, seed=1)
    static = StaticBatch.like(first, CPU)
    image, keypoints = static.image, static.keypoints
    assert torch.equal(image, first.image) and image.data_ptr() != first.image.data_ptr()
    static.copy_(second)
    assert static.image is image and static.keypoints is keypoints
    assert torch.equal(image, second.image) and torch.equal(keypoints, second.keypoints)


def test_warmup_must_build_adams_state_eagerly():
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GraphedStep(lambda batch: None, CPU, warmup=0, capture=Rerun)


def test_the_schedule_fills_a_tensor_learning_rate_in_place_and_sets_a_float_one():
    cfg, model = tiny()
    opt = build_optimizers(model, cfg, fused_weights=True).weights
    set_learning_rate(opt, 5e-4)
    assert opt.param_groups[0]["lr"] == 5e-4
    make_capturable(opt, CPU)
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.dtype == torch.float64 and lr.item() == pytest.approx(5e-4)
    set_learning_rate(opt, 1.25e-4)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(1.25e-4)
    assert opt.param_groups[0]["capturable"]


def test_a_graphed_runs_checkpoint_saves_plain_learning_rates_and_loads_back_capturable():
    cfg, model = tiny("model.num_parts=3")
    s = step_parts(cfg, model)
    make_capturable(s.optimizer, CPU)
    weight_step(s, random_batch(cfg))
    saved = optimizer_state(s.optimizer)
    assert saved["param_groups"][0]["lr"] == pytest.approx(1e-3) and isinstance(
        saved["param_groups"][0]["lr"], float
    )
    assert isinstance(s.optimizer.param_groups[0]["lr"], torch.Tensor)  # the live one is untouched
    again = build_optimizers(model, cfg, fused_weights=True).weights
    again.load_state_dict(saved)
    assert isinstance(again.param_groups[0]["lr"], float)  # what load_state_dict leaves
    make_capturable(again, CPU)
    assert isinstance(again.param_groups[0]["lr"], torch.Tensor)


def test_the_trainer_with_a_stand_in_capture_ends_bitwise_where_the_eager_trainer_ends(
    tmp_path, tmp_path_factory, monkeypatch
):
    """The trainer's ``train.cuda_graph`` wiring on the CPU (the refusal and the CUDA pool
    lifted, :class:`Rerun` capturing): darts1, 2 epochs of 4 steps (3 warm-up, then the two
    graphs), the learning rate dropping between them, a checkpoint at steps 4 and 8: the same
    weights, bit for bit, and checkpoints with the learning rate as a number."""
    import pnfs.engine.run as run_module
    import pnfs.engine.trainer as trainer_module
    from pnfs.engine import checkpoint as ckpt
    from tests.engine.test_trainer import config

    def final(name: str, *extra: str) -> dict:
        cfg = config(
            tmp_path_factory, tmp_path / name, "search.strategy=darts1", "train.max_steps_per_epoch=4",
            "data.num_workers=0", *extra,
        )  # fmt: skip
        return trainer_module.run_training(cfg)

    eager = final("eager")
    monkeypatch.setattr(run_module, "check_cuda_graph", lambda *args: None)
    monkeypatch.setattr(trainer_module, "cuda_graph_capture", lambda pool: Rerun)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    Rerun.captured = 0
    graphed = final("graphed", "train.device=auto", "train.cuda_graph=true")
    assert Rerun.captured == 2  # the architecture step and the weight step
    assert graphed["global_step"] == eager["global_step"] == 8
    assert graphed["weights_sha256"] == eager["weights_sha256"]
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "graphed" / "checkpoints"))
    lrs = [saved["schedule"]["lr"], saved["optimizers"]["weights"]["param_groups"][0]["lr"]]
    assert lrs == [2.5e-4, 2.5e-4] and all(type(lr) is float for lr in lrs)


def test_cuda_graph_is_refused_where_it_cannot_capture():
    with pytest.raises(ConfigError, match=r"train\.cuda_graph.*train\.device=cpu"):
        load_config("demo", ["train.device=cpu", "train.cuda_graph=true"])
    with pytest.raises(ConfigError, match=r"train\.cuda_graph.*train\.compile"):
        load_config("demo", ["train.cuda_graph=true", "train.compile=true"])
    cfg = load_config("demo", ["train.device=auto", "train.cuda_graph=true"])
    with pytest.raises(ConfigError, match=r"train\.cuda_graph.*runs on cpu"):
        check_cuda_graph(cfg, CPU, use_deepspeed=False)
    with pytest.raises(ConfigError, match=r"train\.cuda_graph.*--deepspeed"):
        check_cuda_graph(cfg, torch.device("cuda", 0), use_deepspeed=True)
    check_cuda_graph(load_config("demo", ["train.device=auto"]), CPU, use_deepspeed=False)


# --------------------------------------------------------------------------- on a GPU


def cuda_parts(mode: str, graphed: bool):
    """Tiny model, optimizers and steps on CUDA (``ddp``: the forward through DDP as the trainer
    builds it); with ``graphed`` the steps are captured after the trainer's warm-up count."""
    cfg, model = tiny(
        "model.num_parts=3", "train.amp=none", f"search.strategy={'darts1' if mode == 'darts1' else 'sync'}"
    )
    device = torch.device("cuda")
    model.to(device)
    forward = wrap_ddp(model, device, for_cuda_graph=graphed) if mode == "ddp" else model
    opts = build_optimizers(model, cfg, fused_weights=True)
    record = StepRecord(NonFiniteGuard(3), device)
    setup = loss_setup(model, cfg.data.sigma, device, None, False)
    params = [p for g in opts.weights.param_groups for p in g["params"]]
    w = StepParts(forward, model, opts.weights, params, setup, record, 0.0)
    steps = [partial(weight_step, w)]
    if opts.arch is not None:
        a = StepParts(model, model, opts.arch, list(model.arch_parameters()), setup, record, 0.0)
        steps.insert(0, partial(arch_step, a, world_size=1))
    if graphed:
        capture = cuda_graph_capture(torch.cuda.graph_pool_handle())
        for opt in (opts.weights, opts.arch):
            if opt is not None:
                make_capturable(opt, device)
        warmup = WARMUP_STEPS_DDP if mode == "ddp" else WARMUP_STEPS
        steps = [GraphedStep(f, device, warmup=warmup, capture=capture) for f in steps]
    return cfg, model, w, steps


@pytest.fixture
def nccl_single_rank(tmp_path, monkeypatch):
    """An NCCL group of one rank started as under ``train.cuda_graph``: DDP's all-reduces run."""
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["sync", "darts1", "ddp"])
def test_a_captured_step_matches_the_eager_step_on_cuda(mode, request):
    """Eager warm-up (3; 11 under DDP), capture, then replays to 16 steps (darts1: two graphs;
    ddp: DDP's static graph and its all-reduce captured): the same losses within 1e-5 relative
    and weights within 1e-4 of their norm (fp32; cuDNN may pick other algorithms)."""
    if mode == "ddp":
        request.getfixturevalue("nccl_single_rank")
    results = []
    for graphed in (False, True):
        cfg, model, w, steps = cuda_parts(mode, graphed)
        stream = [random_batch(cfg, seed=i) for i in range(16)]
        held_out = [random_batch(cfg, seed=100 + i) for i in range(16)]
        losses = []
        for i, batch in enumerate(stream):
            set_learning_rate(w.optimizer, 1e-3 if i < 13 else 2.5e-4)
            if len(steps) == 2:
                steps[0](held_out[i].to("cuda"))
            steps[-1](batch.to("cuda"))
            losses.append(w.record.read(step=i, lr=1e-3, world_size=1))
        if graphed:
            assert all(step.graph is not None for step in steps)
        results.append((losses, [t.detach().cpu() for t in model.state_dict().values()]))
    (want_losses, want), (got_losses, got) = results
    assert got_losses == pytest.approx(want_losses, rel=1e-5)
    for a, b in zip(want, got):
        if a.is_floating_point():
            assert (a - b).norm() <= 1e-4 * a.norm() + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["sync", "darts1"])
def test_a_cuda_graph_training_run_ends_where_the_eager_run_ends(tmp_path, tmp_path_factory, strategy):
    """The trainer end to end on CUDA: 2 epochs of 6 steps with the learning rate dropping between
    them, a checkpoint mid-way and at each epoch's end, eager and with ``train.cuda_graph``; the
    final checkpoints hold the same weights within 1e-4 of each tensor's norm (fp32)."""
    from pnfs.engine import checkpoint as ckpt
    from pnfs.engine.trainer import run_training
    from tests.engine.test_trainer import config

    def final_weights(name: str, *extra: str) -> dict[str, torch.Tensor]:
        cfg = config(
            tmp_path_factory, tmp_path / name, "train.device=cuda", "train.amp=none",
            f"search.strategy={strategy}", "train.checkpoint_every=4", *extra,
        )  # fmt: skip
        result = run_training(cfg)
        assert result["global_step"] == 12 and result["skipped_steps"] == 0
        saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / name / "checkpoints"))
        assert isinstance(saved["optimizers"]["weights"]["param_groups"][0]["lr"], float)
        return saved["model"]

    want, got = final_weights("eager"), final_weights("graphed", "train.cuda_graph=true")
    for name, a in want.items():
        if a.is_floating_point():
            assert (a - got[name]).norm() <= 1e-4 * a.norm() + 1e-6, name
