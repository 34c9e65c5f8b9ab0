"""The lean training step (issue 12): the fused loss equals the score path, a non-finite step
changes nothing and is counted, and no step talks to the host between log reads."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.distributed as dist

from pnfs.config import load_config
from pnfs.data.batch import PoseBatch
from pnfs.data.targets import gaussian_targets
from pnfs.engine.distributed import wrap_ddp
from pnfs.engine.graph import GraphedStep
from pnfs.engine.guard import NonFiniteGuard, NonFiniteLossError, StepRecord
from pnfs.engine.step import (
    StepParts,
    apply_if_finite,
    arch_step,
    clipped_norm,
    poison_non_finite,
    weight_step,
)
from pnfs.engine.strategies import build_optimizers, make_capturable
from pnfs.loss import batch_loss, loss_setup, pose_loss
from pnfs.model import build_model

# a few thousand parameters at 64x64 (as the engine tests' TINY_OVERRIDES)
TINY = [
    "data.dataset=coco",
    "data.input_size=[64,64]",
    "model.backbone.name=fabric",
    "model.backbone.fabric_channels=2",
    "model.backbone.fabric_layers=3",
    "model.channels=2",
    "train.device=cpu",
]


CPU = torch.device("cpu")


def tiny(*overrides: str):
    cfg = load_config(None, [*TINY, *overrides])
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def random_batch(cfg, n: int = 3, seed: int = 0) -> PoseBatch:
    h, w = cfg.data.input_size
    g = torch.Generator().manual_seed(seed)
    kp = torch.rand(n, cfg.num_joints, 3, generator=g)
    kp[..., 0] *= w - 1
    kp[..., 1] *= h - 1
    kp[..., 2] = (kp[..., 2] > 0.2).float()  # some joints unlabelled
    return PoseBatch(
        image=torch.randn(n, 3, h, w, generator=g),
        keypoints=kp,
        affine=torch.eye(2, 3).expand(n, 2, 3).clone(),
        image_id=torch.arange(n),
        ann_id=torch.arange(n),
        score=torch.ones(n),
    )


def loss_and_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("d", [1, 4, 8])
@pytest.mark.parametrize("parts", [1, 3, 5, 8])
def test_fused_loss_equals_the_score_path(parts, d):
    cfg, model = tiny(f"model.num_parts={parts}", f"model.vector_dim={d}")
    batch = random_batch(cfg)
    scores = model(batch.image)
    targets, weights = gaussian_targets(batch.keypoints, tuple(scores.shape[-2:]), cfg.data.sigma)
    want, want_grads = loss_and_grads(model, pose_loss(scores.float(), targets, weights))

    setup = loss_setup(model, cfg.data.sigma, torch.device("cpu"), None, False)
    assert (setup.vector_joints is None) == (parts == 8)  # P=8 shares joints: the score path
    got, got_grads = loss_and_grads(model, batch_loss(model, batch, setup))
    assert got.dtype == torch.float32
    assert abs(got - want) <= 1e-6 * want
    assert len(got_grads) == len(want_grads) > 0
    for g, w in zip(got_grads, want_grads):
        assert (g - w).norm() <= 1e-6 * w.norm() + 1e-12


def step_parts(cfg, model, max_bad_steps: int = 3, forward=None, device=CPU) -> StepParts:
    opt = build_optimizers(model, cfg, fused_weights=True).weights
    params = [p for g in opt.param_groups for p in g["params"]]
    setup = loss_setup(model, cfg.data.sigma, device, None, False)
    record = StepRecord(NonFiniteGuard(max_bad_steps), device)
    return StepParts(forward or model, model, opt, params, setup, record, cfg.train.grad_clip)


def snapshot(s: StepParts) -> list[torch.Tensor]:
    state = [t for st in s.optimizer.state.values() for t in st.values()]
    return [t.detach().clone() for t in [*s.module.state_dict().values(), *state]]


def test_a_non_finite_step_changes_nothing_and_aborts_after_max_bad_steps():
    cfg, model = tiny("model.num_parts=3")
    s = step_parts(cfg, model, max_bad_steps=3)
    batch = random_batch(cfg)
    weight_step(s, batch)  # a good step: Adam's state exists, the weights moved
    before = snapshot(s)
    model.eval()  # BN running statistics would move in the forward; the step's update is what counts here
    nan_loss = lambda *a: pose_loss(*a) * float("nan")
    weight_step(s, batch, nan_loss)
    after = snapshot(s)
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "a skipped step moved a tensor"
    weight_step(s, batch)
    assert not all(torch.equal(a, b) for a, b in zip(after, snapshot(s))), "a good step moved nothing"

    weight_step(s, batch, nan_loss)
    weight_step(s, batch, nan_loss)
    mean = s.record.read(step=5, lr=1e-3, world_size=1)  # a streak of 2 < 3: no abort
    assert mean != mean  # the window's mean loss includes the NaN steps, as logged
    assert s.record.guard.total == 3 and s.record.guard.consecutive == 2
    weight_step(s, batch, lambda *a: pose_loss(*a) * float("inf"))
    weight_step(s, batch)  # a good step after the third bad one: the abort comes at the read
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        s.record.read(step=7, lr=1e-3, world_size=1)
    assert s.record.guard.total == 4 and s.record.guard.consecutive == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_poisons_one_gradient_and_a_finite_one_changes_nothing(bad):
    anchor = torch.nn.Parameter(torch.tensor([[1.5, -2.0], [0.5, 3.0]]))
    other = torch.nn.Parameter(torch.tensor([0.25, 4.0]))
    loss = (anchor.square().sum() + other.sum()) * 0.1
    poisoned = poison_non_finite(loss, anchor)
    assert torch.equal(poisoned, loss)
    poisoned.backward()
    assert torch.equal(anchor.grad, 0.2 * anchor.detach()) and torch.equal(other.grad, torch.full((2,), 0.1))
    anchor.grad = other.grad = None
    poison_non_finite(loss.detach() * bad + anchor.sum() * 0.0, anchor).backward()
    assert torch.isnan(anchor.grad).sum() == 1  # what the all-reduce carries to every rank


def test_the_fused_update_is_bitwise_adams_own_step():
    cfg, model = tiny("model.num_parts=3", "train.weight_decay=1e-4")
    _, twin = tiny("model.num_parts=3", "train.weight_decay=1e-4")
    ours, theirs = step_parts(cfg, model), step_parts(cfg, twin)
    batch = random_batch(cfg)
    finite = torch.tensor(True)
    for _ in range(3):  # the first step builds the state through Adam.step, the others do not
        for m, s in ((model, ours), (twin, theirs)):
            batch_loss(m, batch, s.setup).backward()
        apply_if_finite(ours.optimizer, finite)
        theirs.optimizer.step()
        model.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(ours), snapshot(theirs)))
    assert int(ours.optimizer.state[ours.params[0]]["step"]) == 3


@pytest.mark.parametrize("max_norm", [0.0, 1e-3])
def test_the_norm_is_clip_grad_norms_and_clips_only_with_a_max_norm(max_norm):
    cfg, model = tiny("model.num_parts=3")
    batch_loss(model, random_batch(cfg), step_parts(cfg, model).setup).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad.clone() for p in params]
    norm = clipped_norm(params, max_norm)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for t, g in zip(twins, grads):
        t.grad = g.clone()
    want_norm = torch.nn.utils.clip_grad_norm_(twins, max_norm if max_norm > 0 else float("inf"))
    assert torch.equal(norm, want_norm) and norm > 10 * max_norm
    assert all(torch.equal(p.grad, t.grad) for p, t in zip(params, twins))
    if max_norm == 0:  # no clipping: the gradients are left as they were
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__")
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "_broadcast_coalesced",  # DDP's broadcast of the buffers at a forward (off: wrap_ddp)
)


@pytest.fixture
def single_rank_group(tmp_path):
    """A gloo process group of one rank, so that DDP and the collectives really run."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Rerun:
    """A CPU stand-in for a CUDA-graph capture: remembers the step (counted in ``captured``) and
    reruns it eagerly at each replay, on the static buffers it was recorded with."""

    captured = 0

    def __init__(self, fn):
        Rerun.captured += 1
        self.fn = fn

    def replay(self) -> None:
        self.fn()


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "cuda_graph"])
def test_no_host_sync_between_log_reads(monkeypatch, single_rank_group, graphed):
    """Nothing reads the device or talks to other ranks in a step (DDP's per-forward broadcast of
    the BatchNorm buffers included); with ``train.cuda_graph`` neither the static buffers'
    copy-in, the capture nor the replays do."""
    cfg, model = tiny("model.num_parts=3")
    ddp = wrap_ddp(model, torch.device("cpu"))
    s = step_parts(cfg, model, forward=ddp)
    step = partial(weight_step, s)
    if graphed:
        make_capturable(s.optimizer, torch.device("cpu"))
        step = GraphedStep(step, torch.device("cpu"), warmup=1, capture=Rerun)
    batch = random_batch(cfg)
    step(batch)  # the first step builds Adam's state (under cuda_graph: the warm-up)
    calls: list[str] = []

    def counting(owner, name):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    for name in SYNCS:
        counting(torch.Tensor, name)
    for name in COLLECTIVES:
        counting(dist, name)
    for _ in range(4):
        step(batch)
    assert calls == [], f"host syncs or collectives inside the steps: {calls}"
    loss = s.record.read(step=5, lr=1e-3, world_size=1)
    assert loss > 0 and "tolist" in calls and "all_reduce" in calls  # the read is seen (the wrappers work)


