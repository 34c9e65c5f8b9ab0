"""Flat parameters (``train.flat_params``, pnfs/engine/flat.py, issue 29 "Fewer launches"): every
parameter and gradient a view of a flat buffer, Adam over the buffers.

Tolerance. The first step is bitwise the per-tensor step (0 + g = g, and the first Adam update
is lr * sign-like for every element on both paths). After that CPU fused Adam can differ in the
last bit: it runs a vectorised loop with a scalar tail per tensor, and a small tensor (alpha,
beta) is all tail per tensor but inside the vectorised body of the flat buffer. So over a few
steps weights agree to 1e-5 of each tensor's largest value, losses to 1e-6 relative. With
clipping the norm is one reduction over the buffer instead of per-tensor norms: the clip factor
differs in its last bits, and Adam turns gradients that are pure rounding noise (a bias before a
BatchNorm) into full steps, so those are compared over one step only.
"""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch
import torch.distributed as dist

from pnfs.engine import checkpoint as ckpt
from pnfs.engine.distributed import wrap_ddp
from pnfs.engine.flat import FlatAdam, FlatParameters, FlatViewError
from pnfs.engine.graph import GraphedStep
from pnfs.engine.guard import NonFiniteGuard, StepRecord
from pnfs.engine.step import StepParts, arch_step, weight_step
from pnfs.engine.strategies import build_optimizers, make_capturable
from pnfs.loss import loss_setup, pose_loss
from tests.engine.test_step import Rerun, random_batch, tiny

CPU = torch.device("cpu")


def parts(cfg, model, flat: bool, forward=None, max_bad_steps: int = 3) -> tuple[StepParts, StepParts | None]:
    """(weight step parts, darts1's architecture step parts or None) as the trainer builds them."""
    opts = build_optimizers(model, cfg, fused_weights=True, flat=flat)
    setup = loss_setup(model, cfg.data.sigma, CPU, None, cfg.train.channels_last)
    record = StepRecord(NonFiniteGuard(max_bad_steps), CPU)
    params = [p for g in opts.weights.param_groups for p in g["params"]]
    weights = StepParts(forward or model, model, opts.weights, params, setup, record, cfg.train.grad_clip)
    arch = None
    if opts.arch is not None:
        arch_params = [p for p in model.arch_parameters() if p.requires_grad]
        arch = StepParts(model, model, opts.arch, arch_params, setup, record, 0.0)  # not clipped, as DARTS
    return weights, arch


def train(s: StepParts, arch: StepParts | None, steps: int, first_seed: int = 0) -> list[float]:
    """``steps`` iterations (darts1: an architecture step on a held-out batch first); the losses."""
    cfg = CONFIGS[id(s.module)]
    losses = []
    for i in range(steps):
        if arch is not None:
            arch_step(arch, random_batch(cfg, seed=100 + first_seed + i), world_size=1)
        weight_step(s, random_batch(cfg, seed=first_seed + i))
        losses.append(s.record.read(step=i, lr=1e-3, world_size=1))
    return losses


CONFIGS: dict[int, object] = {}  # id(model) -> its config, for train()


def assert_close_weights(a: torch.nn.Module, b: torch.nn.Module, rel: float) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if x.is_floating_point():
            scale = x.abs().max().clamp_min(1e-12)
            assert ((x - y).abs().max() / scale) <= rel, name
        else:
            assert torch.equal(x, y), name


def models(*overrides: str):
    """The same tiny model twice, channels_last as the trainer runs it (one to train per tensor,
    one flat)."""
    cfg, a = tiny("model.num_parts=3", *overrides)
    _, b = tiny("model.num_parts=3", *overrides)
    a, b = a.to(memory_format=torch.channels_last), b.to(memory_format=torch.channels_last)
    CONFIGS[id(a)] = CONFIGS[id(b)] = cfg
    return cfg, a, b


# --------------------------------------------------------------------------- layout


