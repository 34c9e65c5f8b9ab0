"""``plan_reader.py`` on a hand-made shard: the batches of a hand-made plan, each kind of bad
sample replaced by the next spare of the epoch stream (wrapping round) with its reason and error,
``on_error=raise``, a rank whose every sample is bad, and the DataLoader both loaders share.

The shard is one tar written here with :mod:`tarfile`: sample ``s`` has 3 joints, image id
``100 + s``, annotation id ``200 + s``, a 16 x 12 JPEG of one grey level ``20 * s`` and the raw
arrays of docs/data.md; a sample can be written with a member left out or replaced.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import simplejpeg
import torch

from pnfs.data.bad_samples import BadSample, BadSampleError
from pnfs.data.geometry import Augment
from pnfs.data.loaders.assemble import batch_geometry
from pnfs.data.loaders.plan_reader import (
    PlanReader,
    fork_safe_opencv,
    json_problem,
    plan_dataloader,
    worker_init,
)
from pnfs.data.plan import EpochPlan
from pnfs.data.shards.reader import ShardSet, parse_meta

FLIP = [0, 2, 1]  # 3 joints: 1 and 2 are a left/right pair
SIZE = (32, 24)  # input (H, W)


def sample(s: int, **change: bytes | None) -> dict[str, bytes]:
    """The members of sample s (``change``: ext -> new bytes, or None to leave the member out)."""
    kp = np.array([[4 + s, 5, 2], [6, 7 + s, 1], [8, 9, 0]], "<f4")
    members = {
        "jpg": simplejpeg.encode_jpeg(np.full((16, 12, 3), 20 * s, np.uint8)),
        "json": json.dumps({"image": f"{100 + s}.jpg"}).encode(),
        "kp.f32": kp.tobytes(),
        "bbox.f32": np.array([10 + s, 20, 12, 16], "<f4").tobytes(),
        "c2i.f32": np.array([[1, 0, 8 + s], [0, 1, 18]], "<f4").tobytes(),
        "score.f32": np.array([0.5 + s / 10], "<f4").tobytes(),
        "ids.i64": np.array([100 + s, 200 + s], "<i8").tobytes(),
    }
    for ext, data in change.items():
        ext = ext.replace("_", ".")
        if data is None:
            del members[ext]
        else:
            members[ext] = data
    return members


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for s, members in enumerate(samples):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{100 + s}_{200 + s}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def plan(batches: list[list[int]], stream: int) -> EpochPlan:
    """Batches of shard 0's samples, identity augmentation, the stream 0..stream-1 in order."""
    return EpochPlan(
        batches=[np.array([[0, p] for p in b]) for b in batches],
        augment=[Augment.identity(len(b)) for b in batches],
        stream=np.array([[0, p] for p in range(stream)]),
    )


def reader(tmp_path: Path, samples, batches, on_error: str = "skip", margin: float = 1.5) -> PlanReader:
    shards = ShardSet.open([write_shard(tmp_path / "s.tar", samples)])
    return PlanReader(shards, plan(batches, len(samples)), SIZE, margin, FLIP, on_error)


def ids(got) -> list[int]:
    return [int(x) for x in got.meta.ids[:, 1]]


def grey(jpg: bytes, _: np.ndarray) -> int:
    """A stand-in decode: the grey level of the crop, ValueError for a JPEG that does not decode."""
    try:
        return int(simplejpeg.decode_jpeg(jpg)[8, 6, 0])
    except Exception as e:
        raise ValueError(f"cannot decode: {e}") from None


# ----------------------------------------------------------------------------- json_problem


def test_json_problem_names_what_is_wrong():
    assert json_problem(b'{"image": "1.jpg"}') is None
    assert json_problem(b"{}") is None
    assert json_problem(b"[1, 2]") == "json is a list, not an object"
    assert json_problem(b'"text"') == "json is a str, not an object"
    assert (
        json_problem(b"{")
        == "json does not parse: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
    )
    assert json_problem(b"\xff\xfe{").startswith("json does not parse: ")


# ----------------------------------------------------------------------------- PlanReader


