"""Readers + sharding on the real COCO/MPII samples, manifest, re-runs and every bad-input case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from pnfs.data.geometry import transform_points
from pnfs.data.shards.reader import ShardSet, read_index, scan_tar
from pnfs.data.shards.writer import MANIFEST, sha256_file
from pnfs.keypoints import MPII_FROM_RAW

REPO = Path(__file__).resolve().parents[2]


def _load(module: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(module, REPO / "data_prep" / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


shard_coco = _load("shard_coco")
shard_mpii = _load("shard_mpii")


def _samples(out: Path, split: str) -> list[tuple[dict, np.ndarray]]:
    paths = sorted(str(p) for p in out.glob(f"{split}-*.tar"))
    shards = ShardSet.open(paths)
    out_list = []
    for s, n in enumerate(shards.counts):
        for i in range(n):
            blobs = shards.read(s, i, ("jpg", "json"))
            crop = cv2.imdecode(np.frombuffer(blobs["jpg"], np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
            out_list.append((json.loads(blobs["json"]), crop))
    return out_list


def _region_of_original(original: np.ndarray, meta: dict) -> np.ndarray:
    """The crop's region cut from the original, area-resized to the crop size if it was downscaled.

    crop_to_image = [[1/f, 0, x0 + 0.5/f - 0.5], [0, 1/f, y0 + 0.5/f - 0.5]] (f = 1: no resize).
    """
    m = np.asarray(meta["crop_to_image"])
    assert m[0, 1] == m[1, 0] == 0
    w, h = meta["crop_size"]
    x0, y0 = round(m[0, 2] - 0.5 * m[0, 0] + 0.5), round(m[1, 2] - 0.5 * m[1, 1] + 0.5)
    full_w, full_h = round(w * m[0, 0]), round(h * m[1, 1])
    region = original[y0 : y0 + full_h, x0 : x0 + full_w]
    if (full_w, full_h) != (w, h):
        region = cv2.resize(region, (w, h), interpolation=cv2.INTER_AREA)
    return region


def _rgb(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)[:, :, ::-1]


# ----------------------------------------------------------------------------- COCO sample


@pytest.fixture(scope="module")
def coco_shards(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("coco_shards")
    root = shared_data / "coco_sample"
    rc = shard_coco.main(
        ["--images", str(root), "--annotations", str(root / "test_coco.json"), "--out", str(out),
         "--split", "val", "--shard-size", "5", "--verify", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    return out, root


def test_coco_every_filtered_person_becomes_one_sample(coco_shards):
    out, root = coco_shards
    data = json.loads((root / "test_coco.json").read_text())
    expected = {
        f"{a['image_id']}_{a['id']}"
        for a in data["annotations"]
        if not a["iscrowd"] and a["area"] > 0 and any(v > 0 for v in a["keypoints"][2::3])
    }
    samples = _samples(out, "val")
    assert sorted(f"{m['image_id']}_{m['ann_id']}" for m, _ in samples) == sorted(expected)
    manifest = json.loads((out / MANIFEST).read_text())["splits"]["val"]
    assert manifest["counts"]["samples"] == len(expected) == 12
    assert manifest["filtered"]["no_labelled_keypoints"]["count"] == 2
    assert [s["samples"] for s in manifest["shards"]] == [5, 5, 2]
    for s in manifest["shards"]:
        assert sha256_file(out / s["file"]) == s["sha256"]
    assert "shard_coco.py" in manifest["command"]


def test_coco_keypoints_and_crops_map_back_to_the_original(coco_shards):
    out, root = coco_shards
    data = json.loads((root / "test_coco.json").read_text())
    original_kp = {a["id"]: np.asarray(a["keypoints"], float).reshape(17, 3) for a in data["annotations"]}
    images = {}
    for meta, crop in _samples(out, "val"):
        kp = np.asarray(meta["keypoints"])
        ref = original_kp[meta["ann_id"]]
        lab = ref[:, 2] > 0
        np.testing.assert_array_equal(kp[:, 2] > 0, lab)
        back = transform_points(np.asarray(meta["crop_to_image"]), kp[lab, :2])
        np.testing.assert_allclose(back, ref[lab, :2], atol=0.01)
        file = root / meta["image_file"]
        images.setdefault(file, _rgb(file))
        region = _region_of_original(images[file], meta)
        assert region.shape == crop.shape
        assert np.abs(region.astype(float) - crop).mean() < 3
        assert meta["image_size"] == [images[file].shape[1], images[file].shape[0]]


def test_coco_raw_arrays_equal_the_json(coco_shards):
    out, _ = coco_shards
    shards = ShardSet.open(sorted(str(p) for p in out.glob("val-*.tar")))
    blobs = shards.read(0, 0, ("json", "kp.f32", "bbox.f32", "c2i.f32", "ids.i64", "score.f32"))
    meta = json.loads(blobs["json"])
    np.testing.assert_allclose(
        np.frombuffer(blobs["kp.f32"], "<f4").reshape(17, 3), meta["keypoints"], atol=1e-3
    )
    np.testing.assert_allclose(np.frombuffer(blobs["bbox.f32"], "<f4"), meta["bbox"], atol=1e-3)
    np.testing.assert_allclose(np.frombuffer(blobs["c2i.f32"], "<f4").reshape(2, 3), meta["crop_to_image"])
    assert list(np.frombuffer(blobs["ids.i64"], "<i8")) == [meta["image_id"], meta["ann_id"]]
    assert np.frombuffer(blobs["score.f32"], "<f4")[0] == meta["score"] == 1.0


def test_dali_index_files_match_the_tars(coco_shards):
    out, _ = coco_shards
    for tar in sorted(out.glob("val-*.tar")):
        header = tar.with_suffix(".idx").read_text().splitlines()[0]
        index = read_index(tar)
        assert header == f"v1.2 {len(index)}"
        assert index == scan_tar(tar)


@pytest.mark.parametrize("bad_line", ["", "jpg 512 10"])
def test_an_index_line_without_whole_components_is_refused_naming_the_file_and_line(tmp_path, bad_line):
    tar = tmp_path / "val-000000.tar"  # only its .idx is read
    tar.with_suffix(".idx").write_text(
        f"v1.2 3\njpg 0 10 a.jpg kp.f32 10 4 a.kp.f32\n{bad_line}\njpg 512 10 c.jpg\n"
    )
    with pytest.raises(
        ValueError, match=r"val-000000\.idx: line 3: expected groups of 'ext offset size name'"
    ):
        read_index(tar)


def test_parallel_workers_write_the_same_shards_with_a_progress_bar(coco_shards, tmp_path, capsys):
    out, root = coco_shards
    rc = shard_coco.main(
        ["--images", str(root), "--annotations", str(root / "test_coco.json"), "--out", str(tmp_path),
         "--split", "val", "--shard-size", "5", "--workers", "2"]
    )  # fmt: skip
    assert rc == 0
    assert "shards val" in capsys.readouterr().err  # the tqdm bar
    parallel = json.loads((tmp_path / MANIFEST).read_text())["splits"]["val"]["shards"]
    serial = json.loads((out / MANIFEST).read_text())["splits"]["val"]["shards"]
    assert [(s["file"], s["sha256"]) for s in parallel] == [(s["file"], s["sha256"]) for s in serial]


def test_verify_reports_a_corrupted_shard(coco_shards, tmp_path, capsys):
    out, root = coco_shards
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    tar = copy / "val-000000.tar"
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF  # a flipped bit inside the first crop's JPEG
    tar.write_bytes(bytes(data))
    rc = shard_coco.main(
        ["--images", str(root), "--annotations", str(root / "test_coco.json"), "--out", str(copy),
         "--split", "val", "--shard-size", "5", "--no-progress", "--verify"]
    )  # fmt: skip
    assert rc == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("verify:")]
    assert errors and all("val-000000.tar" in line for line in errors)
    assert any("sha256" in line for line in errors)


def test_downscaled_crops_still_map_back_exactly(shared_data, tmp_path):
    root = shared_data / "coco_sample"
    rc = shard_coco.main(
        ["--images", str(root), "--annotations", str(root / "test_coco.json"), "--out", str(tmp_path),
         "--max-side", "96", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    data = json.loads((root / "test_coco.json").read_text())
    original_kp = {a["id"]: np.asarray(a["keypoints"], float).reshape(17, 3) for a in data["annotations"]}
    for meta, crop in _samples(tmp_path, "val"):
        assert max(crop.shape[:2]) <= 96
        kp = np.asarray(meta["keypoints"])
        lab = kp[:, 2] > 0
        back = transform_points(np.asarray(meta["crop_to_image"]), kp[lab, :2])
        np.testing.assert_allclose(back, original_kp[meta["ann_id"]][lab, :2], atol=0.01)
        region = _region_of_original(_rgb(root / meta["image_file"]), meta)
        assert region.shape == crop.shape and np.abs(region.astype(float) - crop).mean() < 3


# ----------------------------------------------------------------------------- MPII sample


def test_mpii_shards_map_back_to_the_original(shared_data, tmp_path):
    root = shared_data / "mpii_sample"
    rc = shard_mpii.main(
        ["--images", str(root), "--annotations", str(root / "test_mpii.json"), "--out", str(tmp_path),
         "--verify", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    entries = json.loads((root / "test_mpii.json").read_text())
    samples = _samples(tmp_path, "data")
    assert len(samples) == len(entries) == 3
    order = list(MPII_FROM_RAW)
    for meta, crop in samples:
        entry = entries[meta["ann_id"]]
        raw = np.asarray(entry["joints"])[order] - 1.0
        lab = np.asarray(entry["joints_vis"])[order] > 0
        kp = np.asarray(meta["keypoints"])
        back = transform_points(np.asarray(meta["crop_to_image"]), kp[lab, :2])
        np.testing.assert_allclose(back, raw[lab], atol=0.01)
        region = _region_of_original(_rgb(root / entry["image"]), meta)
        assert region.shape == crop.shape and np.abs(region.astype(float) - crop).mean() < 3


# ----------------------------------------------------------------------------- bad input


def _person(image_id=1, ann_id=10, bbox=(10.0, 10.0, 40.0, 80.0)):
    kp = []
    for j in range(17):
        kp += [20.0 + j, 20.0 + 3 * j, 2]
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0, "area": 100.0,
            "bbox": list(bbox), "keypoints": kp, "num_keypoints": 17}  # fmt: skip


@pytest.fixture
def tiny_coco(tmp_path):
    """A 96x128 image with one good person; tests add one bad case each."""
    images = tmp_path / "images"
    images.mkdir()
    img = np.random.default_rng(0).integers(0, 255, (128, 96, 3), dtype=np.uint8)
    cv2.imwrite(str(images / "good.jpg"), img)
    data = {
        "images": [{"id": 1, "file_name": "good.jpg", "width": 96, "height": 128}],
        "annotations": [_person()],
        "categories": [{"id": 1, "name": "person"}],
    }
    return tmp_path, images, data


def _run(tmp_path, images, data):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    out = tmp_path / "out"
    rc = shard_coco.main(
        ["--images", str(images), "--annotations", str(ann), "--out", str(out), "--no-progress"]
    )
    manifest = json.loads((out / MANIFEST).read_text())["splits"]["data"]
    return rc, manifest


def _add_image(data, image_id, name):
    data["images"].append({"id": image_id, "file_name": name, "width": 96, "height": 128})
    data["annotations"].append(_person(image_id=image_id, ann_id=100 + image_id))


def _expect_skipped(manifest, reason, ident):
    assert manifest["counts"]["samples"] == 1  # the good person still made it
    assert manifest["skipped"][reason]["count"] == 1
    assert manifest["skipped"][reason]["first_ids"] == [ident]


def test_bad_missing_image(tiny_coco):
    tmp, images, data = tiny_coco
    _add_image(data, 2, "nowhere.jpg")
    rc, m = _run(tmp, images, data)
    assert rc == 0
    _expect_skipped(m, "missing_image", "2_102")


def test_bad_unreadable_image(tiny_coco):
    tmp, images, data = tiny_coco
    (images / "junk.png").write_bytes(b"this is not an image")
    _add_image(data, 2, "junk.png")
    _expect_skipped(_run(tmp, images, data)[1], "unreadable_image", "2_102")


def test_bad_truncated_jpeg(tiny_coco):
    tmp, images, data = tiny_coco
    full = (images / "good.jpg").read_bytes()
    (images / "cut.jpg").write_bytes(full[: len(full) // 2])
    _add_image(data, 2, "cut.jpg")
    _expect_skipped(_run(tmp, images, data)[1], "truncated_jpeg", "2_102")


def test_bad_corrupt_jpeg(tiny_coco):
    """Whole file, damaged scan: libjpeg stops at a marker inside the entropy-coded data and
    would fill the rest of the image with grey ("premature end of data segment")."""
    tmp, images, data = tiny_coco
    damaged = bytearray((images / "good.jpg").read_bytes())
    damaged[len(damaged) // 2 : len(damaged) // 2 + 2] = b"\xff\xd0"
    (images / "damaged.jpg").write_bytes(bytes(damaged))
    _add_image(data, 2, "damaged.jpg")
    _expect_skipped(_run(tmp, images, data)[1], "corrupt_jpeg", "2_102")


def test_bad_box_outside_image(tiny_coco):
    tmp, images, data = tiny_coco
    p = _person(ann_id=11, bbox=(500.0, 500.0, 40.0, 40.0))
    p["keypoints"] = [0] * 51
    p["keypoints"][0:3] = [510, 510, 2]
    data["annotations"].append(p)
    _expect_skipped(_run(tmp, images, data)[1], "box_outside_image", "1_11")


def test_bad_zero_area_box(tiny_coco):
    tmp, images, data = tiny_coco
    data["annotations"].append(_person(ann_id=11, bbox=(10.0, 10.0, 0.0, 50.0)))
    _expect_skipped(_run(tmp, images, data)[1], "zero_area_box", "11")


def test_bad_nan_coordinates(tiny_coco):
    tmp, images, data = tiny_coco
    p = _person(ann_id=11)
    p["keypoints"][3] = float("nan")  # json.dumps writes NaN, json.load reads it back
    data["annotations"].append(p)
    _expect_skipped(_run(tmp, images, data)[1], "bad_coordinates", "11")


def test_bad_negative_coordinates(tiny_coco):
    tmp, images, data = tiny_coco
    data["annotations"].append(_person(ann_id=11, bbox=(-5.0, 10.0, 40.0, 50.0)))
    _expect_skipped(_run(tmp, images, data)[1], "bad_coordinates", "11")


def test_bad_wrong_keypoint_count(tiny_coco):
    tmp, images, data = tiny_coco
    p = _person(ann_id=11)
    p["keypoints"] = p["keypoints"][:-3]
    data["annotations"].append(p)
    _expect_skipped(_run(tmp, images, data)[1], "wrong_keypoint_count", "11")


def test_bad_malformed_annotation(tiny_coco):
    tmp, images, data = tiny_coco
    p = _person(ann_id=11)
    p["bbox"] = "ten by twenty"
    data["annotations"].append(p)
    _expect_skipped(_run(tmp, images, data)[1], "malformed_annotation", "11")


def test_missing_annotation_file_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        shard_coco.main(
            ["--images", str(tmp_path), "--annotations", str(tmp_path / "no.json"), "--out", str(tmp_path)]
        )
    assert e.value.code == 2 and "no.json" in capsys.readouterr().err


def test_missing_image_folder_exits_2(tiny_coco, capsys):
    tmp, _, data = tiny_coco
    (tmp / "ann.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit) as e:
        shard_coco.main(
            ["--images", str(tmp / "gone"), "--annotations", str(tmp / "ann.json"), "--out", str(tmp)]
        )
    assert e.value.code == 2 and "gone" in capsys.readouterr().err


def test_detections_become_samples_with_their_scores(shared_data, tmp_path):
    root = shared_data / "coco_sample"
    dets = json.loads((root / "test_coco_det_AP_H_56.json").read_text())
    rc = shard_coco.main(
        ["--images", str(root), "--annotations", str(root / "test_coco.json"), "--out", str(tmp_path),
         "--detections", str(root / "test_coco_det_AP_H_56.json"), "--det-score-threshold", "0.5",
         "--split", "val", "--max-side", "128", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    kept = [i for i, d in enumerate(dets) if d["score"] >= 0.5]
    samples = _samples(tmp_path, "val")
    assert sorted(m["ann_id"] for m, _ in samples) == kept
    for meta, _ in samples[:5]:
        assert meta["score"] == pytest.approx(dets[meta["ann_id"]]["score"])