@pytest.mark.skipif(
    not hasattr(torch._dynamo.config, "trace_autograd_ops"), reason="Dynamo cannot trace backward here"
)
def test_a_whole_training_step_of_the_demo_model_traces_without_graph_breaks(monkeypatch):
    """forward, fused loss, backward, clipping, the fused Adam update and the record: one graph."""
    monkeypatch.setenv("PNFS_KERNELS", "torch")
    cfg = load_config("demo", ["train.device=cpu"])
    torch.manual_seed(0)
    model = build_model(cfg)
    s = step_parts(cfg, model)
    batch = random_batch(cfg, n=2)
    weight_step(s, batch)  # Adam's state exists from here on
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        explained = torch._dynamo.explain(weight_step)(s, batch)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


# What the mutation run of pnfs/engine/step.py showed untested (docs/testing.md, mutation
# section): darts1's architecture step averages alpha/beta's gradients over ``world_size`` ranks,
# a weight step frees its gradients, the fused update with amsgrad and an empty group.


def arch_parts() -> StepParts:
    cfg, model = tiny("model.num_parts=3", "search.strategy=darts1")
    opt = build_optimizers(model, cfg, fused_weights=True).arch
    s = step_parts(cfg, model)
    params = [p for g in opt.param_groups for p in g["params"]]
    return StepParts(s.forward, model, opt, params, s.setup, s.record, 0.0)


