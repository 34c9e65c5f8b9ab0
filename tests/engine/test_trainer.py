"""A run stopped at step k and resumed ends bitwise where the uninterrupted run ends; the NaN guard."""

from __future__ import annotations

import json

import pytest
import torch

import pnfs.engine.trainer as trainer_module
from pnfs.config import load_config
from pnfs.engine import checkpoint as ckpt
from pnfs.engine.guard import NonFiniteLossError
from pnfs.engine.trainer import run_training
from tests.support.engine import TINY_OVERRIDES, tiny_dataset


def config(tmp_path_factory, out_dir, *extra: str):
    data = tiny_dataset(tmp_path_factory)
    return load_config(
        None,
        [
            *TINY_OVERRIDES,
            *data["overrides"],
            "train.epochs=2",
            "train.max_steps_per_epoch=6",
            "train.lr_milestones=[1]",  # the lr changes between the epochs
            "data.num_workers=1",
            f"train.out_dir={out_dir}",
            *extra,
        ],
    )


def test_stop_at_step_k_and_resume_equals_the_uninterrupted_run(tmp_path, tmp_path_factory):
    whole = run_training(config(tmp_path_factory, tmp_path / "whole"))
    assert whole["global_step"] == 12 and not whole["stopped"]

    split_dir = tmp_path / "split"
    first = run_training(config(tmp_path_factory, split_dir, "train.stop_at_step=4"))
    assert first["stopped"] and first["global_step"] == 4
    assert first["weights_sha256"] != whole["weights_sha256"]
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(split_dir / "checkpoints"))
    assert saved["position"] == {
        "epoch": 0,
        "samples_seen": 16,
        "global_step": 4,
        "arch_epoch": 0,
        "arch_samples_seen": 0,
    }
    torch.manual_seed(12345)  # the resumed run must not depend on the caller's RNG state
    second = run_training(config(tmp_path_factory, split_dir), resume="auto")
    assert second["global_step"] == 12 and not second["stopped"]
    assert second["weights_sha256"] == whole["weights_sha256"]
    assert json.loads((split_dir / "result.json").read_text())["weights_sha256"] == whole["weights_sha256"]


def test_non_finite_losses_are_skipped_then_abort(tmp_path, tmp_path_factory, monkeypatch):
    real_loss = trainer_module.pose_loss
    calls = {"n": 0}

    def nan_on_second_call(scores, targets, weights):
        calls["n"] += 1
        loss = real_loss(scores, targets, weights)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(trainer_module, "pose_loss", nan_on_second_call)
    result = run_training(
        config(tmp_path_factory, tmp_path / "once", "train.epochs=1", "train.max_steps_per_epoch=4")
    )
    assert result["skipped_steps"] == 1 and result["global_step"] == 4

    monkeypatch.setattr(trainer_module, "pose_loss", lambda s, t, w: real_loss(s, t, w) * float("inf"))
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        run_training(config(tmp_path_factory, tmp_path / "always", "train.max_bad_steps=3"))
