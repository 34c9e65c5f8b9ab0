"""Table VI's baselines (SimpleBaseline-ResNet-50, HRNet-W32; d = 1 and d = 8): the presets
build, take one step of the engine's weight step, have the paper's sizes, load the ImageNet
checkpoints' key layout, and the strategies train them without alpha/beta."""

from __future__ import annotations

import pytest
import torch

from pnfs.config import ConfigError, load_config
from pnfs.data.targets import gaussian_targets
from pnfs.deploy import freeze
from pnfs.engine.step import weight_step
from pnfs.engine.strategies import build_optimizers
from pnfs.engine.trainer import run_training
from pnfs.kernels import squash_score
from pnfs.loss import batch_loss, loss_setup, pose_loss
from pnfs.model import BaselinePoseNet, build_model
from pnfs.model.backbones import fit_backbone_state
from pnfs.summary import paper_counts
from tests.engine.test_step import random_batch, step_parts
from tests.support.engine import TINY_OVERRIDES, tiny_dataset

# Table VI of the paper (MPII, 256x256): #Params, #Madds (FLOPs)
TABLE_VI = {
    "mpii_simplebaseline_r50_256": (34.0, 12.0),  # SimpleBaseline [55]
    "mpii_simplebaseline_r50_vec8_256": (34.0, 12.1),  # + vector(8-dim)
    "mpii_hrnetw32_256": (28.5, 9.5),  # HRNet [47]
    "mpii_hrnetw32_vec8_256": (28.5, 9.6),  # + vector(8-dim)
}
SMALL = ["data.input_size=[64,64]", "model.backbone.weights=none", "train.device=cpu"]


@pytest.mark.parametrize("preset", sorted(TABLE_VI))
def test_counts_are_within_1_5_percent_of_table_vi(preset):
    """The paper's convention (pnfs.summary): Conv/BN parameters, conv multiply-adds / 1024^3."""
    cfg = load_config(preset)
    params, macs = paper_counts(build_model(cfg).eval(), torch.randn(1, 3, *cfg.data.input_size))
    paper_params, paper_gmacs = TABLE_VI[preset]
    assert abs(params / 1e6 - paper_params) <= 0.015 * paper_params, f"{params / 1e6:.3f}M"
    assert abs(macs / 1024**3 - paper_gmacs) <= 0.015 * paper_gmacs, f"{macs / 1024**3:.3f}G"


@pytest.mark.parametrize("preset", sorted(TABLE_VI))
def test_one_engine_step_trains_every_parameter(preset):
    cfg = load_config(preset, SMALL)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, BaselinePoseNet) and model.arch_parameters() == []
    s = step_parts(cfg, model)
    assert len(s.params) == len(list(model.parameters()))  # sync: every weight, nothing else
    before = [p.detach().clone() for p in model.parameters()]
    weight_step(s, random_batch(cfg, n=2))
    loss = s.record.read(step=1, lr=cfg.train.lr, world_size=1)
    assert loss == loss and loss > 0
    unmoved = [n for (n, p), b in zip(model.named_parameters(), before) if torch.equal(p, b)]
    assert unmoved == []


