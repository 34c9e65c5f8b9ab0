"""The synthetic demo data set: valid COCO, deterministic, visible people, left/right colours."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("make_synthetic", REPO / "data_prep" / "make_synthetic.py")
make_synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_synthetic)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    assert make_synthetic.main(["--out", str(out), "--train", "40", "--val", "12", "--seed", "3"]) == 0
    return out


def test_layout_and_counts(synthetic):
    from pycocotools.coco import COCO

    for split, n in (("train", 40), ("val", 12)):
        coco = COCO(str(synthetic / "annotations" / f"person_keypoints_{split}.json"))
        anns = coco.loadAnns(coco.getAnnIds())
        assert len(anns) == n
        assert len({a["id"] for a in anns}) == n
        for img in coco.loadImgs(coco.getImgIds()):
            assert (synthetic / "images" / split / img["file_name"]).is_file()
        for a in anns:
            kp = np.asarray(a["keypoints"]).reshape(17, 3)
            assert set(np.unique(kp[:, 2])) <= {0, 1, 2}
            assert a["num_keypoints"] == (kp[:, 2] > 0).sum() > 0
            x, _, w, h = a["bbox"]
            lab = kp[kp[:, 2] > 0]
            assert (lab[:, 0] >= x - 1e-6).all() and (lab[:, 0] <= x + w + 1e-6).all()
            assert h >= 0.3 * 256 * 0.4  # people are not tiny


def test_same_seed_same_data(synthetic, tmp_path):
    make_synthetic.main(["--out", str(tmp_path), "--train", "40", "--val", "12", "--seed", "3"])
    for split in ("train", "val"):
        name = f"annotations/person_keypoints_{split}.json"
        assert json.loads((tmp_path / name).read_text()) == json.loads((synthetic / name).read_text())


def test_left_limbs_are_blue_and_right_limbs_orange(synthetic):
    """Left/right must be learnable from the picture: sample the middle of visible forearms."""
    data = json.loads((synthetic / "annotations" / "person_keypoints_train.json").read_text())
    files = {im["id"]: im["file_name"] for im in data["images"]}
    blue_minus_red = {0: [], 1: []}
    for a in data["annotations"]:
        img = cv2.imread(str(synthetic / "images" / "train" / files[a["image_id"]]))[:, :, ::-1].astype(int)
        kp = np.asarray(a["keypoints"]).reshape(17, 3)
        for side, (elbow, wrist) in enumerate(((7, 9), (8, 10))):
            if kp[elbow, 2] == 2 and kp[wrist, 2] == 2:
                x, y = ((kp[elbow, :2] + kp[wrist, :2]) / 2).round().astype(int)
                r, _, b = img[y, x]
                blue_minus_red[side].append(b - r)
    assert np.median(blue_minus_red[0]) > 60 and np.median(blue_minus_red[1]) < -60


def test_occluded_joints_are_labelled_but_not_visible(synthetic):
    data = json.loads((synthetic / "annotations" / "person_keypoints_train.json").read_text())
    v = np.asarray([a["keypoints"][2::3] for a in data["annotations"]])
    assert (v == 2).mean() > 0.6 and (v == 1).any()
