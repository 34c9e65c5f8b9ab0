"""COCO keypoint evaluation: AP on the real sample, rescoring, OKS, OKS-NMS, detections, CLI."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from pnfs.evaluate.coco import (
    STAT_KEYS,
    box_pck,
    coco_results,
    evaluate_keypoints,
    format_table,
    instance_scores,
    load_detections,
    main,
)
from pnfs.evaluate.oks import joint_sigmas, oks, oks_nms, pairwise_oks
from pnfs.keypoints import COCO, CROWDPOSE, MPII, JointSet

SIGMAS = np.asarray(COCO.sigmas)


def _gt_people(path):
    """The README's persons: iscrowd 0, num_keypoints > 0, ascending annotation id."""
    data = json.loads(path.read_text())
    anns = sorted(
        (a for a in data["annotations"] if a["iscrowd"] == 0 and a["num_keypoints"] > 0),
        key=lambda a: a["id"],
    )
    return data, anns


def _results(anns, std, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for a in anns:
        k = np.asarray(a["keypoints"], dtype=np.float64).reshape(-1, 3)
        if std:
            k[:, :2] += rng.normal(0.0, std, size=(k.shape[0], 2))
        k[:, 2] = 1.0
        out.append(
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "keypoints": np.round(k, 4).reshape(-1).tolist(),
                "score": 1.0,
            }
        )
    return out


def _pycocotools_ap(gt_path, results):
    """The README's procedure with nothing of ours in between."""
    from pycocotools.coco import COCO as Coco
    from pycocotools.cocoeval import COCOeval

    gt = Coco(str(gt_path))
    ev = COCOeval(gt, gt.loadRes(results), "keypoints")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats


def test_ground_truth_as_results_gives_ap_1(shared_data):
    gt_path = shared_data / "coco_sample" / "test_coco.json"
    _, anns = _gt_people(gt_path)
    stats = evaluate_keypoints(gt_path, _results(anns, 0.0), verbose=False)
    assert list(stats) == list(STAT_KEYS)
    assert stats["AP"] == 1.0 and stats["AP50"] == 1.0 and stats["AP75"] == 1.0


def test_ground_truth_through_rescoring_and_nms_gives_ap_1(shared_data):
    gt_path = shared_data / "coco_sample" / "test_coco.json"
    _, anns = _gt_people(gt_path)
    kp = np.stack([np.asarray(a["keypoints"], dtype=np.float64).reshape(-1, 3) for a in anns])
    results = coco_results(
        kp[..., :2],
        np.ones(kp.shape[:2]),
        np.array([a["image_id"] for a in anns]),
        np.ones(len(anns)),
        np.array([a["bbox"][2] * a["bbox"][3] for a in anns]),
        SIGMAS,
    )
    assert len(results) == len(anns)  # distinct people survive the OKS-NMS
    assert evaluate_keypoints(gt_path, results, verbose=False)["AP"] == 1.0


def test_oks_nms_without_sigmas_is_refused_and_no_nms_needs_none():
    kp = np.zeros((2, 17, 2))
    kp[1] += 50.0
    args = (kp, np.ones((2, 17)), np.array([7, 7]), np.ones(2), np.full(2, 100.0), None)
    with pytest.raises(ValueError, match=r"OKS-NMS \(nms_threshold=0\.9\) needs the joints' sigmas"):
        coco_results(*args)
    assert [r["image_id"] for r in coco_results(*args, nms_threshold=None)] == [7, 7]


def test_jittered_ground_truth_matches_readme_and_pycocotools(shared_data):
    gt_path = shared_data / "coco_sample" / "test_coco.json"
    _, anns = _gt_people(gt_path)
    results = _results(anns, 3.0, seed=0)
    ours = evaluate_keypoints(gt_path, results, verbose=False)
    reference = _pycocotools_ap(gt_path, results)
    assert round(ours["AP"], 4) == 0.8016
    assert [round(ours[k], 4) for k in ("AP50", "AP75", "APm", "APl")] == [1.0, 0.8771, 0.6448, 0.9135]
    np.testing.assert_allclose([ours[k] for k in STAT_KEYS], reference, rtol=0, atol=1e-12)


def test_command_line_prints_the_ten_stats_as_json(shared_data, tmp_path):
    gt_path = shared_data / "coco_sample" / "test_coco.json"
    _, anns = _gt_people(gt_path)
    res = tmp_path / "res.json"
    res.write_text(json.dumps(_results(anns, 3.0)))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pnfs.evaluate.coco",
            "--annotations",
            str(gt_path),
            "--results",
            str(res),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    stats = json.loads(out.stdout)
    assert list(stats) == list(STAT_KEYS)
    assert round(stats["AP"], 4) == 0.8016


