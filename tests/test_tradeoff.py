"""python -m pnfs.tradeoff: one point per run folder (config.yaml + best score), paper points alongside."""

from __future__ import annotations

import json

import cv2
import pytest

from pnfs.config import dump_config, load_config
from pnfs.summary import summarize
from pnfs.tradeoff import PAPER_POINTS, main

TINY_MODEL = [
    "data.dataset=mpii",
    "data.input_size=[64,64]",
    "model.backbone.name=fabric",
    "model.backbone.fabric_channels=2",
    "model.backbone.fabric_layers=3",
    "model.vector_dim=2",
]


def fake_run(root, preset, channels, *, best=None, last=None):
    """A run folder as the trainer leaves it: config.yaml, result.json and/or eval/metrics.json."""
    run_dir = root / preset
    cfg = load_config(None, [*TINY_MODEL, f"model.channels={channels}", f"train.out_dir=runs/{preset}"])
    (run_dir / "eval").mkdir(parents=True)
    dump_config(cfg, run_dir / "config.yaml")
    if best is not None:
        (run_dir / "result.json").write_text(json.dumps({"global_step": 10, "best_score": best}))
    if last is not None:
        (run_dir / "eval" / "metrics.json").write_text(json.dumps({"PCKh": last, "score": last}))
    return run_dir, cfg


def test_two_runs_make_a_plot_with_their_costs_and_the_paper_points(tmp_path, capsys):
    small, small_cfg = fake_run(tmp_path, "mpii_mobilenetv2_p3_256", 2, best=71.5, last=70.0)
    large, _ = fake_run(tmp_path, "my_wider_run", 4, last=74.0)
    out = tmp_path / "tradeoff.png"
    assert main([str(small), str(large), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    runs = {r["preset"]: r for r in report["runs"]}
    assert runs["mpii_mobilenetv2_p3_256"]["value"] == 71.5  # the best score, not the last
    assert runs["my_wider_run"]["value"] == 74.0
    assert runs["mpii_mobilenetv2_p3_256"]["metric"] == "PCKh@0.5"
    assert runs["mpii_mobilenetv2_p3_256"]["gmacs"] == pytest.approx(summarize(small_cfg)["paper_gmacs"])
    assert runs["my_wider_run"]["gmacs"] > runs["mpii_mobilenetv2_p3_256"]["gmacs"]
    assert report["paper"] == {
        "mpii_mobilenetv2_p3_256": {
            "metric": "PCKh@0.5",
            "value": 87.0,
            "gmacs": 1.2,
            "source": "Table II / VI (d=8)",
        }
    }
    image = cv2.imread(str(out))
    assert image is not None and image.shape[0] > 100 and image.std() > 0


def test_paper_points_are_for_shipped_or_issue_presets():
    assert PAPER_POINTS["coco_resnet50_p3_384x288"].value == 0.709
    assert PAPER_POINTS["mpii_hrnetw32_256"].gmacs == 9.5


def test_a_folder_without_config_or_score_is_named(tmp_path, capsys):
    assert main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    run_dir, _ = fake_run(tmp_path, "no_score", 2)
    assert main([str(run_dir), "--out", str(tmp_path / "x.png")]) == 2
    assert "no finite score" in capsys.readouterr().err