@pytest.mark.parametrize("d", [1, 8])
def test_heatmap_and_vector_heads(d):
    """d = 1: raw heatmaps and the MSE on them (as published); d = 8: squashed scores, and the
    fused loss on the vectors equals the loss on the scores."""
    cfg = load_config("mpii_simplebaseline_r50_256", [*SMALL, f"model.vector_dim={d}"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = random_batch(cfg, n=2)
    with torch.no_grad():
        raw = model.head.vectors(model.neck(model.backbone(batch.image)[-1]))
        out = model(batch.image)
        loss = batch_loss(model, batch, loss_setup(model, cfg.data.sigma, torch.device("cpu"), None, False))
    assert raw.shape == (2, 16 * d, 16, 16) and out.shape == (2, 16, 16, 16)
    targets, weights = gaussian_targets(batch.keypoints, (16, 16), cfg.data.sigma)
    if d == 1:
        assert model.vector_joints is None and torch.equal(out, raw) and float(out.min()) < 0
        with pytest.raises(ValueError, match="vector_dim > 1"):
            model(batch.image, vectors=True)
    else:
        torch.testing.assert_close(out, squash_score(raw, d))
        assert torch.equal(model(batch.image, vectors=True), raw)
    torch.testing.assert_close(loss, pose_loss(out, targets, weights), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("preset", ["mpii_simplebaseline_r50_256", "mpii_hrnetw32_256"])
def test_the_trunk_takes_the_full_imagenet_checkpoint_layout(preset):
    """model.backbone.weights: the torchvision / timm classification state dict fits the trunk
    exactly (the blocks we do not build are skipped, nothing else is missing)."""
    import timm
    from torchvision.models import resnet50

    cfg = load_config(preset, SMALL)
    model = build_model(cfg)
    full = resnet50() if cfg.model.backbone.name == "resnet50" else timm.create_model("hrnet_w32")
    state = {k: v + 1 for k, v in full.state_dict().items()}
    fit_backbone_state(model.backbone, state, "test")
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], state[k]) for k in own if not k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("preset", ["mpii_simplebaseline_r50_vec8_256", "mpii_hrnetw32_256"])
def test_frozen_baseline_equals_the_eval_mode_model(preset):
    """pnfs.deploy.freeze (predict/export): every BN folded, the deconvolutions' included."""
    cfg = load_config(preset, SMALL)
    torch.manual_seed(0)
    model = build_model(cfg)
    for m in model.modules():  # BN statistics and affine parameters away from the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0.0, 0.1)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.eval()(images)
    frozen = freeze(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    assert expected.std() > 0.01
    # float32 rounding relative to the output's scale (an untrained HRNet's heatmaps reach ~1e7)
    assert (frozen(images) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_darts1_is_refused_and_sync_random_train_the_weights():
    for strategy in ("sync", "random"):
        cfg = load_config("mpii_hrnetw32_256", [*SMALL, f"search.strategy={strategy}"])
        model = build_model(cfg)
        opts = build_optimizers(model, cfg)
        assert opts.arch is None and len(opts.weights.param_groups[0]["params"]) == len(
            list(model.parameters())
        )
    cfg = load_config("mpii_hrnetw32_256", [*SMALL, "search.strategy=darts1"])
    with pytest.raises(ConfigError, match=r"'darts1'.*model\.name 'hrnet_w32' has none"):
        build_optimizers(build_model(cfg), cfg)


def test_a_baseline_trains_with_the_default_strategy(tmp_path, tmp_path_factory):
    """The whole engine: run_training on tiny COCO-format shards, evaluated (COCO AP), no
    architecture export."""
    data = tiny_dataset(tmp_path_factory)
    baseline = [
        "model.name=simplebaseline_resnet50",
        "model.backbone.name=resnet50",
        "model.backbone.weights=none",
    ]
    cfg = load_config(
        None,
        [*TINY_OVERRIDES, *data["overrides"], *baseline, "train.epochs=1", "train.max_steps_per_epoch=2",
         "train.eval_every=1", f"train.out_dir={tmp_path / 'run'}"],
    )  # fmt: skip
    result = run_training(cfg)
    assert result["global_step"] == 2 and result["skipped_steps"] == 0
    assert 0 <= result["metrics"]["AP"] <= 1
    log = (tmp_path / "run" / "train.log").read_text()
    assert "model.name 'simplebaseline_resnet50' has no alpha/beta" in log
    assert not (tmp_path / "run" / "architecture").exists()


def test_a_baseline_needs_its_own_trunk():
    with pytest.raises(ConfigError, match=r"model\.backbone\.name: 'mobilenetv2' is not the trunk"):
        load_config("mpii_hrnetw32_256", ["model.backbone.name=mobilenetv2"])


def test_a_checkpoint_of_the_other_head_is_refused_naming_the_baseline(tmp_path):
    """A d=1 SimpleBaseline checkpoint read with a d=8 config: the error names the model and
    d (a baseline has no P or C to report)."""
    from pnfs.evaluate.loading import load_for_inference

    cfg = load_config("mpii_simplebaseline_r50_256", SMALL)
    path = tmp_path / "sb.pt"
    torch.save(build_model(cfg).state_dict(), path)
    with pytest.raises(ValueError, match=r"\(simplebaseline_resnet50, d=8\): size mismatch for head") as err:
        load_for_inference(path, "mpii_simplebaseline_r50_256", [*SMALL, "model.vector_dim=8"])
    assert "P=" not in str(err.value) and str(path) in str(err.value)
