"""pnfs/data/bad_samples.py on its own (issue 26, mutation section of docs/testing.md): which
raw arrays a sample is refused for, the default ``data.max_bad_samples`` at its rounding edges,
the report's limit, cap and layout, and how the ranks' reports merge. The loader's path through
it (real shards with each kind of damage) is ``test_corrupt_data.py``."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pnfs.data.bad_samples import (
    BAD_ARRAYS,
    BAD_JPEG,
    BAD_JSON,
    TRUNCATED_SHARD,
    BadSample,
    BadSampleError,
    BadSampleReport,
    array_problem,
    default_limit,
    merge_rank_reports,
)

JOINTS = 3


def good_blobs(num_joints: int = JOINTS) -> dict[str, bytes]:
    """A sample's raw arrays at their documented sizes (docs/data.md), little-endian."""
    f4 = lambda n: np.arange(n, dtype="<f4").tobytes()
    return {
        "kp.f32": f4(3 * num_joints),
        "bbox.f32": f4(4),
        "c2i.f32": f4(6),
        "score.f32": f4(1),
        "ids.i64": np.array([7, 9], dtype="<i8").tobytes(),
    }


def test_the_reason_names_stay():
    assert (BAD_JPEG, BAD_ARRAYS, BAD_JSON, TRUNCATED_SHARD) == (
        "bad_jpeg",
        "bad_arrays",
        "bad_json",
        "truncated_shard",
    )


@pytest.mark.parametrize("num_joints", [1, 3, 17])
def test_arrays_of_the_right_sizes_and_finite_values_pass(num_joints):
    assert array_problem(good_blobs(num_joints), num_joints) is None


SIZES = {"kp.f32": 12 * JOINTS, "bbox.f32": 16, "c2i.f32": 24, "score.f32": 4, "ids.i64": 16}


@pytest.mark.parametrize("ext", sorted(SIZES))
def test_a_missing_array_is_named(ext):
    blobs = good_blobs()
    del blobs[ext]
    assert array_problem(blobs, JOINTS) == f"no {ext}"


@pytest.mark.parametrize("delta", [-4, 4])
@pytest.mark.parametrize("ext", sorted(SIZES))
def test_an_array_one_value_short_or_long_is_named_with_both_sizes(ext, delta):
    blobs = good_blobs()
    blobs[ext] = blobs[ext][:delta] if delta < 0 else blobs[ext] + bytes(delta)
    size = SIZES[ext]
    assert array_problem(blobs, JOINTS) == f"{ext} has {size + delta} bytes, expected {size}"


def test_keypoints_sized_for_another_joint_set_are_refused():
    assert array_problem(good_blobs(num_joints=4), JOINTS) == "kp.f32 has 48 bytes, expected 36"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("ext", ["kp.f32", "bbox.f32", "c2i.f32", "score.f32"])
def test_a_non_finite_float_in_any_float_array_is_named(ext, bad):
    blobs = good_blobs()
    values = np.frombuffer(blobs[ext], "<f4").copy()
    values[-1] = bad
    blobs[ext] = values.astype("<f4").tobytes()
    assert array_problem(blobs, JOINTS) == f"{ext} holds NaN or inf"


def test_arrays_are_read_little_endian_and_the_ids_as_integers():
    """A little-endian NaN reads as a tiny finite number big-endian; an int64 id whose bytes
    would be NaN as float32 is a fine id."""
    blobs = good_blobs()
    nan_le = np.array([np.nan], dtype="<f4").tobytes()
    assert np.isfinite(np.frombuffer(nan_le, ">f4")).all()
    blobs["score.f32"] = nan_le
    assert array_problem(blobs, JOINTS) == "score.f32 holds NaN or inf"
    blobs = good_blobs()
    blobs["ids.i64"] = nan_le * 4  # 16 bytes that are NaN as float32
    assert array_problem(blobs, JOINTS) is None


@pytest.mark.parametrize(
    "epoch_samples, limit",
    [(0, 1), (1, 1), (999, 1), (1000, 1), (1001, 2), (2000, 2), (2001, 3), (149_813, 150), (1_000_000, 1000)],
)
def test_the_default_limit_is_a_thousandth_rounded_up_and_at_least_one(epoch_samples, limit):
    assert default_limit(epoch_samples) == limit


def bad(i: int, reason: str = BAD_JPEG, shard: str = "s-000.tar") -> BadSample:
    return BadSample(reason, shard, f"k{i:03d}", f"error {i}")


def test_a_bad_sample_reads_reason_shard_key_and_error():
    assert str(bad(4)) == "bad_jpeg: s-000.tar sample k004: error 4"


