"""A garbled JPEG, NaN raw arrays and a truncated shard cost their samples, not the run: dropped,
named and counted, batches refilled so every rank keeps the plan's batch count and shapes;
``data.on_error=raise`` and ``data.max_bad_samples`` stop with the shard and key named."""

from __future__ import annotations

import json
import logging
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pnfs.config import load_config
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
from pnfs.data.loaders.build import build_loader, make_epoch_plan
from pnfs.data.loaders.dali_loader import DaliPoseLoader
from pnfs.data.plan import train_plan
from pnfs.data.shards.manifest import check_manifest
from pnfs.data.shards.reader import ShardSet, expand_shards
from tests.support.engine import PY, REPO, TINY_OVERRIDES, digests, free_port, tiny_dataset, worker_env

GARBLED = ("train-000001.tar", 2)  # (shard, sample) whose JPEG is overwritten in its middle
NAN_BOX = ("train-000002.tar", 4)  # whose bbox.f32 holds NaN
TRUNCATED = ("train-000003.tar", 5)  # the shard is cut inside this sample's JPEG: 5, 6, 7 are lost


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def corrupt_copy(clean: Path, folder: Path, *, truncate: bool = True, nan: bool = True) -> dict:
    """A copy of the train shards with the damage above; returns {reason: [keys]}."""
    shutil.copytree(clean, folder)
    index = {p.name: ShardSet.open([str(p)]).index[0] for p in folder.glob("*.tar")}
    key, comps = index[GARBLED[0]][GARBLED[1]]
    off, size = comps["jpg"]
    _overwrite(folder / GARBLED[0], off + size // 3, bytes(size // 4))
    keys = {"bad_jpeg": [key]}
    if nan:
        key, comps = index[NAN_BOX[0]][NAN_BOX[1]]
        _overwrite(folder / NAN_BOX[0], comps["bbox.f32"][0], struct.pack("<4f", *[float("nan")] * 4))
        keys["bad_arrays"] = [key]
    if truncate:
        shard = index[TRUNCATED[0]]
        off, size = shard[TRUNCATED[1]][1]["jpg"]
        with open(folder / TRUNCATED[0], "r+b") as f:
            f.truncate(off + size // 2)
        keys["truncated_shard"] = [k for k, _ in shard[TRUNCATED[1] :]]
    return keys


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def corrupt(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("corrupt") / "train"
    return folder, corrupt_copy(data["shards"] / "train", folder)


def _cfg(data, *extra):
    return load_config(None, [*TINY_OVERRIDES, *data["overrides"], "data.max_bad_samples=10", *extra])


def _member(folder: Path, shard: str, pos: int, ext: str) -> tuple[str, int, int]:
    """(key, offset, size) of member ``ext`` of sample ``pos`` of ``folder/shard``."""
    key, comps = ShardSet.open([str(folder / shard)]).index[0][pos]
    return key, *comps[ext]


def _keys(batches) -> list[str]:
    return [f"{i}_{a}" for b in batches for i, a in zip(b.image_id.tolist(), b.ann_id.tolist())]


def test_malformed_json_is_its_own_reason(data, tmp_path):
    folder = tmp_path / "train"
    shutil.copytree(data["shards"] / "train", folder)
    key, off, _ = _member(folder, "train-000004.tar", 1, "json")
    _overwrite(folder / "train-000004.tar", off, b"[{" + bytes(8))  # no longer parses
    loader = build_loader(_cfg(data), "train", shards=str(folder))
    batches = list(loader)
    report = loader.bad_samples.to_dict()
    assert report["counts"] == {"bad_json": 1}
    (bad,) = report["samples"]
    assert (bad["shard"], bad["key"]) == (str(folder / "train-000004.tar"), key)
    assert "json does not parse" in bad["error"]
    assert len(batches) == 12 and key not in _keys(batches)


def test_gpu_loader_drops_names_counts_and_refills_like_the_torch_loader(data, tmp_path):
    """On the CPU: a JPEG cut inside its data (its header parses: the batched decode fails and
    the producer decodes crop by crop), one whose header is garbled (found in the worker), a
    malformed json, NaN raw arrays and a truncated shard. Both loaders drop the same samples
    and give the same batches' samples."""
    folder = tmp_path / "train"
    keys = corrupt_copy(data["shards"] / "train", folder, nan=True, truncate=True)
    shard, pos = GARBLED
    key, off, size = _member(folder, shard, pos, "jpg")  # the JPEG garbled in its middle: cut it too
    _overwrite(folder / shard, off + size // 2, b"\xff" * (size - size // 2))
    key2, off2, _ = _member(folder, "train-000000.tar", 3, "jpg")
    _overwrite(folder / "train-000000.tar", off2 + 2, bytes(40))  # header gone
    key3, off3, _ = _member(folder, "train-000004.tar", 0, "json")
    _overwrite(folder / "train-000004.tar", off3, b"{{")
    expected = {**keys, "bad_jpeg": sorted([key, key2]), "bad_json": [key3]}
    reports, seen = {}, {}
    for name in ("gpu", "torch"):
        loader = build_loader(_cfg(data, f"data.loader={name}"), "train", shards=str(folder))
        batches = list(loader)
        assert len(batches) == len(loader) == (48 - len(keys["truncated_shard"])) // 4
        assert all(tuple(b.image.shape) == (4, 3, 64, 64) for b in batches)
        reports[name], seen[name] = loader.bad_samples.to_dict(), _keys(batches)
        by_reason = {}
        for s in reports[name]["samples"]:
            by_reason.setdefault(s["reason"], []).append(s["key"])
        assert {r: sorted(k) for r, k in by_reason.items()} == {r: sorted(k) for r, k in expected.items()}
        assert not set(seen[name]) & {k for ks in expected.values() for k in ks}
    assert reports["gpu"]["counts"] == reports["torch"]["counts"]
    assert seen["gpu"] == seen["torch"]  # the same replacements, in the same slots


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_near_the_epoch_end_replaces_bad_samples_as_the_uninterrupted_run(data, tmp_path, rank):
    """A bad JPEG in the rank's last batch is replaced by spares that wrap round to the start
    of the epoch, one in the middle by later samples: resumed at any batch boundary k of the
    second half, the batches from k on equal the uninterrupted run's (2 ranks, equal counts)."""
    folder = tmp_path / "train"
    shutil.copytree(data["shards"] / "train", folder)
    cfg = _cfg(data)
    paths = expand_shards(str(folder), "train")
    shards = ShardSet.open(paths)
    plan = make_epoch_plan(cfg, "train", shards.counts, rank=rank, world_size=2, epoch=1, start_sample=0,
                     batch_size=4, augment=True)  # fmt: skip
    bad = []
    for s, p in (plan.batches[-1][2], plan.batches[len(plan) // 2][0]):
        key, off, size = _member(folder, Path(paths[s]).name, int(p), "jpg")
        _overwrite(Path(paths[s]), off + size // 3, bytes(size // 4))
        bad.append(key)
    full_loader = build_loader(cfg, "train", rank=rank, world_size=2, epoch=1, shards=str(folder))
    full = list(full_loader)
    assert sorted(s["key"] for s in full_loader.bad_samples.to_dict()["samples"]) == sorted(bad)
    for k in range(len(full) // 2 * 4, len(full) * 4, 4):
        rest = list(build_loader(cfg, "train", rank=rank, world_size=2, epoch=1, start_sample=k,
                                 shards=str(folder)))  # fmt: skip
        assert len(rest) == len(full) - k // 4
        for a, b in zip(full[k // 4 :], rest):
            assert torch.equal(a.image, b.image) and torch.equal(a.keypoints, b.keypoints)
            assert torch.equal(a.image_id, b.image_id) and torch.equal(a.ann_id, b.ann_id)
    other = build_loader(cfg, "train", rank=1 - rank, world_size=2, epoch=1, shards=str(folder))
    assert len(other) == len(full) and all(len(b.image) == 4 for b in full)


def test_a_failure_inside_the_dali_graph_is_a_bad_sample_error_naming_the_loaders_that_drop():
    """DALI decodes inside its graph: it cannot drop one sample, so its error says which loaders do
    (the iteration is exercised without DALI: the plugin's outputs replaced by a failing source)."""

    def failing():
        raise RuntimeError("Critical error in pipeline:\nError in thread 0: nvJPEG failed")
        yield

    loader = object.__new__(DaliPoseLoader)
    loader.plan = train_plan([8], 4, seed=0, epoch=0)
    loader.start_sample, loader.outputs = 0, failing()
    with pytest.raises(BadSampleError, match=r"data\.loader=dali.*Critical error.*data\.loader=torch or gpu"):
        list(loader)


def test_bad_samples_are_dropped_named_counted_and_refilled(data, corrupt):
    folder, keys = corrupt
    cfg = _cfg(data)
    loader = build_loader(cfg, "train", epoch=0, shards=str(folder))
    batches = list(loader)
    assert len(batches) == len(loader) == (48 - len(keys["truncated_shard"])) // 4  # the plan's count
    assert all(tuple(b.image.shape) == (4, 3, 64, 64) for b in batches)
    report = loader.bad_samples.to_dict()
    assert report["counts"] == {reason: len(k) for reason, k in keys.items()}
    named = {(s["reason"], Path(s["shard"]).name, s["key"]) for s in report["samples"]}
    assert ("bad_jpeg", GARBLED[0], keys["bad_jpeg"][0]) in named
    assert ("bad_arrays", NAN_BOX[0], keys["bad_arrays"][0]) in named
    assert {k for r, _, k in named if r == "truncated_shard"} == set(keys["truncated_shard"])
    seen = {f"{i}_{a}" for b in batches for i, a in zip(b.image_id.tolist(), b.ann_id.tolist())}
    assert not seen & {k for ks in keys.values() for k in ks}  # no bad sample reached a batch
    assert all(np.isfinite(b.affine.numpy()).all() for b in batches)


def test_truncated_shard_keeps_its_whole_samples_and_the_manifest_tells(data, corrupt):
    folder, keys = corrupt
    shards = ShardSet.open([str(folder / TRUNCATED[0])])
    assert shards.counts == [TRUNCATED[1]]
    assert [d.key for d in shards.dropped] == keys["truncated_shard"]
    assert "inside member" in shards.dropped[0].error
    problems = check_manifest(sorted(str(p) for p in folder.glob("*.tar")), verify=False)
    assert len(problems) == 1 and TRUNCATED[0] in problems[0] and "bytes" in problems[0]
    hashed = check_manifest(sorted(str(p) for p in folder.glob("*.tar")), verify=True)
    assert sum("sha256" in p for p in hashed) == 3  # the garbled, the NaN and the truncated shard


def test_on_error_raise_names_the_shard_and_the_key(data, tmp_path):
    keys = corrupt_copy(data["shards"] / "train", tmp_path / "train", truncate=False, nan=False)
    loader = build_loader(_cfg(data, "data.on_error=raise"), "train", shards=str(tmp_path / "train"))
    with pytest.raises(BadSampleError, match=rf"{GARBLED[0]} sample {keys['bad_jpeg'][0]}"):
        list(loader)


def test_more_bad_samples_than_the_limit_stop_the_run(data, corrupt):
    folder, _ = corrupt
    with pytest.raises(BadSampleError, match=r"data\.max_bad_samples=2"):
        list(build_loader(_cfg(data, "data.max_bad_samples=2"), "train", shards=str(folder)))
    with pytest.raises(BadSampleError, match=r"data\.max_bad_samples=1"):  # default: 0.1% of 40, >= 1
        list(build_loader(_cfg(data, "data.max_bad_samples=-1"), "train", shards=str(folder)))


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_processes_only_one_meets_the_bad_sample_and_both_finish_together(data, corrupt, tmp_path):
    """DDP on two CPU processes: the garbled JPEG sits in one shard, so one rank meets it; the
    ranks must still take the same number of steps (a hang would time out) and end equal."""
    folder, keys = corrupt
    cmd = [
        PY, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        str(REPO / "launch" / "train.py"), "--config", "demo", *TINY_OVERRIDES, *data["overrides"],
        f"data.train_shards={folder}", "data.max_bad_samples=10", "train.epochs=1", "--out", str(tmp_path),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the ranks did not finish together (hang?): {e}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    found = digests(output)
    assert set(found) == {0, 1} and found[0] == found[1], found
    ranks = {line.split("[rank ")[1][0] for line in output.splitlines() if keys["bad_jpeg"][0] in line}
    assert len(ranks) == 1, output[-3000:]  # only one rank met the garbled JPEG
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["global_step"] == found[0][1]
    (epoch,) = result["bad_samples"]  # both ranks' reports in one, the truncated shard once
    assert epoch["epoch"] == 0 and epoch["counts"] == {reason: len(k) for reason, k in keys.items()}
    named = {(s["reason"], Path(s["shard"]).name, s["key"]) for s in epoch["samples"]}
    assert ("bad_jpeg", GARBLED[0], keys["bad_jpeg"][0]) in named
    assert "bad samples dropped over all ranks" in (tmp_path / "train.log").read_text()


# pnfs/data/bad_samples.py on its own (issue 26, mutation section of docs/testing.md): which
# raw arrays a sample is refused for, the default ``data.max_bad_samples`` at its rounding edges,
# the report's limit, cap and layout, and how the ranks' reports merge. The loader's path through
# it (real shards with each kind of damage) is above.

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
