"""A garbled JPEG, NaN raw arrays and a truncated shard cost their samples, not the run: dropped,
named and counted, batches refilled so every rank keeps the plan's batch count and shapes;
``data.on_error=raise`` and ``data.max_bad_samples`` stop with the shard and key named."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.support.engine import PY, REPO, TINY_OVERRIDES, digests, free_port, tiny_dataset, worker_env

from pnfs.config import load_config
from pnfs.data.bad_samples import BadSampleError
from pnfs.data.loaders.build import build_loader, make_epoch_plan
from pnfs.data.loaders.dali_loader import DaliPoseLoader
from pnfs.data.plan import train_plan
from pnfs.data.shards.manifest import check_manifest
from pnfs.data.shards.reader import ShardSet, expand_shards

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
