"""pnfs/engine/step.py, what its mutation run showed untested (docs/testing.md, mutation
section): darts1's architecture step averages alpha/beta's gradients over ``world_size`` ranks.

Tests of the step's other paths are in ``test_train_step.py`` and ``test_first_time_paths.py``."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_train_step import random_batch, step_parts, tiny

from pnfs.engine.step import StepParts, apply_if_finite, arch_step, weight_step
from pnfs.engine.strategies import build_optimizers


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