def test_a_clean_batch_is_the_plans_samples_with_their_geometry(tmp_path):
    r = reader(tmp_path, [sample(s) for s in range(5)], [[0, 1], [3, 2]])
    assert len(r) == 2 and r.input_size == SIZE and r.margin == 1.5 and r.flip_perm == FLIP
    got = r.checked(1)
    assert got.pairs == [(0, 3), (0, 2)] and ids(got) == [203, 202] and got.bad == [] and got.decoded is None
    assert [b["ids.i64"] for b in got.blobs] == [sample(3)["ids.i64"], sample(2)["ids.i64"]]
    assert set(got.blobs[0]) == {"jpg", "json", "kp.f32", "bbox.f32", "c2i.f32", "score.f32", "ids.i64"}
    meta = parse_meta([sample(3), sample(2)])
    want = batch_geometry(meta, Augment.identity(2), SIZE, 1.5, FLIP)
    for a, b in zip((got.crop_to_input, got.input_to_image, got.keypoints), want):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got.meta.score, np.float32([0.8, 0.7]))


def test_decode_gets_each_crop_with_its_matrix(tmp_path):
    seen = []

    def decode(jpg: bytes, m: np.ndarray):
        seen.append(m.copy())
        return grey(jpg, m)

    r = reader(tmp_path, [sample(s) for s in range(4)], [[2, 0, 1]])
    got = r.checked(0, decode)
    assert got.decoded == [40, 0, 20] and got.bad == []
    assert len(seen) == 3
    for m, want in zip(seen, got.crop_to_input):
        np.testing.assert_array_equal(m, want)


@pytest.mark.parametrize(
    ("change", "reason", "error"),
    [
        ({"jpg": None}, "bad_arrays", "no jpg"),
        ({"kp_f32": None}, "bad_arrays", "no kp.f32"),
        ({"bbox_f32": np.full(4, np.nan, "<f4").tobytes()}, "bad_arrays", "bbox.f32 holds NaN or inf"),
        ({"kp_f32": np.zeros((2, 3), "<f4").tobytes()}, "bad_arrays", "kp.f32 has 24 bytes, expected 36"),
        ({"json": None}, "bad_json", "no json"),
        ({"json": b"[1]"}, "bad_json", "json is a list, not an object"),
    ],
)
def test_a_bad_sample_is_replaced_by_the_next_spare_after_its_batch(tmp_path, change, reason, error):
    samples = [sample(s) for s in range(6)]
    samples[1] = sample(1, **change)
    r = reader(tmp_path, samples, [[0, 1], [2, 3]])
    got = r.checked(0)
    assert got.pairs == [(0, 0), (0, 2)] and ids(got) == [200, 202]  # the stream after batch 0: 2, 3, ...
    assert got.bad == [BadSample(reason, str(tmp_path / "s.tar"), "101_201", error)]


def test_a_spare_that_is_bad_too_is_passed_over_and_both_are_named(tmp_path):
    samples = [sample(s) for s in range(6)]
    samples[0], samples[2] = sample(0, json=None), sample(2, jpg=None)
    got = reader(tmp_path, samples, [[0, 1]]).checked(0)
    assert got.pairs == [(0, 3), (0, 1)] and ids(got) == [203, 201]
    assert [(b.reason, b.key, b.error) for b in got.bad] == [
        ("bad_json", "100_200", "no json"),
        ("bad_arrays", "102_202", "no jpg"),
    ]


def test_the_spares_wrap_round_to_the_start_of_the_epoch(tmp_path):
    samples = [sample(s) for s in range(4)]
    samples[3] = sample(3, json=b"{")
    got = reader(tmp_path, samples, [[0, 1], [2, 3]]).checked(1)
    assert got.pairs == [(0, 2), (0, 0)] and ids(got) == [202, 200]
    assert [b.key for b in got.bad] == ["103_203"]


def test_a_jpeg_that_does_not_decode_is_replaced_and_only_it_is_decoded_again(tmp_path):
    samples = [sample(s) for s in range(6)]
    samples[1] = sample(1, jpg=b"\xff\xd8 not a jpeg")
    calls = []

    def decode(jpg: bytes, m: np.ndarray):
        calls.append(jpg)
        return grey(jpg, m)

    r = reader(tmp_path, samples, [[0, 1, 2]])
    got = r.checked(0, decode)
    assert got.pairs == [(0, 0), (0, 3), (0, 2)] and got.decoded == [0, 60, 40]
    assert len(calls) == 4 and calls[-1] == samples[3]["jpg"]
    ((reason, key, error),) = [(b.reason, b.key, b.error) for b in got.bad]
    assert (reason, key) == ("bad_jpeg", "101_201") and error.startswith("cannot decode: ")
    # the replaced slot's geometry is the spare's own
    want = batch_geometry(
        parse_meta([samples[0], samples[3], samples[2]]), Augment.identity(3), SIZE, 1.5, FLIP
    )
    np.testing.assert_array_equal(got.crop_to_input, want[0])
    np.testing.assert_array_equal(got.keypoints, want[2])