def test_command_line_table_and_bad_results_file(shared_data, tmp_path, capsys):
    gt_path = shared_data / "coco_sample" / "test_coco.json"
    _, anns = _gt_people(gt_path)
    res = tmp_path / "res.json"
    res.write_text(json.dumps(_results(anns, 0.0)))
    assert main(["--annotations", str(gt_path), "--results", str(res)]) == 0
    assert "AP50" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["--annotations", str(gt_path), "--results", str(bad)]) == 2
    assert "bad.json" in capsys.readouterr().err
    stranger = tmp_path / "stranger.json"
    stranger.write_text(json.dumps([{**_results(anns, 0.0)[0], "image_id": 123456789}]))
    assert main(["--annotations", str(gt_path), "--results", str(stranger)]) == 2
    assert "123456789" in capsys.readouterr().err


def test_instance_score_is_box_score_times_mean_of_confident_joints():
    joint_scores = np.array([[0.9, 0.5, 0.1, 0.2], [0.1, 0.15, 0.2, 0.0], [0.3, 0.3, 0.3, 0.3]])
    got = instance_scores(np.array([0.8, 1.0, 0.5]), joint_scores, threshold=0.2)
    # 0.2 itself is not above the threshold; no confident joint -> 0
    np.testing.assert_allclose(got, [0.8 * (0.9 + 0.5) / 2, 0.0, 0.5 * 0.3])


def test_oks_equals_pycocotools_compute_oks(shared_data):
    from pycocotools.coco import COCO as Coco
    from pycocotools.cocoeval import COCOeval

    gt_path = shared_data / "coco_sample" / "test_coco.json"
    data, anns = _gt_people(gt_path)
    results = _results(anns, 5.0, seed=3)
    gt = Coco(str(gt_path))
    ev = COCOeval(gt, gt.loadRes(results), "keypoints")
    ev.evaluate()
    for image_id in gt.getImgIds():
        gts = ev._gts[image_id, 1]
        dts = sorted(ev._dts[image_id, 1], key=lambda d: -d["score"])
        if not gts or not dts:
            continue
        want = ev.computeOks(image_id, 1)
        got = oks(
            np.array([d["keypoints"] for d in dts]).reshape(len(dts), -1, 3),
            np.array([g["keypoints"] for g in gts]).reshape(len(gts), -1, 3),
            np.array([g["area"] for g in gts]),
            SIGMAS,
            gt_box=np.array([g["bbox"] for g in gts]),
        )
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    # the sample holds people without labelled joints: the box fallback was exercised
    assert any(a["num_keypoints"] == 0 for a in data["annotations"])


def _scalar_oks(a, b, area_a, area_b, sigmas):
    total = 0.0
    for j, s in enumerate(sigmas):
        d2 = (a[j][0] - b[j][0]) ** 2 + (a[j][1] - b[j][1]) ** 2
        total += math.exp(-d2 / (2 * s) ** 2 / ((area_a + area_b) / 2 + np.spacing(1)) / 2)
    return total / len(sigmas)


