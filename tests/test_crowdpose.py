"""CrowdPose: its 14-joint set, annotations without area, and AP with the easy/medium/hard split."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from pnfs.data.annotations.coco import read_coco_persons
from pnfs.data.annotations.records import SkipReport
from pnfs.evaluate.coco import crowd_bins, main
from pnfs.evaluate.coco import crowdpose_ground_truth as scored_ground_truth
from pnfs.keypoints import CROWDPOSE

CROWD_INDEX = {1: 0.05, 2: 0.5, 3: 0.93}  # one image per bin


def crowdpose_ground_truth() -> dict:
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id, crowd in CROWD_INDEX.items():
        images.append(
            {"id": image_id, "file_name": f"{image_id}.jpg", "width": 640, "height": 480, "crowdIndex": crowd}
        )
        for k in range(2):
            x0, y0 = 40 + 250 * k, 30
            xy = rng.uniform([x0, y0], [x0 + 200, y0 + 400], size=(CROWDPOSE.num_joints, 2))
            kps = np.concatenate([xy, np.full((CROWDPOSE.num_joints, 1), 2.0)], 1)
            annotations.append(
                {  # no "area": CrowdPose's files leave it out
                    "id": 10 * image_id + k,
                    "image_id": image_id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "bbox": [x0, y0, 200.0, 400.0],
                    "keypoints": [round(float(v), 2) for v in kps.ravel()],
                    "num_keypoints": CROWDPOSE.num_joints,
                }
            )
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "person"}]}


def write_ground_truth_and_results(tmp_path, shift: float = 0.0):
    gt = crowdpose_ground_truth()
    # pycocotools needs an area per ground-truth person: the box's w*h, as our reader gives it
    for ann in gt["annotations"]:
        ann["area"] = ann["bbox"][2] * ann["bbox"][3]
    results = []
    for ann in gt["annotations"]:
        kps = np.asarray(ann["keypoints"]).reshape(-1, 3).copy()
        if ann["image_id"] == 3:
            kps[:, 0] += shift
        kps[:, 2] = 1.0
        results.append(
            {"image_id": ann["image_id"], "category_id": 1, "keypoints": kps.ravel().tolist(), "score": 1.0}
        )
    gt_path, res_path = tmp_path / "gt.json", tmp_path / "res.json"
    gt_path.write_text(json.dumps(gt))
    res_path.write_text(json.dumps(results))
    return gt_path, res_path


def test_reader_takes_crowdpose_joints_and_the_box_area():
    skipped, filtered = SkipReport(), SkipReport()
    people = read_coco_persons(crowdpose_ground_truth(), skipped, filtered, CROWDPOSE)
    assert len(people) == 6 and people[0].keypoints.shape == (14, 3)
    assert people[0].area == 200.0 * 400.0


def test_crowd_bins_follow_the_crowd_index(tmp_path):
    gt_path, _ = write_ground_truth_and_results(tmp_path)
    assert crowd_bins(gt_path) == {"easy": [1], "medium": [2], "hard": [3]}


def test_crowd_bins_use_the_toolkit_cut_offs(tmp_path):
    """crowdposetools: easy below 0.2, medium from 0.2 to below 0.8, hard from 0.8 on."""
    gt = crowdpose_ground_truth()
    for image, index in zip(gt["images"], (0.15, 0.2, 0.8)):
        image["crowdIndex"] = index
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    assert crowd_bins(path) == {"easy": [1], "medium": [2], "hard": [3]}


def test_ground_truth_as_predictions_scores_ap_one_with_the_split(tmp_path, capsys):
    gt_path, res_path = write_ground_truth_and_results(tmp_path)
    argv = ["--annotations", str(gt_path), "--results", str(res_path), "--keypoints", "crowdpose", "--json"]
    assert main(argv) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(stats) == {"AP", "AP50", "AP75", "AR", "AP_easy", "AP_medium", "AP_hard"}
    for key, value in stats.items():
        assert math.isclose(value, 1.0), (key, value)


def test_ground_truth_without_area_is_scored_with_the_toolkit_area(tmp_path, capsys):
    """CrowdPose's files have no area: crowdposetools takes 0.53 * box w * h for every person."""
    gt = crowdpose_ground_truth()
    results = [
        {"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
        for a in gt["annotations"]
    ]
    gt_path, res_path = tmp_path / "gt.json", tmp_path / "res.json"
    gt_path.write_text(json.dumps(gt))
    res_path.write_text(json.dumps(results))
    assert {a["area"] for a in scored_ground_truth(gt_path).anns.values()} == {0.53 * 200.0 * 400.0}
    argv = ["--annotations", str(gt_path), "--results", str(res_path), "--keypoints", "crowdpose", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["AP"] == pytest.approx(1.0)


def test_a_miss_in_the_hard_image_shows_in_ap_hard_only(tmp_path, capsys):
    gt_path, res_path = write_ground_truth_and_results(tmp_path, shift=60.0)
    assert (
        main(
            ["--annotations", str(gt_path), "--results", str(res_path), "--keypoints", "crowdpose", "--json"]
        )
        == 0
    )
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["AP_easy"] == pytest.approx(1.0) and stats["AP_medium"] == pytest.approx(1.0)
    assert stats["AP_hard"] < 0.5 and stats["AP"] < 1.0


def test_the_command_line_prints_the_json_last(tmp_path):
    gt_path, res_path = write_ground_truth_and_results(tmp_path)
    command = [sys.executable, "-m", "pnfs.evaluate.coco", "--annotations", str(gt_path)]
    command += ["--results", str(res_path), "--keypoints", "crowdpose", "--json"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1])["AP_hard"] == pytest.approx(1.0)


def test_an_image_without_crowd_index_is_named(tmp_path, capsys):
    gt_path, res_path = write_ground_truth_and_results(tmp_path)
    gt = json.loads(gt_path.read_text())
    del gt["images"][1]["crowdIndex"]
    gt_path.write_text(json.dumps(gt))
    assert main(["--annotations", str(gt_path), "--results", str(res_path), "--keypoints", "crowdpose"]) == 2
    assert "image 2" in capsys.readouterr().err


def test_a_crowdpose_file_scored_as_coco_names_the_keypoint_set(tmp_path, capsys):
    gt_path, res_path = write_ground_truth_and_results(tmp_path)
    assert main(["--annotations", str(gt_path), "--results", str(res_path), "--json"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1  # pycocotools' loading chatter goes to stderr too
    assert "14 keypoints per person" in err[0] and "scores 17" in err[0] and "--keypoints crowdpose" in err[0]


def test_json_of_an_empty_crowd_bin_is_strict_json_with_null(tmp_path, capsys):
    gt_path, res_path = write_ground_truth_and_results(tmp_path)
    gt = json.loads(gt_path.read_text())
    gt["images"] = [im for im in gt["images"] if im["id"] != 2]  # no medium image left
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] != 2]
    gt_path.write_text(json.dumps(gt))
    res_path.write_text(json.dumps([r for r in json.loads(res_path.read_text()) if r["image_id"] != 2]))
    argv = ["--annotations", str(gt_path), "--results", str(res_path), "--keypoints", "crowdpose", "--json"]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON: {line}")

    stats = json.loads(line, parse_constant=refuse)
    assert stats["AP_medium"] is None and stats["AP_easy"] == pytest.approx(1.0)