def test_every_parameter_and_gradient_is_a_view_of_its_flat_buffer_and_keeps_its_layout():
    cfg, plain, model = models()
    opt = build_optimizers(model, cfg, fused_weights=True, flat=True).weights
    assert isinstance(opt, FlatAdam)
    flat = opt.flat
    arch = {id(p) for p in model.arch_parameters()}
    assert len(flat.buffers) == 2  # weights; alpha/beta (sync: both in the weight Adam)
    assert {id(p) for p in flat.buffers[1].params} == arch
    assert sum(b.data.numel() for b in flat.buffers) == sum(p.numel() for p in model.parameters())
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q) and p.stride() == q.stride()  # values and channels_last kept
    flat.check_views()
    conv = next(p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    with torch.no_grad():
        flat.buffers[0].data.add_(1.0)  # the buffer is the parameters
        flat.buffers[0].grad.fill_(2.0)
    for p, q in zip(model.parameters(), plain.parameters()):
        moved = id(p) not in arch
        assert torch.equal(p.detach(), q.detach() + 1 if moved else q.detach())
        assert torch.equal(p.grad, torch.full_like(p, 2.0) if moved else torch.zeros_like(p))


def test_the_backward_adds_into_the_flat_gradient_buffer_bitwise():
    cfg, plain, model = models()
    a, _ = parts(cfg, plain, flat=False)
    b, _ = parts(cfg, model, flat=True)
    batch = random_batch(cfg)
    b.optimizer.flat.zero_grad()
    for s in (a, b):
        pose_loss_backward(s, batch)
    flat = b.optimizer.flat
    for k, (p, q) in enumerate(zip(b.params, a.params)):
        assert p.grad is flat.buffers[flat._where[k][0]].grad_views[flat._where[k][1]], k
        assert torch.equal(p.grad, q.grad), k
    norm = flat.norm()
    want = torch.nn.utils.clip_grad_norm_(a.params, float("inf"))
    assert torch.allclose(norm, want, rtol=1e-6, atol=0), (norm.item(), want.item())


def pose_loss_backward(s: StepParts, batch) -> None:
    from pnfs.loss import batch_loss

    batch_loss(s.forward, batch, s.setup).backward()


def test_a_cleared_gradient_is_attached_again_before_the_next_backward():
    """``Module.zero_grad(set_to_none=True)`` between steps (the bench's probe does it) must not
    leave the next backward writing gradients outside the buffer."""
    cfg, plain, model = models()
    a, _ = parts(cfg, plain, flat=False)
    b, _ = parts(cfg, model, flat=True)
    batch = random_batch(cfg)
    for s, m in ((a, plain), (b, model)):  # (both: the BatchNorm statistics move alike)
        pose_loss_backward(s, batch)
        m.zero_grad(set_to_none=True)  # flat: the views are gone, the buffer still holds that backward
    weight_step(a, batch)
    weight_step(b, batch)
    assert_close_weights(plain, model, rel=0.0)  # the first step: bitwise
    assert all(p.grad is not None for p in b.params)
    b.optimizer.flat.check_views()


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("strategy", ["sync", "darts1", "random"])
def test_flat_training_ends_where_per_tensor_training_ends(strategy):
    cfg, plain, model = models(f"search.strategy={strategy}", "train.weight_decay=1e-4")
    a, a_arch = parts(cfg, plain, flat=False)
    b, b_arch = parts(cfg, model, flat=True)
    assert isinstance(b.optimizer, FlatAdam) and not isinstance(a.optimizer, FlatAdam)
    first_a, first_b = train(a, a_arch, 1), train(b, b_arch, 1)
    assert first_a == first_b
    assert_close_weights(plain, model, rel=0.0)  # one step: bitwise
    losses_a, losses_b = train(a, a_arch, 4, first_seed=1), train(b, b_arch, 4, first_seed=1)
    assert losses_b == pytest.approx(losses_a, rel=1e-6)
    assert_close_weights(plain, model, rel=1e-5)
    outside = [p for p in model.parameters() if not b.optimizer.flat.holds(p)]
    assert bool(outside) == (strategy != "sync")  # darts1, random: alpha/beta outside the weight Adam
    assert all(p.grad is None for p in outside)  # dropped after the weight step, as per tensor
    saved_a, saved_b = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert saved_a["param_groups"] == saved_b["param_groups"]
    for k, entry in saved_a["state"].items():
        assert list(entry) == list(saved_b["state"][k]) == ["step", "exp_avg", "exp_avg_sq"]
        assert torch.equal(entry["step"], saved_b["state"][k]["step"])
        for name in ("exp_avg", "exp_avg_sq"):
            x, y = entry[name], saved_b["state"][k][name]
            assert x.stride() == y.stride()
            assert (x - y).abs().max() <= 1e-4 * x.abs().max() + 1e-20, (k, name)


def test_grad_clip_clips_the_flat_gradients_as_clip_grad_norm_does():
    cfg, plain, model = models("train.grad_clip=0.05")
    a, _ = parts(cfg, plain, flat=False)
    b, _ = parts(cfg, model, flat=True)
    batch = random_batch(cfg)
    for s in (a, b):
        if isinstance(s.optimizer, FlatAdam):
            s.optimizer.flat.zero_grad()
        pose_loss_backward(s, batch)
    want = torch.nn.utils.clip_grad_norm_(a.params, 0.05)
    got = b.optimizer.flat.clipped_norm(0.05)
    assert want > 0.1 and torch.allclose(got, want, rtol=1e-6, atol=0)  # it does clip
    total = torch.cat([p.grad.flatten() for p in b.params]).double().norm()
    assert total == pytest.approx(0.05, rel=1e-5)
    for p, q in zip(b.params, a.params):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-12)
    cfg, plain, model = models("train.grad_clip=0.05")
    a, _ = parts(cfg, plain, flat=False)
    b, _ = parts(cfg, model, flat=True)
    assert train(a, None, 1) == pytest.approx(train(b, None, 1), rel=1e-6)
    assert_close_weights(plain, model, rel=1e-5)


