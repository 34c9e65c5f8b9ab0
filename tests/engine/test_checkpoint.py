"""Checkpoint files: atomic writes, weights_only loading, clear errors, rotation, RNG states."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from pnfs.engine import checkpoint as ckpt


def a_checkpoint(step: int) -> dict:
    return ckpt.new_checkpoint(
        model={"w": torch.full((3,), float(step))},
        optimizers={"weights": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}, "arch": None},
        schedule={"epoch": 0, "lr": 1e-3},
        position={"epoch": 0, "samples_seen": 8 * step, "global_step": step},
        rng=[ckpt.capture_rng_state()],
        config={"model": {}},
    )


def test_round_trip_with_weights_only(tmp_path):
    path = ckpt.atomic_save(a_checkpoint(4), ckpt.step_path(tmp_path, 4))
    loaded = ckpt.load_checkpoint(path)
    assert loaded["position"]["global_step"] == 4 and torch.equal(loaded["model"]["w"], torch.full((3,), 4.0))
    assert loaded["version"] and loaded["format"] == ckpt.FORMAT
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # no temp file left behind


def test_truncated_checkpoint_is_a_clear_error_and_the_previous_one_still_loads(tmp_path):
    ckpt.atomic_save(a_checkpoint(2), ckpt.step_path(tmp_path, 2))
    newest = ckpt.atomic_save(a_checkpoint(4), ckpt.step_path(tmp_path, 4))
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    assert ckpt.resolve_resume("auto", tmp_path) == newest
    with pytest.raises(ckpt.CheckpointError, match=r"step-00000004\.pt.*(truncated|corrupt)"):
        ckpt.load_checkpoint(newest)
    previous = ckpt.load_checkpoint(ckpt.step_path(tmp_path, 2))
    assert previous["position"]["global_step"] == 2


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_foreign_files_are_refused_by_name(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, plain)
    with pytest.raises(ckpt.CheckpointError, match=r"plain\.pt is not a pnfs checkpoint"):
        ckpt.load_checkpoint(plain)
    pickled = tmp_path / "object.pt"
    torch.save({"format": ckpt.FORMAT, "thing": ckpt.CheckpointError("x")}, pickled)
    with pytest.raises(ckpt.CheckpointError, match=r"object\.pt"):
        ckpt.load_checkpoint(pickled)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(ckpt.CheckpointError, match=r"notes\.pt"):
        ckpt.load_checkpoint(text)
    with pytest.raises(ckpt.CheckpointError, match="no such"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"format": ckpt.FORMAT}))
    with pytest.raises(ckpt.CheckpointError, match=r"raw\.pt"):
        ckpt.load_checkpoint(raw)


def test_temporaries_of_a_killed_writer_are_removed_and_checkpoints_kept(tmp_path):
    kept = ckpt.atomic_save(a_checkpoint(2), ckpt.step_path(tmp_path, 2))
    stale = tmp_path / ".step-00000004.pt.tmp-4242"
    stale.write_bytes(kept.read_bytes()[:100])
    assert ckpt.remove_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002.pt"]
    assert ckpt.remove_temporaries(tmp_path / "missing") == []


def test_keep_last_and_resume_auto(tmp_path):
    assert ckpt.resolve_resume("auto", tmp_path) is None
    assert ckpt.resolve_resume(None, tmp_path) is None
    for step in (1, 2, 10, 3):
        ckpt.atomic_save(a_checkpoint(step), ckpt.step_path(tmp_path, step))
    removed = ckpt.prune_step_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["step-00000001.pt", "step-00000002.pt"]
    assert [p.name for p in ckpt.list_step_checkpoints(tmp_path)] == ["step-00000003.pt", "step-00000010.pt"]
    assert ckpt.resolve_resume("auto", tmp_path).name == "step-00000010.pt"
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "nope.pt"), tmp_path)


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    torch.randn(5)
    np.random.randn(3)  # leaves a cached gaussian in numpy's legacy state
    state = ckpt.capture_rng_state()
    expected = (torch.randn(4), np.random.randn(4), random.random())
    path = ckpt.atomic_save({"rng": state}, tmp_path / "rng.pt")
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ckpt.restore_rng_state(torch.load(path, weights_only=True)["rng"])
    assert torch.equal(torch.randn(4), expected[0])
    assert np.array_equal(np.random.randn(4), expected[1])
    assert random.random() == expected[2]


def test_each_ranks_batchnorm_statistics_round_trip_through_a_weights_only_file(tmp_path):
    """Under DDP each rank keeps its own running statistics between epochs (no per-forward
    broadcast): a checkpoint holds every rank's, and each goes back to its own rank."""
    torch.manual_seed(0)
    ranks = [torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)) for _ in range(2)]
    for r, model in enumerate(ranks):
        model(torch.randn(2, 3, 8, 8) + r)  # a training forward moves each rank's statistics its own way
    saved = [ckpt.floating_buffers(m) for m in ranks]
    assert set(saved[0]) == {"1.running_mean", "1.running_var"}  # not the integer batch count
    assert not torch.equal(saved[0]["1.running_mean"], saved[1]["1.running_mean"])
    path = ckpt.atomic_save(ckpt.new_checkpoint(rank_buffers=saved), tmp_path / "step-00000001.pt")
    loaded = torch.load(path, weights_only=True)["rank_buffers"]
    fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ckpt.load_buffers(fresh, loaded[1])
    assert torch.equal(fresh[1].running_mean, ranks[1][1].running_mean)
    assert torch.equal(fresh[1].running_var, ranks[1][1].running_var)
