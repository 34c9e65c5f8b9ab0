"""Every preset builds, predicts [N, K, H/4, W/4] scores, trains every parameter, and the
paper's presets have the paper's sizes (its counting convention, see pnfs.summary)."""

from __future__ import annotations

import pytest
import torch

from pnfs.config import CONFIG_DIR, SUBNETWORK_OPS, load_config
from pnfs.model import build_model
from pnfs.summary import fvcore_macs, paper_counts

PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
# the PoseNFS presets; Table VI's baselines (no parts, no alpha/beta) are tests/model/test_baseline.py's
PNFS_PRESETS = [p for p in PRESETS if load_config(p).model.name == "pnfs"]


def test_the_issue_presets_exist():
    assert set(PRESETS) == {
        "mpii_mobilenetv2_p3_256", "mpii_mobilenetv2_p3_h2_384", "coco_mobilenetv2_p3_384x288",
        "coco_resnet50_p3_384x288", "mpii_hrnetw32_p3_h2_c12_256", "mpii_hrnetw32_p5_c16_256",
        "mpii_fabric1_p3_256", "mpii_fabric2_p3_256", "mpii_fabric3_p3_256", "demo",
        "mpii_simplebaseline_r50_256", "mpii_simplebaseline_r50_vec8_256", "mpii_hrnetw32_256",
        "mpii_hrnetw32_vec8_256", "crowdpose_mobilenetv2_p3_256x192",
    }  # fmt: skip
    assert set(PRESETS) - set(PNFS_PRESETS) == {
        "mpii_simplebaseline_r50_256", "mpii_simplebaseline_r50_vec8_256", "mpii_hrnetw32_256",
        "mpii_hrnetw32_vec8_256",
    }  # fmt: skip


def test_the_crowdpose_preset_is_the_mobilenetv2_p3_search_on_crowdpose_joints():
    cfg, base = load_config("crowdpose_mobilenetv2_p3_256x192"), load_config("mpii_mobilenetv2_p3_256")
    assert cfg.model == base.model and cfg.search == base.search
    assert cfg.joints.name == "crowdpose" and cfg.data.input_size == [256, 192]
    assert cfg.part_names == ("head", "upper_limb", "lower_limb")
    assert sorted(j for p in cfg.parts for j in p) == list(range(14))  # each of the 14 joints once