@pytest.mark.parametrize("first", [True, False], ids=["first-step", "later-step"])
def test_a_non_finite_step_changes_nothing_in_the_flat_buffers(first):
    cfg, _, model = models()
    s, _ = parts(cfg, model, flat=True)
    batch = random_batch(cfg)
    if not first:
        weight_step(s, batch)
    model.eval()  # BatchNorm statistics move in a forward; the update is what is checked here
    opt = s.optimizer
    before = [t.clone() for t in (*opt.flat.datas, *opt.exp_avg, *opt.exp_avg_sq, opt.step_count)]
    weight_step(s, batch, lambda *a: pose_loss(*a) * float("nan"))
    after = [*opt.flat.datas, *opt.exp_avg, *opt.exp_avg_sq, opt.step_count]
    assert all(torch.equal(x, y) for x, y in zip(before, after)), "a skipped step moved a tensor"
    assert s.record.guard.total == 0  # counted at the read
    s.record.read(step=1, lr=1e-3, world_size=1)
    assert s.record.guard.total == 1
    weight_step(s, batch)
    assert not torch.equal(before[0], opt.flat.datas[0]), "a good step moved nothing"
    assert int(opt.step_count) == (1 if first else 2)


# --------------------------------------------------------------------------- state dicts


def test_the_state_dict_round_trips_through_a_per_tensor_adam_both_ways():
    cfg, plain, model = models()
    a, _ = parts(cfg, plain, flat=False)
    b, _ = parts(cfg, model, flat=True)
    train(a, None, 2)
    train(b, None, 2)
    # flat -> per-tensor: a fresh torch Adam loads the flat state and saves the same dict back
    saved = b.optimizer.state_dict()
    per_tensor = build_optimizers(model, cfg, fused_weights=True).weights  # views as plain params
    per_tensor.load_state_dict(saved)
    again = per_tensor.state_dict()
    assert again["param_groups"] == saved["param_groups"]
    for k, entry in saved["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, again["state"][k][name]), (k, name)
    # per-tensor -> flat: a fresh flat model loads the per-tensor run's state and saves it back
    _, _, other = models()
    other.load_state_dict(plain.state_dict())
    c, _ = parts(cfg, other, flat=True)
    c.optimizer.load_state_dict(a.optimizer.state_dict())
    back = c.optimizer.state_dict()
    for k, entry in a.optimizer.state_dict()["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, back["state"][k][name]), (k, name)
            assert value.stride() == back["state"][k][name].stride()
    c.optimizer.flat.check_views()
    # and both go on alike from there: the loaded moments are the ones used
    assert train(a, None, 1, first_seed=5) == pytest.approx(train(c, None, 1, first_seed=5), rel=1e-6)
    assert_close_weights(plain, other, rel=1e-5)


def test_saved_steps_are_separate_tensors_and_an_unstarted_state_is_empty():
    cfg, _, model = models()
    s, _ = parts(cfg, model, flat=True)
    assert s.optimizer.state_dict()["state"] == {}  # as torch.optim.Adam before its first step
    train(s, None, 1)
    state = s.optimizer.state_dict()["state"]
    steps = [entry["step"] for entry in state.values()]
    assert len({t.data_ptr() for t in steps}) == len(steps)  # a per-tensor Adam adds 1 to each
    per_tensor = torch.optim.Adam(s.params, lr=1e-3, fused=True)
    per_tensor.load_state_dict(s.optimizer.state_dict())
    per_tensor.step()
    assert {int(st["step"]) for st in per_tensor.state.values()} == {2}


def test_loading_unequal_step_counts_is_refused_with_the_way_out():
    cfg, plain, model = models()
    a, _ = parts(cfg, plain, flat=False)
    train(a, None, 1)
    saved = a.optimizer.state_dict()
    saved["state"][3]["step"] = saved["state"][3]["step"] + 1
    b, _ = parts(cfg, model, flat=True)
    with pytest.raises(ValueError, match=r"step counts differ.*train\.flat_params=false"):
        b.optimizer.load_state_dict(saved)


def test_a_state_of_another_layout_is_refused_naming_the_parameter():
    """torch.optim.Adam loads moments of the wrong shape without a word (and its fused kernel
    then reads past them); FlatAdam names the parameter."""
    cfg, plain, model = models()
    a, _ = parts(cfg, plain, flat=False)
    train(a, None, 1)
    saved = a.optimizer.state_dict()
    saved["state"][0], saved["state"][1] = saved["state"][1], saved["state"][0]
    b, _ = parts(cfg, model, flat=True)
    with pytest.raises(ValueError, match=r"optimizer state: parameter 0 has shape .* exp_avg of shape"):
        b.optimizer.load_state_dict(saved)


def test_views_stay_views_after_load_state_dict_and_to():
    cfg, plain, model = models()
    s, _ = parts(cfg, model, flat=True)
    train(s, None, 1)
    flat = s.optimizer.flat
    model.load_state_dict(plain.state_dict())
    model.to(CPU)
    model.to(memory_format=torch.channels_last)
    s.optimizer.load_state_dict(s.optimizer.state_dict())
    flat.check_views()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))
    model.to(torch.float64)  # a new tensor per parameter: no longer the buffer
    with pytest.raises(FlatViewError, match=r"parameter 0 .* no longer a view"):
        flat.check_views()


