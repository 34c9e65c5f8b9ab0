"""Pure parts of the engine: lr schedule, optimizer construction per strategy, NaN guard, export."""

from __future__ import annotations

import json

import pytest
import torch

from pnfs.config import ConfigError, load_config
from pnfs.engine.architecture import architecture_entropies, export_architecture
from pnfs.engine.guard import NonFiniteGuard, NonFiniteLossError
from pnfs.engine.schedule import learning_rate
from pnfs.engine.strategies import build_optimizers, describe_optimizers, prepare_architecture, split_shards
from pnfs.model import build_model
from tests.support.engine import TINY_OVERRIDES


def tiny(strategy: str = "sync", *extra: str):
    cfg = load_config(None, [*TINY_OVERRIDES, f"search.strategy={strategy}", *extra])
    torch.manual_seed(0)
    model = build_model(cfg)
    prepare_architecture(model, cfg)
    return cfg, model


def ids(params) -> set[int]:
    return {id(p) for p in params}


def optimizer_ids(opt) -> set[int]:
    return {id(p) for g in opt.param_groups for p in g["params"]}


def test_paper_schedule_decays_by_a_quarter_at_90_120_150():
    lr = [learning_rate(e, 1e-3, [90, 120, 150], 0.25) for e in (0, 89, 90, 119, 120, 150, 199)]
    assert lr == pytest.approx([1e-3, 1e-3, 2.5e-4, 2.5e-4, 6.25e-5, 1.5625e-5, 1.5625e-5])


def test_sync_puts_alpha_beta_into_the_weight_adam():
    cfg, model = tiny("sync")
    opts = build_optimizers(model, cfg)
    assert opts.arch is None
    assert ids(model.arch_parameters()) <= optimizer_ids(opts.weights)
    assert ids(model.weight_parameters()) <= optimizer_ids(opts.weights)
    assert opts.weights.defaults["lr"] == cfg.train.lr


def test_random_draws_alpha_beta_from_the_seed_and_freezes_them():
    cfg, model = tiny("random", "search.seed=5")
    _, again = tiny("random", "search.seed=5")
    _, other = tiny("random", "search.seed=6")
    opts = build_optimizers(model, cfg)
    arch = model.arch_parameters()
    assert all(not p.requires_grad for p in arch)
    assert not ids(arch) & optimizer_ids(opts.weights) and opts.arch is None
    for a, b in zip(arch, again.arch_parameters()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(arch, other.arch_parameters()))
    values = torch.cat([p.flatten() for p in arch])
    assert values.std() > 0.5 and values.abs().max() > 0.5  # N(0, 1), not the zero init


def test_darts1_keeps_alpha_beta_out_of_the_weight_optimizer():
    cfg, model = tiny("darts1")
    opts = build_optimizers(model, cfg)
    arch = ids(model.arch_parameters())
    assert not arch & optimizer_ids(opts.weights)
    assert optimizer_ids(opts.arch) == arch
    assert opts.arch.defaults["lr"] == pytest.approx(3e-3)
    assert opts.arch.defaults["weight_decay"] == pytest.approx(1e-3)


def test_the_optimizer_line_refuses_a_weight_optimizer_that_breaks_the_strategy():
    cfg, model = tiny("darts1")
    with pytest.raises(RuntimeError, match=r"darts1: \d+ alpha/beta tensors are in the weight optimizer"):
        describe_optimizers(model, cfg, list(model.parameters()))
    line = describe_optimizers(model, cfg, model.weight_parameters())
    assert line.endswith(
        f"alpha/beta excluded (0 tensors); architecture optimizer: {len(model.arch_parameters())} "
        "alpha/beta tensors"
    )
    sync_cfg, sync_model = tiny("sync")
    with pytest.raises(RuntimeError, match="sync: only 0 of"):
        describe_optimizers(sync_model, sync_cfg, sync_model.weight_parameters())
    assert "alpha/beta included" in describe_optimizers(sync_model, sync_cfg, list(sync_model.parameters()))


def test_darts1_split_holds_out_every_third_shard():
    shards = [f"s{i}" for i in range(7)]
    weights, arch = split_shards(shards, [2, 1])
    assert weights == ["s0", "s1", "s3", "s4", "s6"] and arch == ["s2", "s5"]
    with pytest.raises(ConfigError, match="arch_split"):
        split_shards(["a", "b"], [2, 1])


def test_guard_skips_then_aborts_after_max_consecutive_bad_steps():
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.check(True, step=0, what="w", loss=1.0, lr=1e-3)
    assert not guard.check(False, step=1, what="w", loss=float("nan"), lr=1e-3)
    assert guard.check(True, step=2, what="w", loss=1.0, lr=1e-3)  # the streak resets
    assert not guard.check(False, step=3, what="w", loss=float("inf"), lr=1e-3)
    assert not guard.check(False, step=4, what="w", loss=float("inf"), lr=1e-3)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        guard.check(False, step=5, what="weight step", loss=float("nan"), lr=1e-3)
    assert guard.total == 4


def test_architecture_export_writes_json_and_png(tmp_path):
    cfg, model = tiny("random", "search.seed=1")
    arch = model.architecture()
    json_path, png_path = export_architecture(arch, tmp_path, "final", epoch=3)
    saved = json.loads(json_path.read_text())
    assert saved["epoch"] == 3 and len(saved["parts"]) == 3 and saved["backbone"] is not None
    row = saved["parts"][0]["alpha"][0]
    assert sum(row) == pytest.approx(1.0) and len(row) == len(cfg.model.ops)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 10_000
    ent = architecture_entropies(arch)
    assert set(ent) == {
        f"{k}/{p}" for k in ("alpha", "beta") for p in ["head", "upper_limb", "lower_limb", "backbone"]
    }
    _, uniform = tiny("sync")
    assert architecture_entropies(uniform.architecture())["beta/head"] == pytest.approx(
        torch.log(torch.tensor(3.0))
    )
