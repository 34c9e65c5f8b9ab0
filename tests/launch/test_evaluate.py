"""launch/evaluate.py: shards or detector boxes, checkpoint formats, torchrun with 2 processes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pnfs.config import config_to_dict, load_config
from pnfs.model import build_model
from tests.evaluate.test_runner import pycocotools_stats

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("pnfs_launch_evaluate", REPO / "launch" / "evaluate.py")
evaluate_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate_cli)


@pytest.fixture(scope="module")
def coco_shards(shared_data, tmp_path_factory) -> Path:
    root = shared_data / "coco_sample"
    out = tmp_path_factory.mktemp("coco") / "shards"
    subprocess.run(
        [sys.executable, str(REPO / "data_prep" / "shard_coco.py"), "--images", str(root), "--annotations",
         str(root / "test_coco.json"), "--out", str(out), "--split", "val", "--shard-size", "5",
         "--no-progress"],
        check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    cfg = load_config("demo", ["data.num_workers=0", "eval.batch_size=4"])
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"model": build_model(cfg).state_dict(), "config": config_to_dict(cfg)}, path)
    return path


def _common(shared_data, checkpoint):
    gt = shared_data / "coco_sample" / "test_coco.json"
    return ["--checkpoint", str(checkpoint), "--annotations", str(gt), "--device", "cpu"]


def test_shards_with_ground_truth_boxes(shared_data, coco_shards, checkpoint, tmp_path, capsys):
    args = [*_common(shared_data, checkpoint), "--data", str(coco_shards), "--out", str(tmp_path)]
    assert evaluate_cli.main(args) == 0
    printed = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == printed and saved["num_samples"] == 12
    # the printed metrics are pycocotools' own numbers for the results it wrote (that the
    # checkpoint's weights were used is shown with a trained one in engine/test_checkpoint_known.py)
    recomputed = pycocotools_stats(shared_data / "coco_sample" / "test_coco.json", tmp_path / "results.json")
    assert {k: saved[k] for k in recomputed} == pytest.approx(recomputed, abs=1e-12)
    assert saved["score"] == saved["AP"]
    assert len(json.loads((tmp_path / "results.json").read_text())) >= 4  # OKS-NMS may merge duplicates
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 8
    assert not (tmp_path / "images").exists()  # originals are drawn on only when --images is given


def test_detector_boxes_on_the_original_images(shared_data, checkpoint, tmp_path, capsys):
    root = shared_data / "coco_sample"
    dets = root / "test_coco_det_AP_H_56.json"
    args = [*_common(shared_data, checkpoint), "--detections", str(dets), "--out", str(tmp_path)]
    assert evaluate_cli.main([*args, "--images", str(root), "eval.det_score_threshold=0.5", "--no-flip"]) == 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    kept = sum(d["score"] >= 0.5 for d in json.loads(dets.read_text()))
    assert saved["num_samples"] == kept
    drawn = {p.name for p in (tmp_path / "images").glob("*.png")}
    assert drawn == {"785.png", "40083.png", "196141.png", "197388.png"}
    import cv2

    picture, original = (
        cv2.imread(str(tmp_path / "images" / "785.png")),
        cv2.imread(str(root / "000000000785.jpg")),
    )
    assert picture.shape == original.shape and (picture != original).any()
    capsys.readouterr()
    assert evaluate_cli.main(args) == 2
    assert "--images" in capsys.readouterr().err


def test_missing_shards_and_bad_checkpoints_are_clear_errors(shared_data, checkpoint, tmp_path, capsys):
    assert (
        evaluate_cli.main(_common(shared_data, checkpoint)) == 2
    )  # the demo preset's shards do not exist here
    assert "error:" in capsys.readouterr().err
    bare = tmp_path / "bare.pt"
    torch.save(build_model(load_config("demo")).state_dict(), bare)
    assert evaluate_cli.main(["--checkpoint", str(bare)]) == 2
    assert "give --config" in capsys.readouterr().err


def test_a_shard_pattern_that_matches_nothing_is_named_and_nothing_said_about_training(
    shared_data, coco_shards, checkpoint, capsys
):
    pattern = str(coco_shards.parent / "val-*.tar")  # the shards are one folder down
    assert evaluate_cli.main([*_common(shared_data, checkpoint), "--data", pattern]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err
    assert f"no file matches the pattern {pattern}" in err and "shards/val-000000.tar" in err
    assert "nothing was evaluated" in err and "trained" not in err


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_torchrun_two_processes_equal_one(shared_data, coco_shards, checkpoint, tmp_path):
    common = [*_common(shared_data, checkpoint), "--data", str(coco_shards)]
    assert evaluate_cli.main([*common, "--out", str(tmp_path / "np1")]) == 0
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "launch" / "evaluate.py"), *common, "--out", str(tmp_path / "np2")],
        capture_output=True, text=True, timeout=200, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((tmp_path / "np1" / "metrics.json").read_text())
    two = json.loads((tmp_path / "np2" / "metrics.json").read_text())
    assert one["num_samples"] == two["num_samples"] == 12
    assert one.keys() == two.keys()
    for key, value in one.items():  # a real model: batch composition may move the last float bits
        assert two[key] == pytest.approx(value, abs=1e-9), key