def test_a_checkpoint_of_flat_parameters_holds_each_tensor_once(tmp_path):
    """``torch.save`` writes a view's whole storage: a state dict holding only the backbone's
    views would carry every parameter; :func:`ckpt.own_storage` copies them out."""
    cfg, plain, model = models()
    parts(cfg, model, flat=True)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.fabric.cells.l1")}
    own_bytes = sum(v.numel() * v.element_size() for v in backbone.values())
    assert own_bytes < param_bytes / 4
    torch.save(ckpt.own_storage(backbone), tmp_path / "part.pt")
    assert (tmp_path / "part.pt").stat().st_size < own_bytes + 64 * 1024
    torch.save(ckpt.own_storage(model.state_dict()), tmp_path / "flat.pt")
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    flat_size, plain_size = (tmp_path / "flat.pt").stat().st_size, (tmp_path / "plain.pt").stat().st_size
    assert param_bytes < flat_size <= 1.02 * plain_size  # (the zip's per-record overhead differs a little)


# --------------------------------------------------------------------------- DDP, CUDA graph


@pytest.fixture
def single_rank_group(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_writes_its_reduced_gradients_into_the_flat_views(single_rank_group):
    """DDP (no bucket views) copies each reduced bucket back into ``p.grad`` in place: the flat
    buffer gets them, and DDP training ends where the bare flat training ends, bitwise."""
    cfg, bare, model = models()
    ddp_parts, _ = parts(cfg, model, flat=True)
    ddp_parts.forward = wrap_ddp(model, CPU)
    ddp_parts.optimizer.flat.check_views()  # DDP's start-up broadcast copied in place
    plain_parts, _ = parts(cfg, bare, flat=True)
    assert train(ddp_parts, None, 3) == train(plain_parts, None, 3)
    assert_close_weights(bare, model, rel=0.0)
    ddp_parts.optimizer.flat.check_views()


def two_rank_worker(rank: int, store_path: str, out: str) -> None:
    """One of two gloo ranks: 3 DDP steps on its own batches, per tensor and flat; saves both."""
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        cfg, plain, model = models()
        result = {}
        for name, m, flat in (("per_tensor", plain, False), ("flat", model, True)):
            s, _ = parts(cfg, m, flat=flat)
            s.forward = wrap_ddp(m, CPU)
            for i in range(3):
                weight_step(s, random_batch(cfg, seed=10 * rank + i))
            result[name] = {k: v.clone() for k, v in m.state_dict().items()}
            if flat:
                s.optimizer.flat.check_views()
        torch.save(result, f"{out}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ddp_ranks_average_into_the_flat_gradients(tmp_path):
    """Two ranks on different batches: the flat ranks end with the same weights (the reduced
    gradients reached the flat buffers) and where per-tensor DDP ends."""
    import torch.multiprocessing as mp

    mp.spawn(two_rank_worker, args=(str(tmp_path / "store"), str(tmp_path / "rank")), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank-{r}.pt") for r in range(2)]
    for key, value in ranks[0]["flat"].items():
        if "running" not in key:  # BatchNorm statistics are each rank's own (docs/design.md §7)
            assert torch.equal(value, ranks[1]["flat"][key]), key
    for key, want in ranks[0]["per_tensor"].items():
        got = ranks[0]["flat"][key]
        if want.is_floating_point():
            assert (got - want).abs().max() <= 1e-5 * want.abs().max().clamp_min(1e-12), key
    # and the averaging mattered: rank 0 alone on its own batches ends elsewhere
    cfg, _, model = models()
    s, _ = parts(cfg, model, flat=True)
    for i in range(3):
        weight_step(s, random_batch(cfg, seed=i))
    alone = model.state_dict()
    assert any(not torch.equal(alone[k], ranks[0]["flat"][k]) for k in alone if "running" not in k)


def test_a_graphed_flat_step_ends_bitwise_where_the_eager_flat_step_ends():
    """The stand-in capture replays the recorded flat step: the buffers never move (static
    addresses), and a capturable tensor learning rate reaches the flat update."""
    cfg, eager_model, model = models()
    eager, _ = parts(cfg, eager_model, flat=True)
    graphed, _ = parts(cfg, model, flat=True)
    make_capturable(graphed.optimizer, CPU)
    assert isinstance(graphed.optimizer.param_groups[0]["lr"], torch.Tensor)
    addresses = [t.data_ptr() for t in (*graphed.optimizer.flat.datas, *graphed.optimizer.flat.grads)]
    step = GraphedStep(partial(weight_step, graphed), CPU, warmup=1, capture=Rerun)
    for i in range(4):
        batch = random_batch(cfg, seed=i)
        weight_step(eager, batch)
        step(batch)
    assert step.graph is not None
    assert_close_weights(eager_model, model, rel=0.0)
    assert addresses == [t.data_ptr() for t in (*graphed.optimizer.flat.datas, *graphed.optimizer.flat.grads)]


def test_flat_parameters_refuse_a_parameter_twice():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="twice"):
        FlatParameters([[p], [p]])


# --------------------------------------------------------------------------- the config key


def test_train_flat_params_picks_the_weight_optimizer_of_a_training_run(
    tmp_path, tmp_path_factory, monkeypatch
):
    """``train.flat_params`` as a user sets it (a config override): true (the default) trains with
    FlatAdam, false with per-tensor Adam; a run stopped under one resumes under the other and
    ends close to the uninterrupted run (the checkpoint format is the same)."""
    import pnfs.engine.trainer as trainer_module
    from tests.engine.test_trainer import config

    seen = []
    real = trainer_module.Trainer.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append(type(self.optimizers.weights).__name__)

    monkeypatch.setattr(trainer_module.Trainer, "__init__", spy)
    whole = trainer_module.run_training(
        config(tmp_path_factory, tmp_path / "whole", "train.flat_params=false")
    )
    first = trainer_module.run_training(config(tmp_path_factory, tmp_path / "split", "train.stop_at_step=4"))
    second = trainer_module.run_training(
        config(tmp_path_factory, tmp_path / "split", "train.flat_params=false"), resume="auto"
    )
    back = trainer_module.run_training(
        config(tmp_path_factory, tmp_path / "back", "train.flat_params=false", "train.stop_at_step=4")
    )
    again = trainer_module.run_training(config(tmp_path_factory, tmp_path / "back"), resume="auto")
    assert seen == ["Adam", "FlatAdam", "Adam", "Adam", "FlatAdam"]
    assert (
        first["stopped"]
        and back["stopped"]
        and second["global_step"] == again["global_step"] == whole["global_step"] == 12
    )
    final = {
        name: ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / name / "checkpoints"))["model"]
        for name in ("whole", "split", "back")
    }
    for name in ("split", "back"):
        for key, want in final["whole"].items():
            got = final[name][key]
            if want.is_floating_point():
                assert (got - want).abs().max() <= 1e-4 * want.abs().max().clamp_min(1e-12), (name, key)
    size = os.path.getsize(ckpt.latest_checkpoint(tmp_path / "back" / "checkpoints"))
    whole_size = os.path.getsize(ckpt.latest_checkpoint(tmp_path / "whole" / "checkpoints"))
    assert size <= 1.02 * whole_size  # flat saves no more than per-tensor
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "back" / "checkpoints"))
    tensors = [*saved["model"].values()]
    tensors += [t for entry in saved["optimizers"]["weights"]["state"].values() for t in entry.values()]
    for t in tensors:  # each in its own storage, as a per-tensor run writes them: a part saved again is small
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


@pytest.mark.skipif(
    not hasattr(torch._dynamo.config, "trace_autograd_ops"), reason="Dynamo cannot trace backward here"
)
def test_a_whole_flat_training_step_of_the_demo_model_traces_without_graph_breaks(monkeypatch):
    """As the per-tensor step does (tests/engine/test_step.py): the zeroing with its re-attach,
    forward, backward, the flat norm, FlatAdam's update and the record, one graph."""
    from pnfs.config import load_config
    from pnfs.model import build_model

    monkeypatch.setenv("PNFS_KERNELS", "torch")
    cfg = load_config("demo", ["train.device=cpu"])
    torch.manual_seed(0)
    model = build_model(cfg)
    s, _ = parts(cfg, model, flat=True)
    batch = random_batch(cfg, n=2)
    weight_step(s, batch)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        explained = torch._dynamo.explain(weight_step)(s, batch)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
