"""Each search strategy trains: sync and darts1 move alpha/beta, random keeps them fixed."""

from __future__ import annotations

import pytest
import torch

from pnfs.config import load_config
from pnfs.engine import checkpoint as ckpt
from pnfs.engine.strategies import prepare_architecture
from pnfs.engine.trainer import run_training
from pnfs.model import build_model
from tests.support.engine import TINY_OVERRIDES, tiny_dataset


def train_one_epoch(tmp_path, tmp_path_factory, strategy: str, *extra: str):
    data = tiny_dataset(tmp_path_factory)
    cfg = load_config(
        None,
        [
            *TINY_OVERRIDES,
            *data["overrides"],
            f"search.strategy={strategy}",
            "train.epochs=1",
            "train.max_steps_per_epoch=3",
            f"train.out_dir={tmp_path / strategy}",
            *extra,
        ],
    )
    result = run_training(cfg)
    final = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / strategy / "checkpoints"))
    torch.manual_seed(cfg.train.seed)
    initial = build_model(cfg)
    prepare_architecture(initial, cfg)
    return initial, final, result


def arch_and_weights(model_state: dict, model) -> tuple[dict, dict]:
    arch_names = {n for n, p in model.named_parameters() if any(p is a for a in model.arch_parameters())}
    weight_names = {n for n, _ in model.named_parameters()} - arch_names
    return {n: model_state[n] for n in arch_names}, {n: model_state[n] for n in weight_names}


@pytest.mark.parametrize("strategy", ["sync", "darts1"])
def test_searching_strategies_move_alpha_and_beta(tmp_path, tmp_path_factory, strategy):
    initial, final, result = train_one_epoch(tmp_path, tmp_path_factory, strategy)
    assert result["global_step"] == 3 and result["skipped_steps"] == 0
    arch_after, weights_after = arch_and_weights(final["model"], initial)
    arch_before, weights_before = arch_and_weights(initial.state_dict(), initial)
    assert all(not torch.equal(arch_after[n], arch_before[n]) for n in arch_after), "every alpha/beta moves"
    assert any(not torch.equal(weights_after[n], weights_before[n]) for n in weights_after)
    if strategy == "darts1":
        # the architecture Adam has state for exactly the alpha/beta tensors; the weight Adam none of them
        n_arch = len(initial.arch_parameters())
        assert len(final["optimizers"]["arch"]["state"]) == n_arch
        weight_group = final["optimizers"]["weights"]["param_groups"][0]["params"]
        n_weights = len([p for p in initial.weight_parameters() if p.requires_grad])
        assert len(weight_group) == n_weights
        log = (tmp_path / strategy / "train.log").read_text()
        assert f"weight optimizer: {n_weights} weight tensors, alpha/beta excluded (0 tensors)" in log


def tensorboard_tags(folder) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = folder.glob("events.out.tfevents.*")
    return set(EventAccumulator(str(events)).Reload().Tags()["scalars"])


def test_random_strategy_keeps_its_drawn_architecture(tmp_path, tmp_path_factory):
    """Also the epoch's evaluation: best checkpoint kept, metric and entropies in TensorBoard."""
    initial, final, result = train_one_epoch(tmp_path, tmp_path_factory, "random", "train.eval_every=1")
    run = tmp_path / "random"
    best = ckpt.load_checkpoint(run / "checkpoints" / ckpt.BEST_FILE)
    assert best["metrics"]["score"] == result["metrics"]["score"] == result["best_score"]
    assert {"train/loss", "train/lr", "train/img_per_s", "val/score"} <= tensorboard_tags(run / "tensorboard")
    parts = ("head", "upper_limb", "lower_limb", "backbone")
    entropies = {f"arch/entropy_{k}/{p}" for k in ("alpha", "beta") for p in parts}
    assert entropies <= tensorboard_tags(run / "tensorboard")
    arch_after, weights_after = arch_and_weights(final["model"], initial)
    arch_before, weights_before = arch_and_weights(initial.state_dict(), initial)
    assert all(torch.equal(arch_after[n], arch_before[n]) for n in arch_after)
    assert any(arch_before[n].abs().max() > 0.3 for n in arch_before)  # drawn from N(0, 1), not zeros
    assert any(not torch.equal(weights_after[n], weights_before[n]) for n in weights_after)
