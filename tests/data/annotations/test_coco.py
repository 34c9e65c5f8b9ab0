"""pnfs.data.annotations.coco: the reader widens a person's box to hold all its labelled
keypoints (the readers' bad-input cases run through data_prep/shard_coco.py in
tests/data_prep/test_shard_coco.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pnfs.data.annotations.coco import image_table, read_coco_detections, read_coco_persons, widen_box
from pnfs.data.annotations.records import SkipReport
from pnfs.keypoints import COCO, CROWDPOSE
from tests.data_prep.test_shard_coco import _person


def test_coco_reader_widens_the_box_to_the_keypoints():
    data = {
        "images": [{"id": 1, "file_name": "a.jpg"}],
        "annotations": [_person(bbox=(30.0, 30.0, 5.0, 5.0))],
    }
    (rec,) = read_coco_persons(data, SkipReport(), SkipReport())
    x, y, w, h = rec.bbox
    assert (x, y) == (20.0, 20.0) and x + w == 36.0 and y + h == 68.0


# ----------------------------------------------------------------------------- hand-made files

DROP = object()  # a field left out of the annotation


def annotation(**fields) -> dict:
    """A person of image 1: box (10, 20, 40, 80), joint j at (20 + j, 30 + 2 j) visible."""
    kps = []
    for j in range(17):
        kps += [20.0 + j, 30.0 + 2 * j, 2]
    out = {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 900.0}
    out.update(bbox=[10.0, 20.0, 40.0, 80.0], keypoints=kps)
    out.update(fields)
    return {k: v for k, v in out.items() if v is not DROP}


def coco(*annotations) -> dict:
    images = [
        {"id": 1, "file_name": "one.jpg"},
        {"id": 2, "file_name": "two.jpg"},
        "junk",
        {"file_name": "x"},
    ]
    return {"images": images, "annotations": list(annotations)}


def read(*annotations, joints=COCO):
    skipped, filtered = SkipReport(), SkipReport()
    people = read_coco_persons(coco(*annotations), skipped, filtered, joints)
    return people, skipped.to_dict(), filtered.to_dict()


def test_a_hand_made_annotation_becomes_one_record_with_every_field(tmp_path):
    kps = annotation()["keypoints"]
    kps[3 * 5 + 2] = 0  # joint 5 unlabelled, its numbers (even negative ones) not read
    kps[3 * 5] = -7.0
    kps[3 * 16 + 2] = 1  # occluded: labelled
    path = tmp_path / "person_keypoints_val.json"
    path.write_text(json.dumps(coco(annotation(id=11, image_id=2, keypoints=kps, area=123))))
    skipped, filtered = SkipReport(), SkipReport()
    (rec,) = read_coco_persons(path, skipped, filtered)  # from a file, the same as from a dict
    assert skipped.to_dict() == filtered.to_dict() == {}
    assert (rec.image_file, rec.image_id, rec.ann_id, rec.key) == ("two.jpg", 2, 11, "2_11")
    assert rec.area == 123.0 and type(rec.area) is float and rec.score == 1.0
    np.testing.assert_array_equal(rec.keypoints, np.asarray(kps, dtype=np.float64).reshape(17, 3))
    # box (10, 20)-(50, 100) widened to the labelled joints: x up to 20 + 16 = 36, y to 30 + 32 = 62
    np.testing.assert_array_equal(rec.bbox, [10.0, 20.0, 40.0, 80.0])
    (wide,), _, _ = read(annotation(bbox=[25.0, 40.0, 5.0, 5.0]))
    np.testing.assert_array_equal(wide.bbox, [20.0, 30.0, 16.0, 32.0])


def test_widen_box_without_labelled_keypoints_keeps_the_box_and_reaches_each_side():
    box = np.array([10.0, 20.0, 5.0, 6.0])
    none = np.array([[100.0, 100.0, 0.0], [-5.0, -5.0, 0.0]])
    np.testing.assert_array_equal(widen_box(box, none), box)
    kp = np.array([[12.0, 21.0, 2.0], [30.0, 22.0, 1.0], [11.0, 50.0, 2.0], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(widen_box(box, kp), [10.0, 20.0, 20.0, 30.0])  # right and bottom
    kp = np.array([[2.0, 21.0, 2.0], [12.0, 3.0, 2.0]])
    np.testing.assert_array_equal(widen_box(box, kp), [2.0, 3.0, 13.0, 23.0])  # left and top


def test_image_table_keeps_entries_with_an_id():
    assert image_table(coco()) == {1: {"id": 1, "file_name": "one.jpg"}, 2: {"id": 2, "file_name": "two.jpg"}}
    assert image_table({}) == {}


@pytest.mark.parametrize("data", [[], {"images": []}, {"annotations": {}}])
def test_not_a_coco_file_is_refused_naming_it(tmp_path, data):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"{path}: not a COCO annotation file"):
        read_coco_persons(path, SkipReport(), SkipReport())


@pytest.mark.parametrize(
    ("fields", "reason", "ident"),
    [
        ({"bbox": [10.0, 20.0, 40.0]}, "malformed_annotation", "11"),
        ({"bbox": [10.0, 20.0, 40.0, "80"]}, "malformed_annotation", "11"),
        ({"bbox": [10.0, 20.0, 40.0, True]}, "malformed_annotation", "11"),
        ({"bbox": "10 20 40 80"}, "malformed_annotation", "11"),
        ({"bbox": DROP}, "malformed_annotation", "11"),
        ({"keypoints": DROP}, "malformed_annotation", "11"),
        ({"image_id": "1"}, "malformed_annotation", "11"),
        ({"image_id": 7}, "malformed_annotation", "11"),
        ({"id": 11.0}, "malformed_annotation", "11.0"),
        ({"id": DROP}, "malformed_annotation", "#0"),
        ({"image_id": 3}, "malformed_annotation", "11"),  # image 3 has no file_name
        ({"keypoints": [1.0, 2.0, 2] * 16}, "wrong_keypoint_count", "11"),
        ({"keypoints": [1.0, 2.0, 2] * 18}, "wrong_keypoint_count", "11"),
        ({"bbox": [-0.5, 20.0, 40.0, 80.0]}, "bad_coordinates", "11"),
        ({"bbox": [10.0, 20.0, float("inf"), 80.0]}, "bad_coordinates", "11"),
        ({"keypoints": [20.0, float("nan"), 2] * 17}, "bad_coordinates", "11"),
        ({"keypoints": [-1.0, 5.0, 1] * 17}, "bad_coordinates", "11"),
        ({"bbox": [10.0, 20.0, 0.0, 80.0]}, "zero_area_box", "11"),
        ({"bbox": [10.0, 20.0, 40.0, 0.0]}, "zero_area_box", "11"),
    ],
)
def test_each_bad_annotation_is_skipped_by_its_reason_and_the_good_one_kept(fields, reason, ident):
    """The bad one comes first: the good one after it is still read."""
    people, skipped, filtered = read(annotation(**{"id": 11, **fields}), annotation())
    assert [p.ann_id for p in people] == [10]
    assert skipped == {reason: {"count": 1, "first_ids": [ident]}} and filtered == {}


def test_an_annotation_that_is_not_an_object_is_skipped_by_its_position():
    data = coco(["not", "a", "dict"], annotation())
    skipped, filtered = SkipReport(), SkipReport()
    assert [p.ann_id for p in read_coco_persons(data, skipped, filtered)] == [10]
    assert skipped.to_dict() == {"malformed_annotation": {"count": 1, "first_ids": ["#0"]}}


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"category_id": 2}, "not_person_category"),
        ({"iscrowd": 1}, "iscrowd"),
        ({"area": 0}, "area_not_positive"),
        ({"area": -3.0}, "area_not_positive"),
        ({"area": "big"}, "area_not_positive"),
        ({"area": DROP, "bbox": [10.0, 20.0, 0.0, 80.0]}, "area_not_positive"),  # w x h = 0
        ({"keypoints": [20.0, 30.0, 0] * 17}, "no_labelled_keypoints"),
    ],
)
def test_each_filtered_person_is_counted_by_its_reason(fields, reason):
    people, skipped, filtered = read(annotation(id=11, **fields), annotation())
    assert [p.ann_id for p in people] == [10]
    assert filtered == {reason: {"count": 1, "first_ids": ["11"]}} and skipped == {}


def test_defaults_of_a_terse_annotation_person_not_crowd_area_from_the_box():
    """No category_id, no iscrowd, no area (CrowdPose's files): a person, w x h as its area."""
    (rec,), skipped, filtered = read(annotation(category_id=DROP, iscrowd=DROP, area=DROP))
    assert skipped == filtered == {}
    assert rec.area == 40.0 * 80.0
    (rec,), _, _ = read(annotation(area=1e-9))  # only area > 0 is asked
    assert rec.area == 1e-9


def test_a_coordinate_at_zero_is_kept():
    kps = [0.0, 0.0, 2] + [20.0, 30.0, 2] * 16
    (rec,), skipped, _ = read(annotation(bbox=[0.0, 0.0, 40.0, 80.0], keypoints=kps))
    assert skipped == {}
    np.testing.assert_array_equal(rec.bbox, [0.0, 0.0, 40.0, 80.0])


def test_the_joint_set_sets_the_keypoint_count():
    kps = [20.0, 30.0, 2] * 14
    (rec,), skipped, _ = read(annotation(keypoints=kps), joints=CROWDPOSE)
    assert skipped == {}
    np.testing.assert_array_equal(rec.keypoints, np.tile([20.0, 30.0, 2.0], (14, 1)))
    people, skipped, _ = read(annotation(keypoints=kps))  # 14 joints are not COCO's 17
    assert people == [] and skipped == {"wrong_keypoint_count": {"count": 1, "first_ids": ["10"]}}


# ----------------------------------------------------------------------------- detections


def detection(**fields) -> dict:
    out = {"image_id": 1, "category_id": 1, "bbox": [5.0, 6.0, 30.0, 40.0], "score": 0.5}
    out.update(fields)
    return {k: v for k, v in out.items() if v is not DROP}


def read_dets(dets, threshold=None, joints=COCO):
    skipped, filtered = SkipReport(), SkipReport()
    extra = {} if threshold is None else {"score_threshold": threshold}
    people = read_coco_detections(dets, coco(), skipped, filtered, joints=joints, **extra)
    return people, skipped.to_dict(), filtered.to_dict()


def test_a_detection_becomes_a_record_with_its_index_score_and_unlabelled_keypoints(tmp_path):
    dets = [detection(image_id=2, score=0.25), detection(score=0, bbox=[0, 0, 2, 3])]
    det_path, ann_path = tmp_path / "dets.json", tmp_path / "ann.json"
    det_path.write_text(json.dumps(dets))
    ann_path.write_text(json.dumps(coco()))
    first, second = read_coco_detections(det_path, ann_path, SkipReport(), SkipReport())  # threshold 0
    assert (first.image_file, first.image_id, first.ann_id, first.key) == ("two.jpg", 2, 0, "2_0")
    assert first.score == 0.25 and first.area == 30.0 * 40.0
    np.testing.assert_array_equal(first.bbox, [5.0, 6.0, 30.0, 40.0])
    assert first.bbox.dtype == np.float64
    np.testing.assert_array_equal(first.keypoints, np.zeros((17, 3)))
    assert (second.ann_id, second.score, second.area) == (1, 0.0, 6.0)
    (crowd,), _, _ = read_dets([detection()], joints=CROWDPOSE)
    np.testing.assert_array_equal(crowd.keypoints, np.zeros((14, 3)))
    (scoreless,), _, _ = read_dets([detection(score=DROP)])
    assert scoreless.score == 1.0


def test_the_score_threshold_keeps_a_score_equal_to_it():
    dets = [detection(score=0.49), detection(score=0.5), detection(score=0.51)]
    people, skipped, filtered = read_dets(dets, threshold=0.5)
    assert [p.ann_id for p in people] == [1, 2] and skipped == {}
    assert filtered == {"detection_score_below_threshold": {"count": 1, "first_ids": ["det#0"]}}


def test_a_detection_list_that_is_not_a_list_is_refused_naming_it(tmp_path):
    path = tmp_path / "dets.json"
    path.write_text('{"bbox": [1, 2, 3, 4]}')
    with pytest.raises(ValueError, match=f"{path}: not a COCO detection-result list"):
        read_coco_detections(path, coco(), SkipReport(), SkipReport())


@pytest.mark.parametrize(
    ("det", "reason"),
    [
        ("a box", "malformed_annotation"),
        (detection(bbox=[1.0, 2.0, 3.0]), "malformed_annotation"),
        (detection(bbox=DROP), "malformed_annotation"),
        (detection(image_id=9), "malformed_annotation"),
        (detection(image_id=DROP), "malformed_annotation"),
        (detection(score="high"), "malformed_annotation"),
        (detection(category_id=3), "not_person_category"),
        (detection(score=float("nan")), "bad_coordinates"),
        (detection(score=-0.1), "bad_coordinates"),
        (detection(bbox=[5.0, -1.0, 30.0, 40.0]), "bad_coordinates"),
        (detection(bbox=[5.0, 6.0, 0.0, 40.0]), "zero_area_box"),
        (detection(bbox=[5.0, 6.0, 30.0, 0.0]), "zero_area_box"),
    ],
)
def test_each_bad_detection_is_counted_by_its_reason_and_index(det, reason):
    people, skipped, filtered = read_dets([det, detection()])  # the good one after the bad one
    assert [p.ann_id for p in people] == [1]
    assert {**skipped, **filtered} == {reason: {"count": 1, "first_ids": ["det#0"]}}
    assert (reason in filtered) == (reason == "not_person_category")


def test_a_box_under_one_pixel_wide_or_high_is_kept_and_a_detection_needs_no_category():
    """Only a side <= 0 is a zero-area box; a detection without category_id is a person."""
    kps = [20.0, 30.0, 2] * 17
    people, skipped, _ = read(annotation(bbox=[20.0, 30.0, 0.5, 0.5], keypoints=kps))
    assert skipped == {} and len(people) == 1
    np.testing.assert_array_equal(people[0].bbox, [20.0, 30.0, 0.5, 0.5])
    thin = [detection(bbox=[5.0, 6.0, 0.5, 40.0]), detection(bbox=[5.0, 6.0, 30.0, 0.5], category_id=DROP)]
    people, skipped, filtered = read_dets(thin)
    assert [p.ann_id for p in people] == [0, 1] and skipped == filtered == {}
