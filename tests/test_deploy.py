"""pnfs.deploy.freeze: the frozen model equals the training model in eval mode on every preset."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pnfs.config import CONFIG_DIR, load_config
from pnfs.deploy import count_ops, fold_conv_bn, freeze, output_change
from pnfs.model import build_model

# freeze folds PoseNFS's BN/alpha/beta; Table VI's baselines (model.name != pnfs) are not frozen
PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if load_config(p).model.name == "pnfs")


def trained_looking(cfg, images: torch.Tensor, seed: int = 0) -> nn.Module:
    """A model whose alpha/beta and BatchNorm statistics are not the identity-like defaults."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    for a in model.arch_parameters():
        a.data.normal_(0.0, 1.0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            if m.weight is not None:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0.0, 0.1)
    model.eval()
    # head vectors of std ~0.3, so the scores spread over [0, 1) instead of sitting at 0 or 1
    outputs = []
    hooks = [p.head.conv.register_forward_hook(lambda m, i, o: outputs.append(o)) for p in model.parts]
    with torch.no_grad():
        model(images)
    for hook, part, out in zip(hooks, model.parts, outputs):
        hook.remove()
        part.head.conv.weight.data *= 0.3 / out.std()
        part.head.conv.bias.data *= 0.3 / out.std()
    return model


@pytest.mark.parametrize("preset", PRESETS)
def test_frozen_model_equals_the_eval_mode_model(preset):
    cfg = load_config(preset, ["data.input_size=[64,64]"])
    images = torch.randn(2, 3, 64, 64)
    model = trained_looking(cfg, images)
    with torch.no_grad():
        expected = model(images)
    frozen = freeze(model)
    got = frozen(images.contiguous(memory_format=torch.channels_last))
    assert expected.std() > 0.05  # a test on all-zero scores would prove nothing
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen.training
    convs = [m.weight for m in frozen.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert frozen.arch_parameters() == []  # alpha and beta are folded away
    assert count_ops(frozen) == count_ops(model)  # only zero was dropped (it is never built)


def test_freeze_leaves_the_training_model_alone():
    cfg = load_config("demo", ["data.input_size=[64,64]"])
    model = trained_looking(cfg, torch.randn(1, 3, 64, 64)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    freeze(model)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_pruning_drops_weak_ops_and_reports_the_change():
    cfg = load_config("demo", ["data.input_size=[64,64]"])
    images = torch.randn(2, 3, 64, 64)
    model = trained_looking(cfg, images)
    exact = freeze(model)
    pruned = freeze(model, prune_below=0.3)
    assert count_ops(pruned) < count_ops(exact)
    assert output_change(model, exact, images)["max_abs"] < 1e-4
    change = output_change(model, pruned, images)
    assert change["max_abs"] > 1e-4 and set(change) == {"max_abs", "mean_abs", "argmax_moved"}
    # every edge keeps its strongest op: even a threshold above every weight leaves a working model
    assert torch.isfinite(freeze(model, prune_below=0.99)(images)).all()


def test_prune_threshold_out_of_range_is_named():
    model = build_model(load_config("demo", ["data.input_size=[64,64]"]))
    with pytest.raises(ValueError, match="prune-below"):
        freeze(model, prune_below=1.5)


def test_eval_amp_uses_bf16_only_where_the_device_has_it(monkeypatch):
    from pnfs import inference

    monkeypatch.setattr(inference, "bf16_supported", lambda device: True)
    assert inference.inference_amp("auto", "cuda")[0] == torch.bfloat16
    assert inference.inference_amp("bf16", "cpu")[0] == torch.bfloat16  # asked for by name
    dtype, line = inference.inference_amp("auto", "cpu")  # the CPU default is float32
    assert dtype is None and "float32 on cpu" in line
    assert inference.inference_amp("none", "cpu") == (None, "inference: float32 on cpu (eval.amp=none)")
    monkeypatch.setattr(inference, "bf16_supported", lambda device: False)
    dtype, line = inference.inference_amp("bf16", "cpu")
    assert dtype is None and "fell back to float32" in line
    with pytest.raises(ValueError, match=r"eval\.amp"):
        inference.inference_amp("fp8", "cpu")


def test_frozen_bf16_scores_stay_close_to_float32():
    cfg = load_config("demo", ["data.input_size=[64,64]"])
    images = torch.randn(2, 3, 64, 64)
    frozen = freeze(trained_looking(cfg, images))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = frozen(images).float()
    assert (low - frozen(images)).abs().max() < 0.05


def test_a_batched_model_freezes_to_what_its_per_part_layout_freezes_to():
    """model.batched_parts=true (the CUDA default under auto) must freeze and export like per part."""
    cfg = load_config("demo", ["data.input_size=[64,64]", "model.batched_parts=false"])
    images = torch.randn(2, 3, 64, 64)
    per_part = trained_looking(cfg, images)
    batched = per_part.with_part_layout(True)
    assert batched.batched_parts
    frozen = freeze(batched)
    expected = freeze(per_part)(images)
    torch.testing.assert_close(frozen(images), expected, rtol=0, atol=1e-5)
    assert count_ops(frozen) == count_ops(per_part)


def test_a_batchnorm_without_running_statistics_is_refused_by_name():
    """Eval-mode BN folding reads running_mean/var; BatchNorm2d(track_running_stats=False) has none."""
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match=r"freeze: BatchNorm2d\(4.*keeps no running statistics"):
        fold_conv_bn(conv, bn)