def _reference_nms(kp, scores, areas, sigmas, threshold):
    """Textbook greedy NMS: pop the best, compare it with every remaining candidate."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    while order:
        best = order.pop(0)
        keep.append(best)
        order = [i for i in order if _scalar_oks(kp[best], kp[i], areas[best], areas[i], sigmas) <= threshold]
    return keep


@pytest.mark.parametrize("seed", range(6))
def test_oks_nms_equals_brute_force_on_random_people(seed):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 200, size=(4, 1, 2))
    base = centres + rng.normal(0, 30, size=(4, 17, 2))
    # clusters of near-duplicates (some above, some below the 0.9 threshold) around 4 people
    n = 40
    kp = base[rng.integers(0, 4, n)] + rng.normal(0, 1, size=(n, 1, 1)) * rng.normal(0, 4, size=(n, 17, 2))
    scores = rng.uniform(0, 1, n)
    scores[:5] = scores[5]  # ties keep the input order
    areas = rng.uniform(2000, 9000, n)
    kept = oks_nms(kp, scores, areas, SIGMAS, 0.9)
    assert kept.tolist() == _reference_nms(kp, scores, areas, SIGMAS, 0.9)
    assert 1 < len(kept) < n  # the case really suppresses some and keeps several


def test_oks_nms_equals_brute_force_on_detector_boxes(shared_data):
    dets = load_detections(shared_data / "coco_sample" / "test_coco_det_AP_H_56.json")
    rng = np.random.default_rng(0)
    # one pose per box: a fixed template stretched into the box, plus a little noise
    template = rng.uniform(0.1, 0.9, size=(17, 2))
    for image_id in sorted({d["image_id"] for d in dets}):
        boxes = [d for d in dets if d["image_id"] == image_id]
        bb = np.array([d["bbox"] for d in boxes])
        kp = bb[:, None, :2] + template[None] * bb[:, None, 2:] + rng.normal(0, 1, size=(len(boxes), 17, 2))
        scores = np.array([d["score"] for d in boxes])
        areas = bb[:, 2] * bb[:, 3]
        for threshold in (0.9, 0.5):
            kept = oks_nms(kp, scores, areas, SIGMAS, threshold)
            assert kept.tolist() == _reference_nms(kp, scores, areas, SIGMAS, threshold)


def test_pairwise_oks_is_symmetric_with_ones_on_the_diagonal():
    rng = np.random.default_rng(1)
    m = pairwise_oks(rng.uniform(0, 100, (5, 17, 2)), rng.uniform(100, 900, 5), SIGMAS)
    np.testing.assert_allclose(m, m.T)
    np.testing.assert_allclose(np.diag(m), 1.0)


def test_detections_keep_persons_above_the_score_threshold(shared_data, tmp_path):
    path = shared_data / "coco_sample" / "test_coco_det_AP_H_56.json"
    raw = json.loads(path.read_text())
    assert len(load_detections(path)) == 118
    kept = load_detections(path, score_threshold=0.5)
    assert len(kept) == sum(d["score"] >= 0.5 for d in raw) > 0
    other = tmp_path / "dets.json"
    other.write_text(json.dumps([{**raw[0], "category_id": 2}, raw[1]]))
    assert len(load_detections(other)) == 1
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([raw[0], {"image_id": 1, "bbox": [1, 2, 3]}]))
    with pytest.raises(ValueError, match=r"broken\.json: detection 1"):
        load_detections(broken)


# The published COCO keypoint sigmas (cocoeval.py, Ronchi & Perona), written out here in COCO's
# joint order so that a wrong value in the product's table cannot hide behind the table itself.
PUBLISHED_COCO_SIGMAS = [
    0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89,
]  # fmt: skip


def test_sigmas_for_custom_joint_sets():
    from pycocotools.cocoeval import Params

    np.testing.assert_allclose(joint_sigmas(COCO), np.array(PUBLISHED_COCO_SIGMAS) / 10.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(joint_sigmas(COCO), Params(iouType="keypoints").kpt_oks_sigmas, atol=1e-12)
    custom = [0.05] * MPII.num_joints
    np.testing.assert_allclose(joint_sigmas(MPII, custom), custom)
    with pytest.raises(ValueError, match=r"eval\.sigmas"):
        joint_sigmas(MPII)
    with pytest.raises(ValueError, match=r"eval\.sigmas"):
        joint_sigmas(COCO, [0.05] * 3)


def test_custom_sigmas_reach_cocoeval(shared_data):
    gt_path = shared_data / "coco_sample" / "test_coco.json"
    _, anns = _gt_people(gt_path)
    results = _results(anns, 3.0)
    default = evaluate_keypoints(gt_path, results, verbose=False)["AP"]
    wider = evaluate_keypoints(gt_path, results, sigmas=SIGMAS * 3, verbose=False)["AP"]
    assert wider > default


def test_oks_of_people_without_labelled_joints_equals_pycocotools_near_a_non_square_box():
    """COCO's rule for a person with no labelled joint: distances to the box doubled around
    itself (x - w .. x + 2w, y - h .. y + 2h), zero inside it. A tall box and predictions on
    every side of it, so that a swapped w/h or a wrong sign in the distance shows."""
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(4)
    box = [100.0, 50.0, 30.0, 90.0]  # x, y, w, h: the doubled box is x 70..160, y -40..230
    unlabelled = {"keypoints": [0] * 51, "bbox": box, "area": 2000.0, "num_keypoints": 0}
    labelled_kp = np.concatenate([rng.uniform(60, 170, (17, 2)), np.full((17, 1), 2.0)], 1)
    labelled = {"keypoints": labelled_kp.ravel().tolist(), "bbox": box, "area": 2700.0, "num_keypoints": 17}
    # joints left/right/above/below the doubled box and inside it, by a few tens of px
    preds = [
        np.stack([rng.uniform(lo_x, hi_x, 17), rng.uniform(lo_y, hi_y, 17)], 1)
        for lo_x, hi_x, lo_y, hi_y in [(40, 70, 0, 100), (160, 200, 0, 100), (80, 150, -80, -40),
                                       (80, 150, 230, 270), (75, 155, -30, 220), (30, 210, -90, 280)]
    ]  # fmt: skip
    dts = [{"keypoints": np.concatenate([p, np.ones((17, 1))], 1).ravel().tolist(), "score": 1.0 - 0.1 * i}
           for i, p in enumerate(preds)]  # fmt: skip
    ev = COCOeval(iouType="keypoints")
    ev._gts = {(1, 1): [unlabelled, labelled]}
    ev._dts = {(1, 1): dts}
    want = ev.computeOks(1, 1)
    got = oks(
        np.array(preds), np.array([np.zeros((17, 3)), labelled_kp]), np.array([2000.0, 2700.0]), SIGMAS,
        gt_box=np.array([box, box]),
    )  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert 0.05 < got[:4, 0].max() < 0.95 and got[4, 0] == 1.0  # outside: partial; inside: all zero distances


def test_oks_nms_of_nothing_and_its_default_threshold():
    none = oks_nms(np.zeros((0, 17, 2)), np.zeros(0), np.zeros(0), SIGMAS)
    assert none.shape == (0,) and none.dtype == np.int64  # indices, even of nothing
    rng = np.random.default_rng(0)
    person = rng.uniform(0, 100, (1, 17, 2))
    # two near-duplicates (OKS ~0.95 > 0.9) and one clearly apart (OKS ~0.6)
    kp = np.concatenate([person, person + 1.0, person + 8.0])
    areas = np.full(3, 5000.0)
    pair = pairwise_oks(kp, areas, SIGMAS)
    assert pair[0, 1] > 0.9 > 0.8 > pair[0, 2]
    assert oks_nms(kp, np.array([0.9, 0.8, 0.7]), areas, SIGMAS).tolist() == [0, 2]


def test_a_zero_or_negative_sigma_is_refused_by_name():
    for bad in (0.0, -0.05):
        with pytest.raises(ValueError, match=r"eval\.sigmas: every sigma must be > 0"):
            joint_sigmas(MPII, [0.05] * (MPII.num_joints - 1) + [bad])


def _three_people_and_one():
    """Image 5: A, B = A moved 0.5 px (OKS ~1 with A), C = A moved 20 px; image 2: D.

    With every sigma 0.1 and areas 10 000, OKS = exp(-d^2 / (2 * 10 000 * 0.2^2)), so
    C's OKS with A is exp(-0.5) = 0.61: kept at the NMS threshold 0.9, dropped at 0.5.
    Joint scores are float32, as the runner hands them over."""
    a = np.stack([10.123456 + 3.0 * np.arange(17), 40.0 + 2.0 * np.arange(17)], -1)
    keypoints = np.stack([a + np.array([dx, 0.0]) for dx in (0.0, 0.5, 20.0, 300.0)])
    joint_scores = np.stack(
        [np.r_[np.full(16, 0.5), 0.1], np.full(17, 0.9), np.full(17, 0.15), np.r_[np.full(16, 0.7), 0.25]]
    ).astype(np.float32)
    return keypoints, joint_scores, np.array([5, 5, 5, 2]), np.array([0.8, 0.3, 1.0, 0.5]), np.full(4, 1e4)


def test_coco_results_rescore_then_suppress_per_image_best_first():
    """Which results remain, in which order, with which score: written out by hand.

    A: 0.8 x mean(0.5 x 16) (its 0.1 is not above 0.2) = 0.4; B: 0.3 x 0.9 = 0.27, removed by A;
    C: no joint above 0.2 -> 0, apart from A; D: 0.5 x mean(0.7 x 16, 0.25) = 0.5 x 11.45 / 17.
    Images in ascending id, within an image best score first."""
    keypoints, joint_scores, image_ids, box_scores, areas = _three_people_and_one()
    sigmas = np.full(17, 0.1)
    results = coco_results(keypoints, joint_scores, image_ids, box_scores, areas, sigmas)  # defaults 0.2, 0.9
    assert [(r["image_id"], r["category_id"]) for r in results] == [(2, 1), (5, 1), (5, 1)]
    assert [r["keypoints"][0] for r in results] == [310.1235, 10.1235, 30.1235]  # D, A, C; 4 decimals
    assert results[1]["keypoints"][:6] == [10.1235, 40.0, 0.5, 13.1235, 42.0, 0.5]  # [x, y, s] per joint
    assert results[1]["keypoints"][-3:] == [58.1235, 72.0, 0.1]
    assert all(len(r["keypoints"]) == 51 for r in results)
    assert [r["score"] for r in results] == pytest.approx([0.5 * 11.45 / 17, 0.8 * 0.5, 0.0], rel=1e-6, abs=0)
    # a stricter NMS also drops C; no NMS keeps all four, B included, with its own score
    strict = coco_results(keypoints, joint_scores, image_ids, box_scores, areas, sigmas, nms_threshold=0.5)
    assert [r["keypoints"][0] for r in strict] == [310.1235, 10.1235]
    every = coco_results(keypoints, joint_scores, image_ids, box_scores, areas, sigmas, nms_threshold=None)
    assert [r["keypoints"][0] for r in every] == [310.1235, 10.1235, 10.6235, 30.1235]
    assert every[2]["score"] == pytest.approx(0.3 * 0.9, rel=1e-6)
    # the rescoring threshold reaches the scores: at 0.6 A's 0.5s and all of D's joints are out
    high = coco_results(keypoints, joint_scores, image_ids, box_scores, areas, sigmas, rescore_threshold=0.6)
    assert [r["score"] for r in high] == pytest.approx([0.5 * 0.7, 0.27, 0.0], rel=1e-6, abs=0)
    assert [r["keypoints"][0] for r in high] == [310.1235, 10.6235, 30.1235]  # B now outranks A


def test_instance_scores_of_float32_predictions_are_averaged_in_float64():
    """The runner hands over float32 scores; their mean is taken in float64 (exactly the mean of
    the same numbers as float64), not rounded to float32 on the way."""
    rng = np.random.default_rng(0)
    joint = rng.uniform(0.0, 1.0, (50, 17)).astype(np.float32)
    box = rng.uniform(0.5, 1.0, 50).astype(np.float32)
    wide = joint.astype(np.float64)
    above = wide > 0.2
    want = box.astype(np.float64) * np.array([row[m].sum() / m.sum() for row, m in zip(wide, above)])
    got = instance_scores(box, joint)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, want)


def _box_pck_ground_truth(tmp_path, people):
    """A COCO file with one image and one annotation per (ann_id, box, [x, y, v] * 3)."""
    annotations = [
        {"id": ann_id, "image_id": 1, "category_id": 1, "bbox": box, "area": box[2] * box[3], "iscrowd": 0,
         "keypoints": [v for joint in kps for v in joint], "num_keypoints": sum(j[2] > 0 for j in kps)}
        for ann_id, box, kps in people
    ]  # fmt: skip
    gt = {
        "images": [{"id": 1, "file_name": "1.jpg", "width": 400, "height": 400}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path


THREE = JointSet(name="three", joints=("head", "hand", "foot"), flip_pairs=(), skeleton=())


def test_box_pck_counts_over_people_per_joint_and_at_its_radius(tmp_path):
    """Two people, boxes 80 x 40 and 30 x 100, so the radius is 0.25 x 80 = 20 and 0.25 x 100 = 25
    px (0.2 x ... = 16 and 20 at the default alpha). A labelled joint with v = 1 (occluded) counts
    as labelled; v = 0 does not. Hits and counts written out per joint:

    person 7:  head 20 px off (v=2)  -> hit at 0.25 (exactly on the radius), miss at 0.2
               hand 0 px (v=1)       -> hit;  foot 0 px (v=0) -> not labelled
    person 9:  head 0 px (v=2) -> hit; hand 30 px (v=2) -> miss; foot 10 px (v=1) -> hit
    """
    path = _box_pck_ground_truth(
        tmp_path,
        [
            (7, [0, 0, 80, 40], [[10, 10, 2], [50, 20, 1], [70, 30, 0]]),
            (9, [100, 100, 30, 100], [[110, 110, 2], [120, 150, 2], [115, 190, 1]]),
        ],
    )
    pred = np.array([[[30, 10], [50, 20], [70, 30]], [[110, 110], [150, 150], [125, 190]]], dtype=np.float64)
    stats = box_pck(path, pred, np.array([7, 9]), THREE, alpha=0.25)
    assert stats["alpha"] == 0.25
    assert stats["PCK"] == 4 / 5
    assert (stats["PCK/head"], stats["PCK/hand"], stats["PCK/foot"]) == (1.0, 0.5, 1.0)
    default = box_pck(path, pred, np.array([7, 9]), THREE)  # alpha 0.2: person 7's head is out
    assert default["alpha"] == 0.2 and default["PCK"] == 3 / 5 and default["PCK/head"] == 0.5


def test_box_pck_with_one_labelled_joint_and_its_refusals(tmp_path):
    one = _box_pck_ground_truth(tmp_path, [(3, [0, 0, 50, 50], [[10, 10, 2], [0, 0, 0], [0, 0, 0]])])
    stats = box_pck(one, np.array([[[12.0, 10.0], [0, 0], [0, 0]]]), np.array([3]), THREE)
    assert stats["PCK"] == 1.0 and stats["PCK/head"] == 1.0
    assert math.isnan(stats["PCK/hand"]) and math.isnan(stats["PCK/foot"])
    with pytest.raises(
        ValueError, match=r"^prediction for annotation 4, which the ground truth does not have$"
    ):
        box_pck(one, np.zeros((1, 3, 2)), np.array([4]), THREE)
    none = _box_pck_ground_truth(tmp_path, [(3, [0, 0, 50, 50], [[0, 0, 0]] * 3)])
    with pytest.raises(ValueError, match=r"^no labelled joints in the ground truth: PCK is undefined$"):
        box_pck(none, np.zeros((1, 3, 2)), np.array([3]), THREE)


def test_format_table_is_one_header_line_and_one_value_line():
    stats = {k: i / 8 for i, k in enumerate(STAT_KEYS)}
    assert format_table(stats) == (
        "    AP   AP50   AP75    APm    APl     AR   AR50   AR75    ARm    ARl\n"
        "0.0000 0.1250 0.2500 0.3750 0.5000 0.6250 0.7500 0.8750 1.0000 1.1250"
    )


def test_crowd_split_stats_prints_pycocotools_tables_only_when_verbose(tmp_path, capsys):
    """verbose (the default) puts pycocotools' tables on stdout: the overall one, not the bins';
    verbose=False keeps stdout clean. An empty bin's AP is NaN (a float, not None)."""
    from pnfs.evaluate.coco import crowd_split_stats
    from tests.test_crowdpose import write_ground_truth_and_results

    gt_path, res_path = write_ground_truth_and_results(tmp_path)
    sigmas = joint_sigmas(CROWDPOSE)
    capsys.readouterr()
    loud = crowd_split_stats(gt_path, res_path, sigmas)
    assert capsys.readouterr().out.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all") == 1
    quiet = crowd_split_stats(gt_path, res_path, sigmas, verbose=False)
    assert capsys.readouterr().out == ""
    assert quiet == loud and quiet["AP50"] == pytest.approx(1.0)
    gt = json.loads(gt_path.read_text())
    gt["images"][1]["crowdIndex"] = 0.1  # the medium image becomes easy: no medium image left
    gt_path.write_text(json.dumps(gt))
    empty = crowd_split_stats(gt_path, res_path, sigmas, verbose=False)
    assert isinstance(empty["AP_medium"], float) and math.isnan(empty["AP_medium"])
    assert empty["AP_easy"] == pytest.approx(1.0)


