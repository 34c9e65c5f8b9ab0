"""launch/predict.py on a real photo with a randomly initialised tiny model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pnfs.config import config_to_dict, load_config
from pnfs.model import build_model

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("pnfs_launch_predict", REPO / "launch" / "predict.py")
predict_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(predict_cli)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    cfg = load_config("demo")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"model": build_model(cfg).state_dict(), "config": config_to_dict(cfg)}, path)
    return path


def test_poses_are_drawn_and_written(shared_data, tiny_checkpoint, tmp_path):
    photo = shared_data / "coco_sample" / "000000000785.jpg"
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(REPO / "launch" / "predict.py"), "--checkpoint", str(tiny_checkpoint),
         "--image", str(photo), "--box", "280,40,220,380", "--box", "10,10,100,200", "--out", str(out),
         "--min-score", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    drawn = cv2.imread(str(out / "000000000785_pose.png"))
    original = cv2.imread(str(photo))
    assert drawn is not None and drawn.shape == original.shape
    changed = np.abs(drawn.astype(int) - original.astype(int)).sum(-1) > 30
    assert changed.mean() > 0.001  # skeleton lines and joints, not JPEG noise
    record = json.loads((out / "000000000785_pose.json").read_text())
    assert len(record["people"]) == 2 and len(record["joints"]) == 17
    person = record["people"][0]
    assert person["box"] == [280, 40, 220, 380]
    kp = np.asarray(person["keypoints"])
    assert kp.shape == (17, 3) and np.isfinite(kp).all()
    # back-projected into the person's region (box widened to the input aspect, x1.25)
    assert np.all(
        (kp[:, 0] > 280 - 200) & (kp[:, 0] < 500 + 200) & (kp[:, 1] > 40 - 120) & (kp[:, 1] < 420 + 120)
    )


def test_whole_image_is_one_box_and_bare_state_dicts_need_a_config(shared_data, tmp_path, capsys):
    cfg = load_config("demo")
    bare = tmp_path / "bare.pt"
    torch.save(build_model(cfg).state_dict(), bare)
    photo = shared_data / "mpii_sample" / "004645041.jpg"
    assert predict_cli.main(["--checkpoint", str(bare), "--image", str(photo), "--out", str(tmp_path)]) == 2
    assert "give --config" in capsys.readouterr().err
    args = ["--checkpoint", str(bare), "--config", "demo", "--image", str(photo), "--out", str(tmp_path)]
    assert predict_cli.main([*args, "--no-flip", "--detector", "none"]) == 0
    record = json.loads((tmp_path / "004645041_pose.json").read_text())
    assert [p["box"] for p in record["people"]] == [[0.0, 0.0, 1280.0, 720.0]]


def test_bad_inputs_give_clear_errors(shared_data, tiny_checkpoint, tmp_path, capsys):
    photo = shared_data / "coco_sample" / "000000000785.jpg"
    with pytest.raises(SystemExit):
        predict_cli.main(["--checkpoint", str(tiny_checkpoint), "--image", str(photo), "--box", "1,2,3"])
    assert "x,y,w,h" in capsys.readouterr().err
    assert (
        predict_cli.main(["--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path / "none.jpg")]) == 2
    )
    assert "none.jpg" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert predict_cli.main(["--checkpoint", str(junk), "--image", str(photo)]) == 2
    assert "junk.pt" in capsys.readouterr().err
    other = tmp_path / "other.pt"
    torch.save({"model": build_model(load_config("demo", ["model.channels=5"])).state_dict()}, other)
    assert predict_cli.main(["--checkpoint", str(other), "--config", "demo", "--image", str(photo)]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "P=3, C=6" in err
    assert 'Unexpected key(s) in state_dict: "parts.0.adapters' in err


def test_a_box_outside_the_image_is_skipped_with_a_warning(shared_data, tiny_checkpoint, tmp_path, capsys):
    photo = shared_data / "coco_sample" / "000000000785.jpg"
    argv = ["--checkpoint", str(tiny_checkpoint), "--image", str(photo), "--out", str(tmp_path)]
    assert predict_cli.main([*argv, "--box", "280,40,220,380", "--box", "5000,5000,50,50"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "box 5000,5000,50,50 lies outside the 640x425 image" in warnings[0]
    assert "1 people on 1 image(s), 1 box(es) outside their image skipped" in captured.out
    record = json.loads((tmp_path / "000000000785_pose.json").read_text())
    assert [p["box"] for p in record["people"]] == [[280, 40, 220, 380]]


def test_a_boxes_file_that_names_no_image_is_refused(shared_data, tiny_checkpoint, tmp_path, capsys):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([{"image_id": 12345, "bbox": [10, 10, 50, 100], "score": 0.9}]))
    photo = shared_data / "coco_sample" / "000000000785.jpg"
    argv = ["--checkpoint", str(tiny_checkpoint), "--image", str(photo), "--boxes", str(boxes)]
    assert predict_cli.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "boxes.json" in err[0] and "no entry names any of the 1 image(s)" in err[0]
    assert not (tmp_path / "out").exists()


def test_images_a_boxes_file_misses_are_counted_in_a_warning(shared_data, tiny_checkpoint, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("000000000785.jpg", "000000040083.jpg"):
        (photos / name).write_bytes((shared_data / "coco_sample" / name).read_bytes())
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([{"image_id": 785, "bbox": [280, 40, 220, 380], "score": 0.9}]))
    argv = ["--checkpoint", str(tiny_checkpoint), "--image", str(photos), "--boxes", str(boxes), "--no-flip"]
    assert predict_cli.main([*argv, "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "has no entry for 1 of the 2 image(s) (e.g. 000000040083)" in captured.err
    assert "1 people on 2 image(s)" in captured.out
