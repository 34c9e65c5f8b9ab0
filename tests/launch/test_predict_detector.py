"""launch/predict.py on plain photos: the person detector, --boxes files, image folders, videos.

The detector's weights never download: a state dict is put where torchvision's cache looks for
the COCO weights (a temporary TORCH_HOME) and the download function is replaced by one that
fails. That state dict is a randomly initialised detector whose classifier favours ``person``,
so the real loading path is what makes people appear.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pnfs.config import config_to_dict, load_config
from pnfs.detector import DEFAULT_DETECTOR, PERSON_LABEL, detector_weights, load_detector
from pnfs.model import build_model
from pnfs.model.backbones import torchvision_cache_file

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("pnfs_launch_predict_det", REPO / "launch" / "predict.py")
predict_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(predict_cli)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    cfg = load_config("demo")
    path = tmp_path_factory.mktemp("ckpt") / "demo.pt"
    torch.save({"model": build_model(cfg).state_dict(), "config": config_to_dict(cfg)}, path)
    return path


@pytest.fixture
def offline(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise OSError("test: downloads are disabled")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path


@pytest.fixture
def cached_detector(offline) -> Path:
    """A person-loving detector state dict at torchvision's cache path for the default detector."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.get_model(DEFAULT_DETECTOR, weights=None, weights_backbone=None)
    state = net.state_dict()
    state["roi_heads.box_predictor.cls_score.bias"][PERSON_LABEL] = 10.0
    file = torchvision_cache_file(detector_weights(DEFAULT_DETECTOR))
    file.parent.mkdir(parents=True)
    torch.save(state, file)
    return file


def test_detector_weights_come_from_the_torch_hub_cache(cached_detector):
    model = load_detector(DEFAULT_DETECTOR)
    assert float(model.roi_heads.box_predictor.cls_score.bias[PERSON_LABEL].detach()) == 10.0
    assert not model.training


def test_photo_without_boxes_runs_the_detector(shared_data, checkpoint, cached_detector, tmp_path):
    photo = shared_data / "coco_sample" / "000000000785.jpg"
    out = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), "--image", str(photo), "--out", str(out), "--det-score", "0.9"]
    assert predict_cli.main(argv) == 0
    record = json.loads((out / "000000000785_pose.json").read_text())
    people = record["people"]
    assert len(people) > 0
    assert all(p["box_score"] >= 0.9 for p in people)
    height, width = cv2.imread(str(photo)).shape[:2]
    for person in people:
        x, y, w, h = person["box"]
        assert w > 0 and h > 0 and x >= -1 and y >= -1 and x + w <= width + 1 and y + h <= height + 1
        assert np.asarray(person["keypoints"]).shape == (17, 3)
    assert cv2.imread(str(out / "000000000785_pose.png")).shape == (height, width, 3)


def test_offline_detector_without_a_cached_file_names_it(shared_data, checkpoint, offline, capsys):
    photo = shared_data / "coco_sample" / "000000000785.jpg"
    argv = ["--checkpoint", str(checkpoint), "--image", str(photo), "--out", str(offline / "out")]
    assert predict_cli.main(argv) == 2
    err = capsys.readouterr().err
    expected = offline / "torch" / "hub" / "checkpoints" / "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth"
    assert str(expected) in err and "Offline? Place" in err


def test_folder_with_a_coco_detection_file(shared_data, checkpoint, tmp_path):
    folder = shared_data / "coco_sample"
    detections = folder / "test_coco_det_AP_H_56.json"
    out = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), "--image", str(folder), "--boxes", str(detections)]
    assert predict_cli.main([*argv, "--out", str(out), "--det-score", "0.5", "--no-flip"]) == 0
    entries = json.loads(detections.read_text())
    for photo in sorted(folder.glob("*.jpg")):
        wanted = [e["bbox"] for e in entries if e["image_id"] == int(photo.stem) and e["score"] >= 0.5]
        record = json.loads((out / f"{photo.stem}_pose.json").read_text())
        got = np.asarray([p["box"] for p in record["people"]]).reshape(-1, 4)
        np.testing.assert_allclose(got, np.asarray(wanted).reshape(-1, 4))
        assert len(wanted) > 0 and (out / f"{photo.stem}_pose.png").is_file()


def test_video_frames_get_one_overlay_and_one_json_each(shared_data, checkpoint, tmp_path, capsys):
    photo = cv2.imread(str(shared_data / "coco_sample" / "000000000785.jpg"))
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (photo.shape[1], photo.shape[0]))
    for shift in range(3):
        writer.write(np.roll(photo, 10 * shift, axis=1))
    writer.release()
    out = tmp_path / "out"
    argv = [
        "--checkpoint",
        str(checkpoint),
        "--video",
        str(video),
        "--box",
        "280,40,220,380",
        "--out",
        str(out),
    ]
    assert predict_cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "1 people on 3" not in captured.out and "3 people on 3 frame(s)" in captured.out
    assert "3/3" in captured.err and "frame" in captured.err  # the progress bar counts frames
    assert sorted(p.name for p in out.glob("*.json")) == [f"clip_{i:06d}_pose.json" for i in range(3)]
    assert len(list(out.glob("clip_*_pose.png"))) == 3
    record = json.loads((out / "clip_000002_pose.json").read_text())
    assert record["image"] == f"{video}#2" and len(record["people"]) == 1


def test_bad_detection_files_and_folders_are_named(checkpoint, tmp_path, capsys):
    bad = tmp_path / "boxes.json"
    bad.write_text(json.dumps([{"image_id": 1, "bbox": [0, 0, -5, 3]}]))
    (tmp_path / "photos").mkdir()
    cv2.imwrite(str(tmp_path / "photos" / "1.png"), np.zeros((64, 48, 3), np.uint8))
    argv = ["--checkpoint", str(checkpoint), "--image", str(tmp_path / "photos"), "--boxes", str(bad)]
    assert predict_cli.main(argv) == 2
    assert "boxes.json" in capsys.readouterr().err
    assert predict_cli.main(["--checkpoint", str(checkpoint), "--image", str(tmp_path / "empty")]) == 2
    assert "empty" in capsys.readouterr().err
    assert predict_cli.main(["--checkpoint", str(checkpoint), "--video", str(tmp_path / "none.mp4")]) == 2
    assert "none.mp4" in capsys.readouterr().err