def test_command_line_usage_and_required_files(shared_data, tmp_path, capsys):
    """--help names the module and the docstring's first line; a missing --annotations or
    --results is argparse's usage error (exit 2), not a crash further down."""
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    words = " ".join(capsys.readouterr().out.split())  # argparse wraps at the terminal's width
    assert words.startswith(
        "usage: python -m pnfs.evaluate.coco [-h] --annotations ANNOTATIONS --results RESULTS"
    )
    assert " COCO keypoint evaluation: results from predictions, rescoring, OKS-NMS, pycocotools. " in words
    gt_path = shared_data / "coco_sample" / "test_coco.json"
    for argv, missing in (
        (["--results", str(tmp_path / "res.json")], "--annotations"),
        (["--annotations", str(gt_path)], "--results"),
    ):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 2
        assert f"the following arguments are required: {missing}" in capsys.readouterr().err


def test_command_line_json_prints_one_line_and_the_table_prints_pycocotools_too(
    shared_data, tmp_path, capsys
):
    """--json: stdout is the one JSON line (pycocotools' chatter goes to stderr); without it
    pycocotools' chatter and table come first, then ours."""
    gt_path = shared_data / "coco_sample" / "test_coco.json"
    _, anns = _gt_people(gt_path)
    res = tmp_path / "res.json"
    res.write_text(json.dumps(_results(anns, 3.0)))
    capsys.readouterr()
    assert main(["--annotations", str(gt_path), "--results", str(res), "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and round(json.loads(lines[0])["AP"], 4) == 0.8016
    assert main(["--annotations", str(gt_path), "--results", str(res)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        sum(line.startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all") for line in lines) == 1
    )
    assert lines[-2].split() == list(STAT_KEYS) and lines[-1].split()[0] == "0.8016"


def test_command_line_keypoints_yaml_brings_its_sigmas(shared_data, tmp_path, capsys):
    """--keypoints with a YAML of COCO's 17 joints and three times COCO's sigmas scores the
    jittered people with those sigmas: the AP of evaluate_keypoints(sigmas=3 x COCO's)."""
    import yaml

    names = list(COCO.joints)
    wide = {
        "name": "coco_wide",
        "joints": names,
        "flip_pairs": [[names[a], names[b]] for a, b in COCO.flip_pairs],
        "skeleton": [[names[a], names[b]] for a, b in COCO.skeleton],
        "sigmas": [3 * s for s in COCO.sigmas],
        "parts": {"body": names},
    }
    path = tmp_path / "wide.yaml"
    path.write_text(yaml.safe_dump(wide, sort_keys=False))
    gt_path = shared_data / "coco_sample" / "test_coco.json"
    _, anns = _gt_people(gt_path)
    res = tmp_path / "res.json"
    res.write_text(json.dumps(_results(anns, 3.0)))
    want = evaluate_keypoints(gt_path, _results(anns, 3.0), sigmas=SIGMAS * 3, verbose=False)["AP"]
    capsys.readouterr()
    assert (
        main(["--annotations", str(gt_path), "--results", str(res), "--keypoints", str(path), "--json"]) == 0
    )
    got = json.loads(capsys.readouterr().out)["AP"]
    assert got == pytest.approx(want, abs=1e-12) and got > 0.8016 + 0.05


def test_command_line_crowdpose_table_is_its_seven_numbers(tmp_path, capsys):
    """Without --json a CrowdPose evaluation prints pycocotools' overall table and ends with its own
    two lines: the seven keys, each right-aligned in 9 characters, and their values with 4
    decimals. With --json stdout is the one JSON line."""
    from tests.test_crowdpose import write_ground_truth_and_results

    gt_path, res_path = write_ground_truth_and_results(tmp_path, shift=60.0)
    capsys.readouterr()
    assert main(["--annotations", str(gt_path), "--results", str(res_path), "--keypoints", "crowdpose"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2] == "       AP      AP50      AP75        AR   AP_easy AP_medium   AP_hard"
    values = lines[-1].split()
    assert len(lines[-1]) == 7 * 9 + 6 and values[4:6] == ["1.0000", "1.0000"] and float(values[6]) < 0.5
    overall = " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all"
    assert sum(line.startswith(overall) for line in lines) == 1  # pycocotools' overall table, not the bins'
    argv = ["--annotations", str(gt_path), "--results", str(res_path), "--keypoints", "crowdpose", "--json"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["AP_easy"] == pytest.approx(1.0)


def test_load_detections_keeps_which_boxes_and_refuses_by_file_and_index(tmp_path):
    """Category 1 at or above the threshold, as {image_id: int, bbox: 4 floats, score: float};
    every refusal names the file (and the entry's index)."""
    dets = [
        {"image_id": "4", "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5},  # at the threshold
        {"image_id": 4, "category_id": 1, "bbox": [5, 6, 7, 8], "score": math.nextafter(0.5, 0)},  # below
        {"image_id": 6, "category_id": 3, "bbox": [5, 6, 7, 8], "score": 0.9},  # not a person
        {"image_id": 7, "category_id": "1", "bbox": ["9", 10, 11.5, 12], "score": "0.75"},
    ]
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    kept = load_detections(path, score_threshold=0.5)
    assert kept == [
        {"image_id": 4, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5},
        {"image_id": 7, "bbox": [9.0, 10.0, 11.5, 12.0], "score": 0.75},
    ]
    assert all(type(d["image_id"]) is int and type(d["score"]) is float for d in kept)
    assert all(type(v) is float for d in kept for v in d["bbox"])
    assert len(load_detections(path)) == 3  # default threshold 0: every person box
    for text, message in (
        ("{not json", r"dets\.json: cannot read detections: Expecting property name"),
        ('{"image_id": 1}', r"dets\.json: expected a list of detections, got dict$"),
        (json.dumps([dets[0], {**dets[0], "bbox": [1, 2, 3]}]),
         r"dets\.json: detection 1: bbox must be \[x, y, w, h\], got \[1\.0, 2\.0, 3\.0\]$"),
        (json.dumps([{**dets[0], "image_id": None}]), r"dets\.json: detection 0 is malformed \(TypeError"),
        (json.dumps([{**dets[0], "score": "high"}]), r"dets\.json: detection 0 is malformed \(ValueError"),
    ):  # fmt: skip
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_detections(path)
    with pytest.raises(ValueError, match=r"missing\.json: cannot read detections: "):
        load_detections(tmp_path / "missing.json")


def test_evaluate_keypoints_refuses_a_foreign_joint_count_on_either_side(shared_data, tmp_path):
    """The joint-count check reads the first non-empty keypoints of each side: the annotations
    (a box-only person with ``keypoints: []`` first is skipped) and then the results."""
    gt_path = shared_data / "coco_sample" / "test_coco.json"
    data, anns = _gt_people(gt_path)
    short = [{**r, "keypoints": r["keypoints"][: 3 * 14]} for r in _results(anns, 0.0)]
    with pytest.raises(
        ValueError, match=r"^the results hold 14 keypoints per person, the keypoint set scores 17: "
    ):
        evaluate_keypoints(gt_path, short, verbose=False)
    first = min(data["annotations"], key=lambda a: a["id"])
    data["annotations"] = [
        {**first, "id": 1, "keypoints": [], "num_keypoints": 0},
        *({**a, "id": a["id"] + 10, "keypoints": a["keypoints"][: 3 * 14]} for a in data["annotations"]),
    ]
    other = tmp_path / "gt14.json"
    other.write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=r"^the annotations hold 14 keypoints per person, the keypoint set scores 17"
    ):
        evaluate_keypoints(other, _results(anns, 0.0), verbose=False)


def test_evaluate_keypoints_prints_by_default_and_refuses_odd_results(shared_data, tmp_path, capsys):
    gt_path = shared_data / "coco_sample" / "test_coco.json"
    _, anns = _gt_people(gt_path)
    capsys.readouterr()
    evaluate_keypoints(gt_path, _results(anns, 0.0))  # verbose by default: pycocotools' table on stdout
    assert " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"^no keypoint results to evaluate \(the list is empty\)$"):
        evaluate_keypoints(gt_path, [], verbose=False)
    res = tmp_path / "res.json"
    res.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match=r"res\.json: expected a list of results, got dict$"):
        evaluate_keypoints(gt_path, res, verbose=False)


def test_unknown_image_ids_are_listed_ten_at_most_whatever_their_type(shared_data, tmp_path, capsys):
    """Results naming images the annotations lack: the first ten unknown ids, sorted as text (a
    string id beside int ids is named too, not a TypeError)."""
    gt_path = shared_data / "coco_sample" / "test_coco.json"
    _, anns = _gt_people(gt_path)
    one = _results(anns, 0.0)[0]
    strangers = [{**one, "image_id": 1000001 + i} for i in range(12)]
    want = str(list(range(1000001, 1000011)))
    with pytest.raises(
        ValueError, match=rf"^results name image ids not in the annotations: {re.escape(want)}$"
    ):
        evaluate_keypoints(gt_path, strangers, verbose=False)
    mixed = [{**one, "image_id": "x"}, {**one, "image_id": 1000001}]
    with pytest.raises(
        ValueError, match=r"^results name image ids not in the annotations: \[1000001, 'x'\]$"
    ):
        evaluate_keypoints(gt_path, mixed, verbose=False)


def test_ground_truth_loading_talks_to_stderr_and_a_missing_file_is_named(shared_data, tmp_path, capsys):
    from pnfs.evaluate.coco import load_ground_truth

    capsys.readouterr()
    gt = load_ground_truth(shared_data / "coco_sample" / "test_coco.json")
    assert load_ground_truth(gt) is gt  # an already-loaded COCO is taken as it is
    out, err = capsys.readouterr()
    assert out == "" and "loading annotations into memory" in err
    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError, match=rf"^COCO annotations '{re.escape(str(missing))}' not found$"):
        load_ground_truth(missing)
