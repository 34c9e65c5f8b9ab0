"""Re-running the shard writer: shards are a pure function of their records and options.

A shard is reused only when the hash of its inputs matches the one stored beside it; a folder
holding shards of the split from other inputs is refused (exit 2) unless ``--overwrite``, and
then nothing stale survives: every file on disk is one the manifest lists, written from the
current inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from tests.data_prep.test_shard_coco import _person, shard_coco

from pnfs.data.shards.reader import ShardSet
from pnfs.data.shards.writer import MANIFEST, PARTS_DIR, sha256_file


@pytest.fixture
def two_images(tmp_path):
    """Two 96x128 images, one person each, and the folder the shards go to."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.jpg"):
        cv2.imwrite(str(images / name), rng.integers(0, 255, (128, 96, 3), dtype=np.uint8))
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 96, "height": 128},
            {"id": 2, "file_name": "b.jpg", "width": 96, "height": 128},
        ],
        "annotations": [_person(image_id=1, ann_id=10), _person(image_id=2, ann_id=20)],
        "categories": [{"id": 1, "name": "person"}],
    }
    return tmp_path, images, data


def _shard(tmp: Path, images: Path, data: dict, *extra: str) -> int:
    ann = tmp / "ann.json"
    ann.write_text(json.dumps(data))
    args = ["--images", str(images), "--annotations", str(ann), "--out", str(tmp / "out"), "--split", "val"]
    return shard_coco.main([*args, "--shard-size", "1", "--no-progress", *extra])


def _entry(tmp: Path) -> dict:
    return json.loads((tmp / "out" / MANIFEST).read_text())["splits"]["val"]


def _keys_on_disk(out: Path) -> list[str]:
    shards = ShardSet.open(sorted(str(p) for p in out.glob("val-*.tar")))
    return [
        f"{meta['image_id']}_{meta['ann_id']}"
        for s, n in enumerate(shards.counts)
        for meta in (json.loads(shards.read(s, i, ("json",))["json"]) for i in range(n))
    ]


def _assert_manifest_is_the_disk(out: Path) -> None:
    """Every shard file, index and sidecar on disk is one the manifest lists, with its sha256."""
    listed = {s["file"]: s for s in json.loads((out / MANIFEST).read_text())["splits"]["val"]["shards"]}
    assert sorted(p.name for p in out.glob("val-*.tar")) == sorted(listed)
    assert sorted(p.name for p in out.glob("val-*.idx")) == sorted(f[:-4] + ".idx" for f in listed)
    assert sorted(p.name for p in (out / PARTS_DIR).glob("val-*")) == sorted(f + ".json" for f in listed)
    for name, shard in listed.items():
        assert sha256_file(out / name) == shard["sha256"]


def test_same_inputs_reuse_every_shard(two_images):
    tmp, images, data = two_images
    assert _shard(tmp, images, data) == 0
    first = _entry(tmp)
    assert _shard(tmp, images, data) == 0
    again = _entry(tmp)
    assert [s["reused"] for s in again["shards"]] == [True, True]
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in first["shards"]]


def test_other_records_are_refused_without_overwrite(two_images, capsys):
    tmp, images, data = two_images
    assert _shard(tmp, images, data) == 0
    before = {p.name: p.read_bytes() for p in (tmp / "out").iterdir() if p.is_file()}
    data["annotations"][1] = _person(image_id=2, ann_id=21, bbox=(20.0, 20.0, 30.0, 60.0))
    with pytest.raises(SystemExit) as e:
        _shard(tmp, images, data)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: ") and "val-000001.tar" in err[0] and "--overwrite" in err[0]
    assert {p.name: p.read_bytes() for p in (tmp / "out").iterdir() if p.is_file()} == before