def test_a_spare_whose_jpeg_fails_too_is_replaced_again(tmp_path):
    samples = [sample(s) for s in range(6)]
    samples[0] = sample(0, jpg=b"broken")
    samples[2] = sample(2, jpg=b"broken too")
    samples[3] = sample(3, json=None)
    got = reader(tmp_path, samples, [[0, 1]]).checked(0, grey)
    assert got.pairs == [(0, 4), (0, 1)] and got.decoded == [80, 20]
    assert [(b.reason, b.key) for b in got.bad] == [
        ("bad_jpeg", "100_200"),
        ("bad_jpeg", "102_202"),
        ("bad_json", "103_203"),
    ]


def test_on_error_raise_stops_at_the_first_bad_sample_naming_it(tmp_path):
    samples = [sample(s) for s in range(4)]
    samples[1] = sample(1, jpg=None)
    r = reader(tmp_path, samples, [[0, 1]], on_error="raise")
    with pytest.raises(BadSampleError) as e:
        r.checked(0)
    shard = tmp_path / "s.tar"
    assert (
        str(e.value)
        == f"bad_arrays: {shard} sample 101_201: no jpg (data.on_error=raise; skip drops such samples)"
    )
    samples[1] = sample(1, jpg=b"broken")
    r = reader(tmp_path, samples, [[0, 1]], on_error="raise")
    with pytest.raises(
        BadSampleError, match=r"^bad_jpeg: .*s\.tar sample 101_201: cannot decode: .*data\.on_error=raise"
    ):
        r.checked(0, grey)


def test_a_rank_whose_every_sample_is_bad_stops(tmp_path):
    samples = [sample(s, json=None) for s in range(3)]
    with pytest.raises(BadSampleError) as e:
        reader(tmp_path, samples, [[0, 1]]).checked(0)
    assert str(e.value) == "every sample of this rank's epoch is bad"
    with pytest.raises(BadSampleError, match=r"^every sample of this rank's epoch is bad$"):
        reader(tmp_path, [sample(s, jpg=b"x") for s in range(3)], [[0, 1]]).checked(0, grey)


def test_on_error_is_skip_or_raise():
    with pytest.raises(ValueError) as e:
        PlanReader(None, plan([[0]], 1), SIZE, 1.25, FLIP, "ignore")
    assert str(e.value) == "data.on_error must be 'skip' or 'raise', got 'ignore'"
    assert PlanReader(None, plan([[0]], 1), SIZE, 1.25, FLIP).on_error == "skip"
    assert PlanReader(None, plan([[0]], 1), [32, 24], 1.25, FLIP).input_size == (32, 24)


# ----------------------------------------------------------------------------- the DataLoader


def test_plan_dataloader_without_workers():
    data = torch.utils.data.TensorDataset(torch.arange(5))
    loader = plan_dataloader(data, 0, False)
    assert loader.batch_size is None and isinstance(loader.sampler, torch.utils.data.SequentialSampler)
    assert loader.num_workers == 0 and loader.worker_init_fn is None and loader.prefetch_factor is None
    assert loader.pin_memory is False and loader.persistent_workers is False
    assert [int(x[0]) for x in loader] == [0, 1, 2, 3, 4]


def test_plan_dataloader_with_workers_keeps_the_order_and_hands_the_collate_fn_over():
    def collate(item):
        return ("as is", item)

    data = torch.utils.data.TensorDataset(torch.arange(5))
    threads = cv2.getNumThreads()
    try:
        cv2.setNumThreads(2)
        loader = plan_dataloader(data, 2, True, collate)
        assert cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(threads)
    assert loader.num_workers == 2 and loader.worker_init_fn is worker_init and loader.prefetch_factor == 4
    assert loader.pin_memory is True and loader.persistent_workers is False and loader.collate_fn is collate
    assert isinstance(loader.sampler, torch.utils.data.SequentialSampler) and loader.batch_size is None


def test_worker_init_puts_torch_and_opencv_on_one_thread():
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    try:
        torch.set_num_threads(2)
        cv2.setNumThreads(2)
        worker_init(0)
        assert torch.get_num_threads() == 1 and cv2.getNumThreads() == 1
        cv2.setNumThreads(2)
        fork_safe_opencv()
        assert cv2.getNumThreads() == 1
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)


def test_plan_dataloader_with_one_worker_sets_it_up_as_with_more():
    loader = plan_dataloader(torch.utils.data.TensorDataset(torch.arange(3)), 1, False)
    assert loader.num_workers == 1 and loader.worker_init_fn is worker_init and loader.prefetch_factor == 4
    assert [int(x[0]) for x in loader] == [0, 1, 2]