def test_the_architecture_step_averages_alpha_beta_gradients_over_the_ranks(monkeypatch):
    """Two ranks that saw the same batch: the all-reduce sums two equal gradients and the step
    divides by ``world_size=2``, so alpha/beta end bitwise where one process's step puts them.
    Only alpha/beta's gradients are reduced (darts1 runs the bare module, outside DDP)."""
    one, two = arch_parts(), arch_parts()
    cfg, _ = tiny("model.num_parts=3", "search.strategy=darts1")
    batch = random_batch(cfg)
    for _ in range(2):  # Adam's first step (state built through step()) and a fused one
        arch_step(one, batch, world_size=1)

    reduced: list[torch.Tensor] = []

    def other_rank_has_the_same_gradient(tensor, *args, **kwargs):
        reduced.append(tensor)
        tensor.mul_(2)

    monkeypatch.setattr(dist, "all_reduce", other_rank_has_the_same_gradient)
    for _ in range(2):
        arch_step(two, batch, world_size=2)
    assert len(reduced) == 2 * len(two.params), "every alpha/beta gradient is reduced once a step"
    assert all(any(r is not None and r.shape == p.shape for r in reduced) for p in two.params)
    for p, q in zip(one.params, two.params):
        assert torch.equal(p, q), "two ranks with the same batch moved alpha/beta differently from one"
    assert all(p.grad is None for p in two.params)  # cleared for the next weight step
    moved = [not torch.equal(p, q) for p, q in zip(one.params, arch_parts().params)]
    assert all(moved), "the steps moved no alpha/beta: the comparison would prove nothing"


def test_a_weight_step_frees_every_gradient():
    """``zero_grad(set_to_none=True)``: after a step no parameter holds a gradient tensor (the
    next forward runs without the last step's gradient memory; alpha/beta, which the weight
    step's backward reaches under darts1, start the architecture step clean)."""
    cfg, model = tiny("model.num_parts=3", "search.strategy=darts1")
    s = step_parts(cfg, model)
    batch = random_batch(cfg)
    for _ in range(2):  # the first step (Adam's state built through step()) and a fused one
        s.module.zero_grad(set_to_none=True)
        s.forward(batch.image).sum().backward()  # gradients present before the step, as after a backward
        weight_step(s, batch)
        held = [n for n, p in model.named_parameters() if p.grad is not None]
        assert held == [], f"gradients left after the step: {held[:5]}"


@pytest.mark.parametrize("amsgrad", [False, True])
def test_the_fused_update_is_adams_step_with_amsgrad_and_a_group_without_gradients(amsgrad):
    """apply_if_finite's fused path against ``Adam.step()`` beyond what build_optimizers makes
    (one group, no amsgrad): amsgrad's moment, and a first group whose parameters got no
    gradient this step, which Adam skips while still stepping the groups after it."""
    torch.manual_seed(0)
    values = [torch.randn(5), torch.randn(3, 2), torch.randn(4)]
    ours = [torch.nn.Parameter(v.clone()) for v in values]
    theirs = [torch.nn.Parameter(v.clone()) for v in values]

    def adam(params):
        groups = [{"params": params[:1]}, {"params": params[1:], "lr": 0.05, "weight_decay": 0.01}]
        return torch.optim.Adam(groups, lr=0.1, betas=(0.8, 0.9), amsgrad=amsgrad, fused=True)

    opt_ours, opt_theirs = adam(ours), adam(theirs)
    finite = torch.tensor(True)
    for step in range(4):
        grads = [torch.randn(v.shape) * (1 + step) for v in values]
        for params in (ours, theirs):
            for p, g in zip(params, grads):
                p.grad = None if (step >= 2 and p is params[0]) else g.clone()
        apply_if_finite(opt_ours, finite)  # step 0 builds the state, 1-3 take the fused path
        opt_theirs.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
    for p, q in zip(ours, theirs):
        for key, value in opt_theirs.state[q].items():
            assert torch.equal(opt_ours.state[p][key], value), key
    assert int(opt_ours.state[ours[0]]["step"]) == 2 and int(opt_ours.state[ours[1]]["step"]) == 4