def test_the_report_stops_one_past_its_limit_naming_the_count_the_limit_and_the_latest():
    report = BadSampleReport(limit=3)
    for i in range(3):  # at the limit: still training
        report.add(bad(i, BAD_JSON if i == 1 else BAD_JPEG))
    assert report.total == 3 and report.counts == {BAD_JPEG: 2, BAD_JSON: 1}
    with pytest.raises(BadSampleError) as err:
        report.add(bad(3))
    assert str(err.value) == (
        "4 bad samples, more than data.max_bad_samples=3 ({'bad_jpeg': 3, 'bad_json': 1}); "
        "the latest: bad_jpeg: s-000.tar sample k003: error 3"
    )


def test_the_report_keeps_the_first_samples_and_counts_them_all():
    report = BadSampleReport(limit=100, keep=2)
    for i in range(5):
        report.add(bad(i))
    assert [s.key for s in report.samples] == ["k000", "k001"]
    assert report.total == 5
    assert BadSampleReport(limit=1).keep == 100  # the default cap
    default = BadSampleReport(limit=200)
    for i in range(101):
        default.add(bad(i))
    assert len(default.samples) == 100 and default.samples[-1].key == "k099"


def test_met_logs_each_dropped_sample_as_a_warning_and_adds_it(caplog):
    report = BadSampleReport(limit=5)
    with caplog.at_level(logging.WARNING, logger="pnfs.train"):
        report.met([bad(1), bad(2, BAD_ARRAYS)])
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("pnfs.train", logging.WARNING, "bad sample dropped: bad_jpeg: s-000.tar sample k001: error 1"),
        ("pnfs.train", logging.WARNING, "bad sample dropped: bad_arrays: s-000.tar sample k002: error 2"),
    ]
    assert report.counts == {BAD_JPEG: 1, BAD_ARRAYS: 1}


def test_the_report_layout():
    report = BadSampleReport(limit=5)
    report.add(bad(1))
    report.add(bad(2, TRUNCATED_SHARD))
    out = report.to_dict()
    assert out == {
        "total": 2,
        "counts": {BAD_JPEG: 1, TRUNCATED_SHARD: 1},
        "samples": [
            {"reason": BAD_JPEG, "shard": "s-000.tar", "key": "k001", "error": "error 1"},
            {"reason": TRUNCATED_SHARD, "shard": "s-000.tar", "key": "k002", "error": "error 2"},
        ],
    }
    out["counts"]["x"] = 1  # a copy: the report itself is not changed through it
    assert "x" not in report.counts


def report_of(*samples: BadSample) -> dict:
    r = BadSampleReport(limit=100)
    for s in samples:
        r.add(s)
    return r.to_dict()


def test_ranks_add_their_own_bad_samples_and_share_a_truncated_shards():
    """Every rank opens every shard, so a truncated shard's samples are met by each rank and
    count once (the largest rank count); jpeg/array/json damage is met by one rank and adds up."""
    cut_a = BadSample(TRUNCATED_SHARD, "s-001.tar", "k900", "ends at byte 10 (rank 0)")
    cut_a_again = BadSample(TRUNCATED_SHARD, "s-001.tar", "k900", "ends at byte 10 (rank 1)")
    cut_b = BadSample(TRUNCATED_SHARD, "s-001.tar", "k901", "ends at byte 10")
    rank0 = report_of(bad(1), cut_a, cut_b)
    rank1 = report_of(bad(2), bad(3, BAD_ARRAYS), cut_a_again)
    merged = merge_rank_reports([rank0, None, rank1, {}])
    assert merged["counts"] == {BAD_JPEG: 2, TRUNCATED_SHARD: 2, BAD_ARRAYS: 1}
    assert merged["total"] == 5
    keys = [(s["reason"], s["key"]) for s in merged["samples"]]
    assert keys == [
        (BAD_JPEG, "k001"),
        (TRUNCATED_SHARD, "k900"),
        (TRUNCATED_SHARD, "k901"),
        (BAD_JPEG, "k002"),
        (BAD_ARRAYS, "k003"),
    ]
    assert merged["samples"][1]["error"].endswith("(rank 0)")  # the first rank's copy is kept


def test_the_same_key_in_two_shards_or_for_two_reasons_is_two_samples():
    a = BadSample(BAD_JPEG, "https://a/train-000000.tar", "k1", "x")
    b = BadSample(BAD_JPEG, "https://b/train-000000.tar", "k1", "x")
    c = BadSample(BAD_ARRAYS, "https://a/train-000000.tar", "k1", "x")
    merged = merge_rank_reports([report_of(a), report_of(b, c)])
    assert len(merged["samples"]) == 3 and merged["counts"] == {BAD_JPEG: 2, BAD_ARRAYS: 1}


def test_no_reports_merge_to_an_empty_one():
    assert merge_rank_reports([]) == {"total": 0, "counts": {}, "samples": []}
    assert merge_rank_reports([None, None]) == {"total": 0, "counts": {}, "samples": []}