@pytest.mark.parametrize("preset", PNFS_PRESETS)
def test_preset_forward_backward_reaches_every_parameter(preset):
    cfg = load_config(preset)
    assert cfg.model.ops == SUBNETWORK_OPS
    tiny = [64, 32] if cfg.data.dataset == "coco" else [64, 64]  # the network at a tiny input
    model = build_model(load_config(preset, [f"data.input_size={tiny}"]))
    scores = model(torch.randn(2, 3, *tiny))
    values = scores.detach()
    assert scores.shape == (2, cfg.num_joints, tiny[0] // 4, tiny[1] // 4)
    assert float(values.min()) >= 0 and float(values.max()) < 1
    scores.square().sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert no_grad == []


@pytest.mark.parametrize("preset", PNFS_PRESETS)
def test_preset_architecture_parameter_counts(preset):
    cfg = load_config(preset)
    model = build_model(cfg)
    m, b = cfg.model, cfg.model.backbone
    edges = m.hidden_nodes * (m.hidden_nodes + 1) // 2
    assert len(model.parts) == len(cfg.parts)
    for part in model.parts:
        assert part.fabric.alpha.shape == (edges, len(m.ops))
        assert len(part.fabric.cells) == 6
        assert all(cell.beta.shape == (3,) for cell in part.fabric.cells.values())
    expected = len(cfg.parts) * (edges * len(m.ops) + 6 * 3)
    if b.name == "fabric":
        cells = sum(min(layer + 2, 4) for layer in range(b.fabric_layers))
        assert len(model.backbone.fabric.cells) == cells
        assert b.fabric_layers != 4 or cells == 13
        backbone_edges = b.fabric_hidden_nodes * (b.fabric_hidden_nodes + 1) // 2
        assert model.backbone.fabric.alpha.shape == (backbone_edges, 6)
        # every cell has a beta but the first layer's 1/4 cell, which reads the stem alone
        assert sum(c.beta is not None for c in model.backbone.fabric.cells.values()) == cells - 1
        expected += backbone_edges * 6 + (cells - 1) * 3
    assert sum(p.numel() for p in model.arch_parameters()) == expected


# (preset, paper params in M, paper GMadds or None, where the paper gives them)
PAPER_SIZES = [
    ("mpii_mobilenetv2_p3_256", 3.3, 1.2, "Tables II and VI"),
    ("mpii_mobilenetv2_p3_h2_384", 5.2, 4.6, "Table IV"),
    ("coco_mobilenetv2_p3_384x288", 6.1, 4.0, "Table VII Ours-1"),
    ("coco_resnet50_p3_384x288", 27.5, None, "Table VII Ours-2"),
    ("mpii_hrnetw32_p5_c16_256", 16.4, 9.4, "Table V Ours-b, text of §IV-B"),
    ("mpii_hrnetw32_p3_h2_c12_256", 8.8 + 4.8, None, "Table V Ours-a"),
    ("mpii_fabric1_p3_256", 5.8, None, "§IV-A Fabric-1"),
    ("mpii_fabric2_p3_256", 6.8, None, "§IV-A Fabric-2"),
    ("mpii_fabric3_p3_256", 10.5, None, "§IV-A Fabric-3"),
]


def _close(ours: float, paper: float, printed_unit: float = 0.1) -> bool:
    """Within 2%, or within the rounding of the paper's printed figure (1.2 means 1.15..1.25)."""
    return abs(ours - paper) <= max(0.02 * paper, printed_unit / 2)


@pytest.mark.parametrize(("preset", "params", "gmacs", "source"), PAPER_SIZES)
def test_paper_convention_matches_the_paper(preset, params, gmacs, source):
    cfg = load_config(preset)
    model = build_model(cfg).eval()
    ours_params, ours_macs = paper_counts(model, torch.randn(1, 3, *cfg.data.input_size))
    assert _close(ours_params / 1e6, params), f"{source}: {ours_params / 1e6:.3f}M vs {params}M"
    if gmacs is not None:
        assert _close(ours_macs / 1024**3, gmacs), f"{source}: {ours_macs / 1024**3:.3f}G vs {gmacs}G"


@pytest.mark.xfail(
    strict=True,
    reason="no single convention fits every row: conv multiply-adds / 1024^3 match Tables II, IV, V-b and "
    "VII Ours-1 (1.164, 4.586, 9.381, 4.032G: within 2% or the printed rounding) but give 10.56G for "
    "Table VII Ours-2 (11.4G, -7.4%); "
    "11.4G fits a division by 1e9 (conv 11.34G, fvcore total 11.41G), which misses the other rows by 4-10%",
)
def test_resnet50_gmacs_match_table_vii():
    cfg = load_config("coco_resnet50_p3_384x288")
    _, macs = paper_counts(build_model(cfg).eval(), torch.randn(1, 3, *cfg.data.input_size))
    assert _close(macs / 1024**3, 11.4)


@pytest.mark.slow
def test_resnet50_row_matches_standard_counting():
    """Table VII Ours-2 fits plain parameters (27.46M) and fvcore's total / 1e9 (11.41G)."""
    cfg = load_config("coco_resnet50_p3_384x288")
    model = build_model(cfg).eval()
    assert _close(sum(p.numel() for p in model.parameters()) / 1e6, 27.5)
    assert _close(fvcore_macs(model, torch.randn(1, 3, *cfg.data.input_size)) / 1e9, 11.4)


@pytest.mark.parametrize(
    ("preset", "params"), [("mpii_mobilenetv2_p3_256", 1.3), ("coco_resnet50_p3_384x288", 23.5)]
)
def test_backbone_sizes_match_the_paper(preset, params):
    """Plain parameter counts of the backbones as §IV-A lists them. (Table V's 8.8M for HRNet-W32
    stem..stage3 is 28.5M - 19.7M; ours is 8.13M, while the whole Ours-a/-b models match.)"""
    model = build_model(load_config(preset))
    ours = sum(p.numel() for p in model.backbone.parameters()) / 1e6
    assert _close(ours, params), f"{ours:.3f}M vs {params}M"
