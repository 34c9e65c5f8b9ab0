"""pnfs.data.annotations.records: the sample key, the skip report (counts, first ids, merging,
the copy it hands out) and the reason names the manifest's ``skipped`` / ``filtered`` carry."""

from __future__ import annotations

import numpy as np

from pnfs.data.annotations import records as R
from pnfs.data.annotations.records import PersonRecord, SkipReport


def test_the_sample_key_is_image_id_then_ann_id_and_a_gt_box_scores_one():
    rec = PersonRecord("a.jpg", 37, 4, np.zeros(4), np.zeros((17, 3)), 1.0)
    assert rec.key == "37_4"
    assert rec.score == 1.0


def test_the_reason_names_are_the_ones_docs_data_md_lists():
    """Manifest keys users read (docs/data.md, "Output in --out"): spelled out here by hand."""
    skipped = [
        R.MISSING_IMAGE,
        R.UNREADABLE_IMAGE,
        R.TRUNCATED_JPEG,
        R.CORRUPT_JPEG,
        R.BOX_OUTSIDE_IMAGE,
        R.ZERO_AREA_BOX,
        R.BAD_COORDINATES,
        R.WRONG_KEYPOINT_COUNT,
        R.MALFORMED_ANNOTATION,
    ]
    assert skipped == [
        "missing_image",
        "unreadable_image",
        "truncated_jpeg",
        "corrupt_jpeg",
        "box_outside_image",
        "zero_area_box",
        "bad_coordinates",
        "wrong_keypoint_count",
        "malformed_annotation",
    ]
    filtered = [
        R.FILTER_CROWD,
        R.FILTER_NO_AREA,
        R.FILTER_NO_KEYPOINTS,
        R.FILTER_LOW_SCORE,
        R.FILTER_NOT_PERSON,
    ]
    assert filtered == [
        "iscrowd",
        "area_not_positive",
        "no_labelled_keypoints",
        "detection_score_below_threshold",
        "not_person_category",
    ]


def test_a_skip_report_counts_by_reason_in_first_seen_order_and_keeps_ten_ids_as_text():
    report = SkipReport()
    for i in range(12):
        report.add("b", i)
    report.add("a", "x", count=3)
    assert report.to_dict() == {
        "b": {"count": 12, "first_ids": [str(i) for i in range(10)]},
        "a": {"count": 3, "first_ids": ["x"]},
    }
    assert list(report.to_dict()) == ["b", "a"]
    assert report.total() == 15
    assert SkipReport().total() == 0 and SkipReport().to_dict() == {}


def test_keep_ids_is_the_number_of_ids_kept_at_its_edge():
    report = SkipReport(keep_ids=2)
    report.add("r", 1)
    assert report.first_ids["r"] == ["1"]
    report.add("r", 2)
    assert report.first_ids["r"] == ["1", "2"]
    report.add("r", 3)
    assert report.first_ids["r"] == ["1", "2"]
    assert report.counts["r"] == 3


def test_merge_adds_counts_and_fills_ids_up_to_keep_ids_from_a_report_or_its_dict():
    mine = SkipReport(keep_ids=4)
    mine.add("a", "m1")
    mine.add("a", "m2")
    theirs = SkipReport(keep_ids=10)
    for i in range(5):
        theirs.add("a", f"t{i}")
    theirs.add("b", "t-b", count=2)
    mine.merge(theirs)
    assert mine.to_dict() == {
        "a": {"count": 7, "first_ids": ["m1", "m2", "t0", "t1"]},
        "b": {"count": 2, "first_ids": ["t-b"]},
    }
    # a report read back from a manifest: a dict, its count as the json number gave it
    mine.merge(
        {"b": {"count": 3.0, "first_ids": ["j1", "j2", "j3", "j4"]}, "c": {"count": 1, "first_ids": []}}
    )
    merged = mine.to_dict()
    assert merged["b"] == {"count": 5, "first_ids": ["t-b", "j1", "j2", "j3"]}
    assert type(merged["b"]["count"]) is int
    assert merged["c"] == {"count": 1, "first_ids": []}
    assert mine.total() == 13


def test_merge_into_a_full_list_of_ids_adds_none():
    mine = SkipReport(keep_ids=2)
    for i in range(3):
        mine.add("a", i)
    mine.merge({"a": {"count": 2, "first_ids": ["x", "y"]}})
    assert mine.to_dict() == {"a": {"count": 5, "first_ids": ["0", "1"]}}


def test_to_dict_hands_out_a_copy_of_the_ids():
    report = SkipReport()
    report.add("a", 1)
    report.to_dict()["a"]["first_ids"].append("changed outside")
    assert report.to_dict() == {"a": {"count": 1, "first_ids": ["1"]}}
