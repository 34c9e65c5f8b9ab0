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
from test_engine_support import PY, REPO, TINY_OVERRIDES, digests, free_port, tiny_dataset, worker_env

from pnfs.config import load_config
from pnfs.data.bad_samples import BadSampleError
from pnfs.data.loader import build_loader, check_manifest
from pnfs.data.shard_reader import ShardSet

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
