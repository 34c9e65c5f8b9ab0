"""MPII inputs by hand: head sizes from each annotation's ``headbox``, every refusal of a bad
annotation, head-size or predictions file naming the file and what is wrong, and the edge
cases of ``pckh`` (no visible joint, sub-pixel head sizes, (x, y, score) rows)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from pnfs.evaluate.mpii import load_mpii_ground_truth, pckh, predictions_array


def _person(image: str = "a.jpg", headbox=None) -> dict:
    person = {"image": image, "joints": [[j + 1.0, 2 * j + 1.0] for j in range(16)], "joints_vis": [1] * 16}
    if headbox is not None:
        person["headbox"] = headbox
    return person


def _write(path, value) -> str:
    path.write_text(json.dumps(value))
    return str(path)


def test_head_sizes_from_the_annotations_head_boxes(tmp_path):
    ann = _write(tmp_path / "valid.json", [_person(headbox=[0, 0, 3, 4]), _person("b.jpg", [10, 10, 16, 18])])
    gt = load_mpii_ground_truth(ann)
    np.testing.assert_allclose(gt.head_size, [0.6 * 5, 0.6 * 10])
    assert gt.images == ["a.jpg", "b.jpg"] and gt.joints.shape == (2, 16, 2)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "cannot read MPII annotations"),
        ("[]", "expected a non-empty list of persons"),
        ('{"image": "a.jpg"}', "expected a non-empty list of persons"),
        ('[{"image": "a.jpg"}]', "person 0 is malformed (KeyError('joints'))"),
        (
            json.dumps([{**_person(), "joints_vis": [1] * 15}]),
            "person 0: joints must be 16x2 and joints_vis 16",
        ),
        (
            json.dumps([{**_person(), "joints": [[1, 2]] * 15}]),
            "person 0: joints must be 16x2 and joints_vis 16",
        ),
    ],
)
def test_bad_annotations_are_named(tmp_path, content, message):
    path = tmp_path / "valid.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        load_mpii_ground_truth(path)


def test_bad_head_size_files_are_named(tmp_path):
    ann = _write(tmp_path / "valid.json", [_person(), _person("b.jpg")])
    heads = tmp_path / "heads.json"
    heads.write_text("not json")
    with pytest.raises(ValueError, match=re.escape(f"{heads}: cannot read head sizes")):
        load_mpii_ground_truth(ann, heads)
    for value in ([{"head_size": 1.0}], {"a.jpg": 1.0}):
        _write(heads, value)
        with pytest.raises(
            ValueError, match=re.escape(f"{heads}: expected a list of 2 head sizes (one per person of {ann})")
        ):
            load_mpii_ground_truth(ann, heads)
    _write(heads, [{"image": "a.jpg", "head_size": 1.0}, {"image": "c.jpg", "head_size": 2.0}])
    with pytest.raises(
        ValueError, match=re.escape(f"{heads}: entry 1 is for image 'c.jpg', annotation 1 for 'b.jpg'")
    ):
        load_mpii_ground_truth(ann, heads)
    _write(heads, [{"head_size": 1.5}, {"image": "b.jpg", "head_size": 2.5}])  # the image may be left out
    np.testing.assert_allclose(load_mpii_ground_truth(ann, heads).head_size, [1.5, 2.5])


def test_bad_predictions_are_named():
    row = {"ann_id": 0, "keypoints": [[1.0, 2.0, 0.9]] * 16}
    with pytest.raises(ValueError, match=re.escape("preds: entry 1 is malformed (KeyError('keypoints'))")):
        predictions_array([row, {"ann_id": 1}], 2, "preds")
    with pytest.raises(ValueError, match=re.escape("preds: entry 1: ann_id 2 is out of range or repeated")):
        predictions_array([row, {**row, "ann_id": 2}], 2, "preds")
    with pytest.raises(ValueError, match=re.escape("preds: entry 1: ann_id 0 is out of range or repeated")):
        predictions_array([row, row], 2, "preds")
    with pytest.raises(
        ValueError, match=re.escape("preds: no prediction for persons [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]")
    ):
        predictions_array([row], 12, "preds")
    got = predictions_array([{"ann_id": 0, "keypoints": [[j, 2 * j, 0.5] for j in range(16)]}], 1)
    assert got.dtype == np.float64 and got.shape == (1, 16, 2)
    np.testing.assert_array_equal(got[0, :, 1], 2 * np.arange(16))
    two_columns = predictions_array([{"ann_id": 0, "keypoints": [[j, 2 * j] for j in range(16)]}], 1)
    np.testing.assert_array_equal(two_columns, got)


def test_pckh_ignores_a_score_column_and_takes_sub_pixel_head_sizes():
    gt = np.zeros((1, 16, 3))
    pred = np.zeros((1, 16, 3))
    pred[..., 2] = 5.0  # a score, not a coordinate
    per_joint, mean = pckh(pred, gt, np.ones((1, 16)), np.array([0.5]), 0.5)
    assert mean == 100.0 and np.all(per_joint == 100.0)


def test_pckh_without_a_visible_joint_is_nan():
    per_joint, mean = pckh(np.zeros((1, 16, 2)), np.zeros((1, 16, 2)), np.zeros((1, 16)), np.ones(1), 0.5)
    assert np.isnan(mean) and np.isnan(per_joint).all()


@pytest.mark.parametrize(
    ("gt_shape", "head_shape"), [((1, 16, 2), (2,)), ((2, 16, 2), (1,)), ((1, 15, 2), (1,))]
)
def test_pckh_refuses_each_mismatched_shape(gt_shape, head_shape):
    with pytest.raises(ValueError, match=r"pckh: expected pred/gt \[N, 16, 2\]"):
        pckh(np.zeros((1, 16, 2)), np.zeros(gt_shape), np.ones((1, 16)), np.ones(head_shape), 0.5)


def test_pckh_names_the_person_with_a_bad_head_size():
    with pytest.raises(ValueError, match=re.escape("pckh: head sizes must be > 0; person 1 has -2.0")):
        pckh(np.zeros((2, 16, 2)), np.zeros((2, 16, 2)), np.ones((2, 16)), np.array([1.0, -2.0]), 0.5)


def test_pckh_with_one_visible_joint():
    visible = np.zeros((1, 16))
    visible[0, 0] = 1  # one head top: 1 of 1 correct
    per_joint, mean = pckh(np.zeros((1, 16, 2)), np.zeros((1, 16, 2)), visible, np.ones(1), 0.5)
    assert mean == 100.0 and per_joint[0] == 100.0 and np.isnan(per_joint[1:]).all()