def test_other_records_with_overwrite_leave_nothing_stale(two_images):
    tmp, images, data = two_images
    assert _shard(tmp, images, data) == 0
    data["annotations"][1] = _person(image_id=2, ann_id=21)
    data["annotations"].append(_person(image_id=1, ann_id=11, bbox=(5.0, 5.0, 30.0, 40.0)))
    assert _shard(tmp, images, data, "--overwrite") == 0
    assert sorted(_keys_on_disk(tmp / "out")) == ["1_10", "1_11", "2_21"]
    assert [s["reused"] for s in _entry(tmp)["shards"]] == [True, False, False]  # shard 0: same record
    _assert_manifest_is_the_disk(tmp / "out")


def test_fewer_shards_delete_the_ones_beyond_the_new_count(two_images):
    tmp, images, data = two_images
    assert _shard(tmp, images, data) == 0
    del data["annotations"][1]
    with pytest.raises(SystemExit):  # shard 1 would be left over
        _shard(tmp, images, data)
    assert _shard(tmp, images, data, "--overwrite") == 0
    assert _keys_on_disk(tmp / "out") == ["1_10"]
    assert _entry(tmp)["counts"]["samples"] == 1
    _assert_manifest_is_the_disk(tmp / "out")


def test_other_crop_options_rewrite_the_crops(two_images, capsys):
    tmp, images, data = two_images
    data["images"][0]["width"] = data["images"][1]["width"] = 400  # room for a larger crop
    for name in ("a.jpg", "b.jpg"):
        cv2.imwrite(str(images / name), np.full((400, 400, 3), 128, np.uint8))
    assert _shard(tmp, images, data) == 0
    small = [s["sha256"] for s in _entry(tmp)["shards"]]
    wider = ("--margin", "1.5", "--max-scale", "1.8")
    with pytest.raises(SystemExit) as e:
        _shard(tmp, images, data, *wider)
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert [s["sha256"] for s in _entry(tmp)["shards"]] == small  # the manifest still says 1.25/1.3
    assert _entry(tmp)["options"]["margin"] == 1.25
    assert _shard(tmp, images, data, *wider, "--overwrite") == 0
    entry = _entry(tmp)
    assert entry["options"]["margin"] == 1.5 and entry["options"]["max_scale"] == 1.8
    assert not any(s["reused"] for s in entry["shards"])
    assert all(a != b for a, b in zip(small, (s["sha256"] for s in entry["shards"])))
    _assert_manifest_is_the_disk(tmp / "out")


def test_a_replaced_image_of_another_size_is_not_reused(two_images):
    tmp, images, data = two_images
    assert _shard(tmp, images, data) == 0
    cv2.imwrite(str(images / "b.jpg"), np.zeros((128, 96, 3), np.uint8))  # same name, new bytes
    assert _shard(tmp, images, data, "--overwrite") == 0
    assert [s["reused"] for s in _entry(tmp)["shards"]] == [True, False]


def test_shard_mpii_refuses_other_options_then_overwrites(shared_data, tmp_path, capsys):
    """shard_mpii.py goes through the same rule: other options into the same folder are refused
    without --overwrite, and with it the manifest and the crops are the new options'."""
    from tests.data_prep.test_shard_coco import shard_mpii

    root = shared_data / "mpii_sample"
    args = ["--images", str(root), "--annotations", str(root / "test_mpii.json"), "--out", str(tmp_path)]
    assert shard_mpii.main([*args, "--no-progress"]) == 0
    manifest = tmp_path / MANIFEST
    before = json.loads(manifest.read_text())["splits"]
    (split,) = before
    with pytest.raises(SystemExit) as e:
        shard_mpii.main([*args, "--no-progress", "--margin", "1.5"])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert json.loads(manifest.read_text())["splits"] == before
    assert shard_mpii.main([*args, "--no-progress", "--margin", "1.5", "--overwrite"]) == 0
    after = json.loads(manifest.read_text())["splits"][split]
    assert after["options"]["margin"] == 1.5
    assert [s["sha256"] for s in after["shards"]] != [s["sha256"] for s in before[split]["shards"]]
