"""First-time paths fed the bad case (issue 26): the very first optimizer step (the one that
builds Adam's state through ``Optimizer.step``) meets a non-finite loss, and the guard's
``train.max_bad_steps`` is met at its edge."""

from __future__ import annotations

import pytest
import torch

from pnfs.engine.guard import NonFiniteLossError
from pnfs.engine.step import arch_step, weight_step
from pnfs.loss import pose_loss
from tests.engine.test_step import random_batch, snapshot, step_parts, tiny


def nan_loss(*args):
    return pose_loss(*args) * float("nan")


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_a_non_finite_first_step_leaves_weights_and_adam_untouched():
    cfg, model = tiny("model.num_parts=3")
    s = step_parts(cfg, model)
    model.eval()  # BN statistics move in any forward; the update is what is checked
    before = weights(model)
    weight_step(s, random_batch(cfg), nan_loss)  # the first step: Adam's state is built here
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model))), "a NaN first step moved a weight"
    steps = {int(st["step"]) for st in s.optimizer.state.values()}
    assert steps <= {0}, f"a skipped first step was counted by Adam: {steps}"
    assert s.record.guard.total == 0  # not read yet: the host reads at log time
    s.record.read(step=1, lr=1e-3, world_size=1)
    assert s.record.guard.total == 1

    weight_step(s, random_batch(cfg))  # the next good step is Adam's first
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, weights(model)))
    assert {int(st["step"]) for st in s.optimizer.state.values()} == {1}


def test_a_non_finite_first_architecture_step_leaves_alpha_beta_untouched():
    cfg, model = tiny("model.num_parts=3", "search.strategy=darts1")
    from pnfs.engine.strategies import build_optimizers

    opt = build_optimizers(model, cfg, fused_weights=True).arch
    s = step_parts(cfg, model)
    arch_params = [p for g in opt.param_groups for p in g["params"]]
    s = type(s)(s.forward, model, opt, arch_params, s.setup, s.record, 0.0)
    model.eval()
    before = [p.detach().clone() for p in arch_params]
    arch_step(s, random_batch(cfg), world_size=1, loss_fn=nan_loss)
    assert all(torch.equal(a, b) for a, b in zip(before, arch_params)), (
        "a NaN first arch step moved alpha/beta"
    )
    arch_step(s, random_batch(cfg), world_size=1)
    assert not all(torch.equal(a, b) for a, b in zip(before, arch_params))


@pytest.mark.parametrize("bad_in_a_row, aborts", [(1, False), (2, True), (3, True)])
def test_max_bad_steps_aborts_exactly_at_its_limit(bad_in_a_row, aborts):
    """``train.max_bad_steps=2``: one bad step in a row is skipped, two abort (and three)."""
    cfg, model = tiny("model.num_parts=3", "train.max_bad_steps=2")
    s = step_parts(cfg, model, max_bad_steps=cfg.train.max_bad_steps)
    batch = random_batch(cfg)
    for _ in range(bad_in_a_row):
        weight_step(s, batch, nan_loss)
    if aborts:
        with pytest.raises(NonFiniteLossError, match=f"{bad_in_a_row} consecutive"):
            s.record.read(step=bad_in_a_row, lr=1e-3, world_size=1)
    else:
        s.record.read(step=bad_in_a_row, lr=1e-3, world_size=1)
        before = snapshot(s)
        weight_step(s, batch)
        assert not all(torch.equal(a, b) for a, b in zip(before, snapshot(s)))


def _run_cfg(tmp_path_factory, out):
    from pnfs.config import load_config
    from tests.support.engine import TINY_OVERRIDES, tiny_dataset

    data = tiny_dataset(tmp_path_factory)
    return load_config(
        None,
        [
            *TINY_OVERRIDES,
            *data["overrides"],
            "train.epochs=1",
            "train.max_steps_per_epoch=2",
            f"train.out_dir={out}",
        ],
    )


def test_resume_auto_in_a_run_folder_without_checkpoints_is_the_fresh_run(tmp_path_factory, tmp_path):
    """The first launch of a job script that always passes ``--resume auto``: nothing to resume,
    so it starts at step 0 and ends with the weights of a run started without it."""
    from pnfs.engine.trainer import run_training

    fresh = run_training(_run_cfg(tmp_path_factory, tmp_path / "fresh"))
    (tmp_path / "auto" / "checkpoints").mkdir(parents=True)  # the folder exists, empty
    auto = run_training(_run_cfg(tmp_path_factory, tmp_path / "auto"), resume="auto")
    assert auto["global_step"] == fresh["global_step"] == 2
    assert auto["weights_sha256"] == fresh["weights_sha256"]


def test_resume_from_a_missing_file_stops_before_any_step_and_names_it(tmp_path_factory, tmp_path):
    from pnfs.engine.checkpoint import CheckpointError
    from pnfs.engine.trainer import run_training

    missing = tmp_path / "run" / "checkpoints" / "step-00000004.pt"
    with pytest.raises(CheckpointError, match=r"step-00000004\.pt: no such checkpoint file"):
        run_training(_run_cfg(tmp_path_factory, tmp_path / "run"), resume=str(missing))
    assert not list((tmp_path / "run").rglob("*.pt"))
