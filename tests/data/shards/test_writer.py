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

from pnfs.data.shards.reader import ShardSet
from pnfs.data.shards.writer import MANIFEST, PARTS_DIR, sha256_file
from tests.data_prep.test_shard_coco import _person, shard_coco


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


# --------------------------------------------------------------------------- writer-mutant tests
# Issue 26 part 6 (docs/testing.md): write_shards and its parts called directly on hand-made
# records and images; every expected value is written out here.


def _record(ann_id: int, bbox=(10.0, 20.0, 30.0, 40.0), image_file="a.png", image_id=1, score=1.0):
    """A person on ``image_file`` with 17 labelled joints inside ``bbox``."""
    from pnfs.data.annotations.records import PersonRecord

    x, y = bbox[0] + 1.0, bbox[1] + 1.0
    kp = np.array([[x + j % 5, y + j, 2.0] for j in range(17)])
    return PersonRecord(image_file, image_id, ann_id, np.array(bbox, float), kp, 100.0 + ann_id, score)


def _options(out: Path, **kw):
    from pnfs.data.shards.writer import ShardOptions

    return ShardOptions(out=out, split="val", joint_set="coco17", **kw)


def _write(tmp: Path, records, **kw) -> dict:
    """write_shards of ``records`` from ``tmp/images`` into ``tmp/out`` (no progress bar)."""
    from pnfs.data.annotations.records import SkipReport
    from pnfs.data.shards.writer import write_shards

    overwrite = kw.pop("overwrite", False)
    opts = _options(tmp / "out", **kw)
    more = {"overwrite": True} if overwrite else {}  # refusing is the default
    return write_shards(records, tmp / "images", opts, SkipReport(), SkipReport(), command=["cmd", "x"],
                        progress=False, **more)  # fmt: skip


@pytest.fixture
def png_folder(tmp_path):
    """``images/a.png``: 128x96 (h x w) random RGB, lossless, so crops are exact."""
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(
        str(images / "a.png"), np.random.default_rng(1).integers(0, 255, (128, 96, 3), dtype=np.uint8)
    )
    return tmp_path


def _rewrite(out: Path, name: str, edit) -> None:
    """Rewrite shard ``name`` with ``edit({member: bytes})`` applied, its index rebuilt and its
    manifest sha256 updated, so only the edit is wrong."""
    import io
    import tarfile

    from pnfs.data.shards.reader import write_index

    path = out / name
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    members = edit(members)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write_index(path, path.with_suffix(".idx"))
    manifest = json.loads((out / MANIFEST).read_text())
    for shard in manifest["splits"]["val"]["shards"]:
        if shard["file"] == name:
            shard["sha256"] = sha256_file(path)
    (out / MANIFEST).write_text(json.dumps(manifest))


def test_verify_names_every_problem_of_every_sample_and_shard(png_folder):
    from pnfs.data.shards.writer import verify_shards

    out = png_folder / "out"
    _write(png_folder, [_record(i) for i in range(1, 7)], shard_size=2)
    assert verify_shards(out, "val") == []
    (out / "val-000000.tar").unlink()

    def shard1(m):  # 1_3 without its score, 1_4 with another crop size
        del m["1_3.score.f32"]
        meta = json.loads(m["1_4.json"])
        meta["crop_size"] = [1, 1]
        m["1_4.json"] = json.dumps(meta).encode()
        return m

    def shard2(m):  # 1_5's json unreadable, 1_6's raw keypoints moved by one pixel
        m["1_5.json"] = b"not json"
        m["1_6.kp.f32"] = (np.frombuffer(m["1_6.kp.f32"], "<f4") + 1).astype("<f4").tobytes()
        return m

    _rewrite(out, "val-000001.tar", shard1)
    _rewrite(out, "val-000002.tar", shard2)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["splits"]["val"]["shards"][1]["sha256"] = "0" * 64
    manifest["splits"]["val"]["shards"][2]["samples"] = 3
    (out / MANIFEST).write_text(json.dumps(manifest))
    s1, s2 = out / "val-000001.tar", out / "val-000002.tar"
    assert verify_shards(out, "val") == [
        f"{out / 'val-000000.tar'}: missing",
        f"{s1}: sha256 differs from the manifest",
        f"{s1}: sample 1_3 lacks ['score.f32']",
        f"{s1}: sample 1_4: jpg size differs from json crop_size",
        f"{s2}: 2 samples, manifest says 3",
        f"{s2}: sample 1_5: Expecting value: line 1 column 1 (char 0)",
        f"{s2}: sample 1_6: kp.f32 differs from json keypoints",
    ]


def _image_error(path: Path):
    from pnfs.data.shards.writer import ImageError, decode_image

    with pytest.raises(ImageError) as e:
        decode_image(path)
    return e.value.reason, str(e.value)


def test_decode_image_reads_rgb_and_names_each_bad_file_by_reason(tmp_path):
    import simplejpeg

    from pnfs.data.shards.writer import decode_image

    bgr = np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), bgr)
    assert np.array_equal(decode_image(tmp_path / "a.png"), bgr[:, :, ::-1])  # RGB, lossless
    red = np.zeros((16, 24, 3), np.uint8)
    red[..., 0] = 250
    jpeg = simplejpeg.encode_jpeg(red, quality=95, colorspace="RGB", colorsubsampling="444")
    (tmp_path / "red.jpg").write_bytes(jpeg)
    got = decode_image(tmp_path / "red.jpg")
    assert got.shape == (16, 24, 3) and got[..., 0].min() > 240 and got[..., 1:].max() < 10
    assert _image_error(tmp_path / "none.jpg") == ("missing_image", f"{tmp_path / 'none.jpg'}: no such file")
    (tmp_path / "folder.jpg").mkdir()
    reason, text = _image_error(tmp_path / "folder.jpg")
    assert reason == "unreadable_image" and text.startswith(
        f"{tmp_path / 'folder.jpg'}: [Errno 21] Is a directory"
    )
    noisy = simplejpeg.encode_jpeg(bgr, quality=95, colorspace="RGB", colorsubsampling="444")
    (tmp_path / "cut.jpg").write_bytes(noisy[: len(noisy) // 2])  # inside the scan
    assert _image_error(tmp_path / "cut.jpg") == (
        "truncated_jpeg",
        f"{tmp_path / 'cut.jpg'}: Premature end of JPEG file",
    )
    damaged = bytearray(noisy)
    damaged[len(noisy) // 2 : len(noisy) // 2 + 2] = b"\xff\xd0"  # a marker inside the scan
    (tmp_path / "damaged.jpg").write_bytes(bytes(damaged))
    assert _image_error(tmp_path / "damaged.jpg") == (
        "corrupt_jpeg",
        f"{tmp_path / 'damaged.jpg'}: Corrupt JPEG data: premature end of data segment",
    )
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    assert _image_error(tmp_path / "junk.png") == (
        "unreadable_image",
        f"{tmp_path / 'junk.png'}: not a decodable image",
    )
    garbled = jpeg[:200] + bytes(range(256)) + jpeg[456:]  # its tables overwritten
    (tmp_path / "garbled.jpg").write_bytes(garbled)
    reason, text = _image_error(tmp_path / "garbled.jpg")
    assert reason == "unreadable_image" and text.startswith(
        f"{tmp_path / 'garbled.jpg'}: tjDecompressHeader3(): "
    )


def test_a_jpeg_with_a_benign_libjpeg_warning_is_decoded(tmp_path):
    import simplejpeg

    from pnfs.data.shards.writer import decode_image

    image = np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    jpeg = bytearray(simplejpeg.encode_jpeg(image, quality=95, colorspace="RGB", colorsubsampling="444"))
    jpeg[-16] = 0  # the scan ends early: "N extraneous bytes before marker 0xd9"
    with pytest.raises(ValueError, match="extraneous bytes"):
        simplejpeg.decode_jpeg(bytes(jpeg), colorspace="RGB", strict=True)
    (tmp_path / "warn.jpg").write_bytes(bytes(jpeg))
    got = decode_image(tmp_path / "warn.jpg")
    assert got.shape == (16, 24, 3) and got.dtype == np.uint8


def test_only_split_dash_six_digits_files_are_the_writers(png_folder):
    from pnfs.data.shards.writer import _existing_shards

    out = png_folder / "out"
    _write(png_folder, [_record(1), _record(2)], shard_size=1)
    for name in ("val-backup.tar", "val-12.tar", "val-0000001.tar", "train-000000.tar", "val-000000.txt"):
        (out / name).write_bytes(b"mine")
    found = _existing_shards(out, "val")
    assert sorted(found) == [0, 1]
    assert sorted(p.name for p in found[1]) == ["val-000001.idx", "val-000001.tar", "val-000001.tar.json"]
    _write(png_folder, [_record(1)], shard_size=1, overwrite=True)  # shard 1 goes, the others stay
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "train-000000.tar", "val-000000.tar", "val-0000001.tar", "val-12.tar", "val-backup.tar"
    ]  # fmt: skip


def test_stale_shards_lists_every_shard_written_from_other_inputs_or_beyond_the_count(png_folder):
    from pnfs.data.shards.writer import _stored_digest, stale_shards

    out = png_folder / "out"
    entry = _write(png_folder, [_record(i) for i in range(1, 5)], shard_size=1)
    digests = [s["inputs_sha256"] for s in entry["shards"]]
    assert [_stored_digest(out, f"val-00000{i}.tar") for i in range(4)] == digests
    assert stale_shards(out, "val", digests) == []

    def files(i):
        return [
            out / PARTS_DIR / f"val-00000{i}.tar.json",
            out / f"val-00000{i}.idx",
            out / f"val-00000{i}.tar",
        ]

    assert stale_shards(out, "val", [digests[0], "other", *digests[2:]]) == files(1)
    assert stale_shards(out, "val", digests[:2]) == files(2) + files(3)  # beyond the new count
    assert stale_shards(out, "val", ["other", digests[1], "other", digests[3]]) == files(0) + files(2)
    (out / "val-000003.idx").unlink()  # incomplete: no digest, so never reused
    assert _stored_digest(out, "val-000003.tar") is None
    assert stale_shards(out, "val", digests) == [files(3)[0], files(3)[2]]
    (out / PARTS_DIR / "val-000002.tar.json").write_text("{not json")
    assert _stored_digest(out, "val-000002.tar") is None
    (out / PARTS_DIR / "val-000001.tar.json").write_text("{}")
    assert _stored_digest(out, "val-000001.tar") is None
    (out / "val-000000.tar").unlink()
    assert _stored_digest(out, "val-000000.tar") is None
    assert stale_shards(out, "other-split", digests) == []


def test_clip_box_keeps_the_part_inside_the_image_or_none():
    from pnfs.data.shards.writer import clip_box

    assert clip_box(np.array([-5.0, -6.0, 20.0, 30.0]), 10, 12).tolist() == [0, 0, 10, 12]
    assert clip_box(np.array([2.0, 3.0, 4.0, 5.0]), 100, 100).tolist() == [2, 3, 4, 5]
    assert clip_box(np.array([9.5, 11.0, 5.0, 5.0]), 10, 12).tolist() == [9.5, 11, 0.5, 1]
    assert clip_box(np.array([10.0, 0.0, 5.0, 5.0]), 10, 12) is None  # touches the right edge only
    assert clip_box(np.array([0.0, 12.0, 5.0, 5.0]), 10, 12) is None
    assert clip_box(np.array([-5.0, 0.0, 5.0, 5.0]), 10, 12) is None
    assert clip_box(np.array([0.0, -5.0, 5.0, 5.0]), 10, 12) is None


# crop_person with margin 1, max_scale 1, aspect 1: a w x h box's region is the square of side
# hypot(s, s) (s = max(w, h)) around its centre; pixel j covers [j - 0.5, j + 0.5)
SQUARE = dict(margin=1.0, max_scale=1.0, aspect_range=(1.0, 1.0))


def test_crop_person_cuts_every_pixel_the_region_touches_clipped_to_the_image(tmp_path):
    from pnfs.data.shards.writer import crop_person

    image = np.random.default_rng(2).integers(0, 255, (128, 96, 3), dtype=np.uint8)
    opts = _options(tmp_path, **SQUARE)
    # box (40, 50, 6, 8): centre (43, 54), half 4 * sqrt(2) = 5.657: region 37.34..48.66 x 48.34..59.66
    crop, to_image = crop_person(image, np.array([40.0, 50.0, 6.0, 8.0]), opts)
    assert np.array_equal(crop, image[48:61, 37:50]) and crop.flags["C_CONTIGUOUS"]
    assert to_image.tolist() == [[1, 0, 37], [0, 1, 48]]
    crop, to_image = crop_person(image, np.array([0.0, 0.0, 6.0, 8.0]), opts)  # top left: -2.66..8.66
    assert np.array_equal(crop, image[0:11, 0:10]) and to_image.tolist() == [[1, 0, 0], [0, 1, 0]]
    crop, to_image = crop_person(image, np.array([90.0, 120.0, 6.0, 8.0]), opts)  # bottom right
    assert np.array_equal(crop, image[118:128, 87:96]) and to_image.tolist() == [[1, 0, 87], [0, 1, 118]]
    # the aspect range's wide end (2) sets the region: 16 x 8, half hypot / 2 = 8.944:
    # 34.06..51.94 x 45.06..62.94
    wide = _options(tmp_path, margin=1.0, max_scale=1.0, aspect_range=(1.0, 2.0))
    crop, to_image = crop_person(image, np.array([40.0, 50.0, 6.0, 8.0]), wide)
    assert np.array_equal(crop, image[45:64, 34:53]) and to_image.tolist() == [[1, 0, 34], [0, 1, 45]]
    for side in (0, 13):  # no limit, or the crop's own size: kept as it is
        crop, _ = crop_person(
            image, np.array([40.0, 50.0, 6.0, 8.0]), _options(tmp_path, max_side=side, **SQUARE)
        )
        assert crop.shape == (13, 13, 3)


def test_a_crop_over_max_side_is_area_resized_and_its_map_follows_the_pixel_centres(tmp_path):
    from pnfs.data.shards.writer import crop_person

    image = np.random.default_rng(2).integers(0, 255, (128, 96, 3), dtype=np.uint8)
    crop, to_image = crop_person(
        image, np.array([40.0, 50.0, 6.0, 8.0]), _options(tmp_path, max_side=5, **SQUARE)
    )
    # 13 x 13 -> 5 x 5: f = 5/13, a resized pixel centre u maps to (u + 0.5) * 13/5 - 0.5
    assert np.array_equal(crop, cv2.resize(image[48:61, 37:50], (5, 5), interpolation=cv2.INTER_AREA))
    assert np.allclose(to_image, [[2.6, 0, 37.8], [0, 2.6, 48.8]], rtol=0, atol=1e-12)
    # 1 wide x 11 high (the box left of the image) -> 1 x 2: a side never rounds to 0
    crop, to_image = crop_person(
        image, np.array([-9.0, 0.0, 6.0, 8.0]), _options(tmp_path, max_side=2, **SQUARE)
    )
    assert crop.shape == (2, 1, 3)
    assert np.allclose(to_image, [[1, 0, 0], [0, 5.5, 2.25]], rtol=0, atol=1e-12)
    # 11 wide x 1 high (the box above the image) -> 2 x 1
    crop, to_image = crop_person(
        image, np.array([0.0, -9.0, 8.0, 6.0]), _options(tmp_path, max_side=2, **SQUARE)
    )
    assert crop.shape == (1, 2, 3)
    assert np.allclose(to_image, [[5.5, 0, 2.25], [0, 1, 0]], rtol=0, atol=1e-12)


def test_person_sample_writes_the_crop_and_the_same_numbers_as_json_and_raw_arrays(tmp_path):
    import simplejpeg

    from pnfs.data.annotations.records import PersonRecord
    from pnfs.data.shards.writer import person_sample

    image = np.random.default_rng(3).integers(0, 255, (128, 96, 3), dtype=np.uint8)
    kp = np.zeros((17, 3))
    kp[0] = [41.0, 52.0, 2.0]
    kp[1] = [44.5, 57.25, 1.0]
    kp[2] = [99.0, 99.0, 0.0]  # unlabelled: zeroed
    rec = PersonRecord("sub/a.png", 7, 70, np.array([40.0, 50.0, 6.0, 8.0]), kp, 33.5, 0.75)
    opts = _options(tmp_path, quality=90, **SQUARE)
    sample, reason = person_sample(image, rec, opts)
    assert reason is None and sorted(sample) == sorted(
        ["jpg", "json", "kp.f32", "bbox.f32", "c2i.f32", "score.f32", "ids.i64"]
    )
    want_kp = np.zeros((17, 3))
    want_kp[0] = [41 - 37, 52 - 48, 2]  # the crop starts at (37, 48)
    want_kp[1] = [44.5 - 37, 57.25 - 48, 1]
    assert json.loads(sample["json"]) == {
        "image_id": 7,
        "ann_id": 70,
        "bbox": [40.0, 50.0, 6.0, 8.0],
        "keypoints": want_kp.tolist(),
        "crop_to_image": [[1.0, 0.0, 37.0], [0.0, 1.0, 48.0]],
        "score": 0.75,
        "image_size": [96, 128],
        "crop_size": [13, 13],
        "image_file": "sub/a.png",
        "area": 33.5,
        "joint_set": "coco17",
    }
    assert np.frombuffer(sample["kp.f32"], "<f4").reshape(17, 3).tolist() == want_kp.tolist()
    assert np.frombuffer(sample["bbox.f32"], "<f4").tolist() == [40, 50, 6, 8]
    assert np.frombuffer(sample["c2i.f32"], "<f4").tolist() == [1, 0, 37, 0, 1, 48]
    assert np.frombuffer(sample["score.f32"], "<f4").tolist() == [0.75]
    assert np.frombuffer(sample["ids.i64"], "<i8").tolist() == [7, 70]
    assert simplejpeg.decode_jpeg_header(sample["jpg"]) == (13, 13, "YCbCr", "444")
    crop = image[48:61, 37:50]
    assert sample["jpg"] == simplejpeg.encode_jpeg(crop, quality=90, colorspace="RGB", colorsubsampling="444")
    assert rec.keypoints[2].tolist() == [99, 99, 0]  # the record is not changed


def test_person_sample_clips_the_box_only_when_asked_and_skips_one_outside(tmp_path):
    from pnfs.data.annotations.records import PersonRecord
    from pnfs.data.shards.writer import person_sample

    image = np.zeros((128, 96, 3), np.uint8)
    kp = np.zeros((17, 3))
    rec = PersonRecord("a.png", 1, 2, np.array([-2.0, 120.0, 6.0, 12.0]), kp, 1.0)
    clipped, _ = person_sample(image, rec, _options(tmp_path, **SQUARE))
    assert json.loads(clipped["json"])["bbox"] == [0.0, 120.0, 4.0, 8.0]
    kept, _ = person_sample(image, rec, _options(tmp_path, clip_box=False, **SQUARE))
    assert json.loads(kept["json"])["bbox"] == [-2.0, 120.0, 6.0, 12.0]
    assert np.frombuffer(kept["bbox.f32"], "<f4").tolist() == [-2, 120, 6, 12]
    outside = PersonRecord("a.png", 1, 3, np.array([96.0, 10.0, 6.0, 12.0]), kp, 1.0)
    assert person_sample(image, outside, _options(tmp_path, clip_box=False)) == (None, "box_outside_image")
    # a box that reaches into the image, but a region (margin 0.1) that stays right of it: no crop
    edge = PersonRecord("a.png", 1, 4, np.array([90.0, 10.0, 20.0, 20.0]), kp, 1.0)
    tiny = _options(tmp_path, clip_box=False, margin=0.1, max_scale=1.0, aspect_range=(1.0, 1.0))
    assert person_sample(image, edge, tiny) == (None, "box_outside_image")


def test_write_shards_entry_sidecars_and_manifest_are_the_inputs(png_folder):
    import hashlib

    from pnfs.data.annotations.records import SkipReport
    from pnfs.data.shards.writer import write_shards

    out = png_folder / "out"
    records = [
        _record(1),
        _record(2, bbox=(5.0, 5.0, 20.0, 30.0)),
        _record(3, image_file="gone.png", image_id=2),
    ]
    records.append(_record(4, bbox=(200.0, 10.0, 5.0, 5.0)))  # right of the 96 px image
    skipped, filtered = SkipReport(), SkipReport()
    filtered.add("iscrowd", "1_9")
    opts = _options(out, shard_size=3)
    entry = write_shards(records, png_folder / "images", opts, skipped, filtered, command=["a", "b"],
                         annotations_total=10, progress=False)  # fmt: skip
    sha = {
        n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in ("val-000000.tar", "val-000001.tar")
    }
    size = {n: (out / n).stat().st_size for n in sha}
    digests = [s["inputs_sha256"] for s in entry["shards"]]
    assert entry == {
        "joint_set": "coco17",
        "counts": {"annotations": 10, "records": 4, "samples": 2, "skipped": 2, "filtered": 1},
        "skipped": {
            "missing_image": {"count": 1, "first_ids": ["2_3"]},
            "box_outside_image": {"count": 1, "first_ids": ["1_4"]},
        },
        "filtered": {"iscrowd": {"count": 1, "first_ids": ["1_9"]}},
        "shards": [
            {"file": n, "samples": k, "bytes": size[n], "sha256": sha[n], "inputs_sha256": d, "reused": False}
            for n, k, d in zip(sha, (2, 0), digests)
        ],
        "options": {"shard_size": 3, "max_side": 768, "margin": 1.25, "max_scale": 1.3,
                    "aspect_range": [0.75, 1.0], "clip_box": True, "quality": 94},
        "command": "a b",
    }  # fmt: skip
    assert skipped.total() == 2  # the caller's report got the shards' skips
    assert (out / MANIFEST).read_text() == json.dumps(
        {"format": "pnfs-webdataset-v1", "splits": {"val": entry}}, indent=1
    )
    assert (out / "val-000001.idx").read_text() == "v1.2 0\n"  # a shard without samples
    assert (out / "val-000000.idx").read_text().startswith("v1.2 2\njpg ")
    assert json.loads((out / PARTS_DIR / "val-000000.tar.json").read_text()) == {
        "file": "val-000000.tar", "samples": 2, "records": 3, "sha256": sha["val-000000.tar"],
        "inputs_sha256": digests[0], "bytes": size["val-000000.tar"],
        "skipped": {"missing_image": {"count": 1, "first_ids": ["2_3"]}},
    }  # fmt: skip
    every = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert every == [".parts", ".parts/val-000000.tar.json", ".parts/val-000001.tar.json", MANIFEST,
                     "val-000000.idx", "val-000000.tar", "val-000001.idx", "val-000001.tar"]  # fmt: skip
    # again: every shard reused, the sidecar's numbers; a sidecar without "bytes" takes the file's
    side = json.loads((out / PARTS_DIR / "val-000001.tar.json").read_text())
    del side["bytes"]
    (out / PARTS_DIR / "val-000001.tar.json").write_text(json.dumps(side))
    again = write_shards(records, png_folder / "images", opts, SkipReport(), SkipReport(), progress=False)
    assert [(s["reused"], s["bytes"], s["sha256"]) for s in again["shards"]] == [
        (True, size[n], sha[n]) for n in sha
    ]
    assert again["counts"] == {"annotations": 4, "records": 4, "samples": 2, "skipped": 2, "filtered": 0}
    import sys

    assert again["command"] == " ".join(sys.argv)


def test_content_options_and_the_inputs_digest_recipe(png_folder):
    import hashlib

    from pnfs.data.shards.writer import content_options, inputs_digest

    opts = _options(png_folder / "out", shard_size=7, max_side=100, margin=1.5, max_scale=1.2,
                    aspect_range=(0.5, 2), clip_box=False, quality=80)  # fmt: skip
    options = {"split": "val", "joint_set": "coco17", "max_side": 100, "margin": 1.5, "max_scale": 1.2,
               "aspect_range": [0.5, 2.0], "clip_box": False, "quality": 80}  # fmt: skip
    assert content_options(opts) == options and isinstance(content_options(opts)["aspect_range"][1], float)
    records = [_record(1), _record(2, image_file="gone.png", image_id=2), _record(3)]
    h = hashlib.sha256(json.dumps({"format": 1, **options}, sort_keys=True).encode())
    png_size = (png_folder / "images" / "a.png").stat().st_size
    for rec, size in zip(records, (png_size, -1, png_size)):  # a missing image counts as -1 bytes
        h.update(f"\n{rec.key}\t{rec.image_file}\t{size}\t".encode())
        h.update(np.asarray(rec.bbox, "<f8").tobytes() + np.asarray(rec.keypoints, "<f8").tobytes())
        h.update(np.asarray([rec.area, rec.score], "<f8").tobytes())
    assert inputs_digest(records, png_folder / "images", opts) == h.hexdigest()
    moved = _options(png_folder / "elsewhere", shard_size=1, max_side=100, margin=1.5, max_scale=1.2,
                     aspect_range=(0.5, 2), clip_box=False, quality=80)  # fmt: skip
    assert inputs_digest(records, png_folder / "images", moved) == h.hexdigest()  # out, shard_size: no


def test_update_manifest_keeps_other_splits_removes_one_and_replaces_a_broken_file(tmp_path):
    from pnfs.data.shards.writer import update_manifest

    assert update_manifest(tmp_path, "val", {"n": 1}) == tmp_path / MANIFEST
    update_manifest(tmp_path, "train", {"n": 2})
    assert json.loads((tmp_path / MANIFEST).read_text()) == {
        "format": "pnfs-webdataset-v1", "splits": {"val": {"n": 1}, "train": {"n": 2}}
    }  # fmt: skip
    update_manifest(tmp_path, "val", None)
    update_manifest(tmp_path, "test", None)  # not there: nothing to remove
    assert json.loads((tmp_path / MANIFEST).read_text())["splits"] == {"train": {"n": 2}}
    (tmp_path / MANIFEST).write_text("{broken")
    update_manifest(tmp_path, "val", {"n": 3})
    assert json.loads((tmp_path / MANIFEST).read_text()) == {
        "format": "pnfs-webdataset-v1",
        "splits": {"val": {"n": 3}},
    }
    (tmp_path / MANIFEST).write_text('{"format": "x"}')  # no splits yet
    update_manifest(tmp_path, "val", {"n": 4})
    assert json.loads((tmp_path / MANIFEST).read_text()) == {"format": "x", "splits": {"val": {"n": 4}}}
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST]


def test_other_inputs_are_refused_naming_three_shards_and_the_count_of_the_rest(png_folder):
    from pnfs.data.shards.writer import StaleShardsError

    out = png_folder / "out"
    _write(png_folder, [_record(i) for i in range(1, 6)], shard_size=1)
    before = sorted((p.name, p.read_bytes()) for p in out.rglob("*") if p.is_file())
    with pytest.raises(StaleShardsError) as e:
        _write(png_folder, [_record(i, bbox=(9.0, 20.0, 30.0, 40.0)) for i in range(1, 6)], shard_size=1)
    assert str(e.value) == (
        f"{out} holds 'val' shards written from other annotations, records or options (val-000000.tar, "
        "val-000001.tar, val-000002.tar and 2 more); pass --overwrite to replace them, "
        "or choose another --out"
    )
    with pytest.raises(StaleShardsError) as e:
        _write(png_folder, [_record(1), _record(2)], shard_size=1)
    assert "options (val-000002.tar, val-000003.tar, val-000004.tar); pass" in str(e.value)
    with pytest.raises(StaleShardsError) as e:
        _write(png_folder, [_record(1)], shard_size=1)
    assert "options (val-000001.tar, val-000002.tar, val-000003.tar and 1 more); pass" in str(e.value)
    assert sorted((p.name, p.read_bytes()) for p in out.rglob("*") if p.is_file()) == before


def test_shard_members_are_gnu_tar_entries_with_fixed_time_and_mode(png_folder):
    import tarfile

    _write(png_folder, [_record(1)])
    tar_path = png_folder / "out" / "val-000000.tar"
    assert tar_path.read_bytes()[257:265] == b"ustar  \x00"  # GNU magic, whatever Python's default
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        f"1_1.{ext}" for ext in ("jpg", "json", "kp.f32", "bbox.f32", "c2i.f32", "score.f32", "ids.i64")
    ]
    assert {(m.mtime, m.mode, m.type) for m in members} == {(0, 0o444, tarfile.REGTYPE)}


def test_a_skipped_image_or_person_does_not_stop_the_shard(png_folder):
    records = [
        _record(1, image_file="gone.png", image_id=2),  # its image is missing
        _record(2, bbox=(200.0, 10.0, 5.0, 5.0)),  # outside a.png
        _record(3),
    ]
    entry = _write(png_folder, records)
    assert entry["counts"]["samples"] == 1 and _keys_on_disk(png_folder / "out") == ["1_3"]
    assert entry["skipped"] == {
        "missing_image": {"count": 1, "first_ids": ["2_1"]},
        "box_outside_image": {"count": 1, "first_ids": ["1_2"]},
    }


def test_write_shards_shows_a_progress_bar_by_person_unless_told_not_to(png_folder, monkeypatch, capsys):
    from pnfs.data.annotations.records import SkipReport
    from pnfs.data.shards import writer
    from pnfs.data.shards.writer import write_shards

    calls: list = []
    monkeypatch.setattr(writer, "get_context", _StandInPool(calls))
    records = [_record(1), _record(2), _record(3)]
    opts = _options(png_folder / "out", shard_size=2)
    write_shards(records, png_folder / "images", opts, SkipReport(), SkipReport())
    assert calls == []  # one worker unless asked: no pool
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("shards val: 100%") and " 3/3 [" in last and "person/s]" in last
    write_shards(records, png_folder / "images", opts, SkipReport(), SkipReport(), progress=False)
    assert capsys.readouterr() == ("", "")


class _StandInPool:
    """What write_shards asks of ``multiprocessing``: records the start method and the pool
    size, runs the tasks here and hands the results back in reverse (unordered) order."""

    def __init__(self, calls: list):
        self.calls = calls

    def __call__(self, method):  # get_context(method)
        self.calls.append(("context", method))
        return self

    def Pool(self, processes):
        self.calls.append(("processes", processes))
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap_unordered(self, fn, tasks):
        tasks = list(tasks)
        self.calls.append(("tasks", [t[0] for t in tasks]))
        return reversed([fn(t) for t in tasks])


@pytest.mark.parametrize(
    "workers, shard_size, processes", [(1, 1, None), (2, 3, None), (2, 1, 2), (5, 1, 3), (3, 2, 2)]
)
def test_workers_write_shards_in_a_spawned_pool_only_when_both_are_more_than_one(
    png_folder, monkeypatch, capsys, workers, shard_size, processes
):
    from pnfs.data.annotations.records import SkipReport
    from pnfs.data.shards import writer

    calls: list = []
    monkeypatch.setattr(writer, "get_context", _StandInPool(calls))
    records = [_record(i) for i in range(1, 4)]
    opts = _options(png_folder / "out", shard_size=shard_size)
    entry = writer.write_shards(
        records, png_folder / "images", opts, SkipReport(), SkipReport(), workers=workers
    )
    shards = -(-3 // shard_size)
    want = (
        []
        if processes is None
        else [("context", "spawn"), ("processes", processes), ("tasks", list(range(shards)))]
    )
    assert calls == want
    assert [s["file"] for s in entry["shards"]] == [f"val-00000{i}.tar" for i in range(shards)]  # sorted back
    assert entry["counts"]["samples"] == 3 and _keys_on_disk(png_folder / "out") == ["1_1", "1_2", "1_3"]
    assert " 3/3 [" in capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]


def test_the_output_folder_is_made_with_its_parents(png_folder):
    from pnfs.data.annotations.records import SkipReport
    from pnfs.data.shards.writer import write_shards

    out = png_folder / "deep" / "er" / "out"
    write_shards(
        [_record(1)], png_folder / "images", _options(out), SkipReport(), SkipReport(), progress=False
    )
    assert sorted(p.name for p in out.iterdir()) == [PARTS_DIR, MANIFEST, "val-000000.idx", "val-000000.tar"]


def test_overwriting_drops_the_splits_manifest_entry_before_deleting_its_shards(png_folder, monkeypatch):
    from pnfs.data.shards import writer

    out = png_folder / "out"
    _write(png_folder, [_record(1), _record(2)], shard_size=1)
    writer.update_manifest(out, "train", {"kept": True})

    def interrupted(task):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _write(png_folder, [_record(1, bbox=(9.0, 20.0, 30.0, 40.0))], shard_size=1, overwrite=True)
    assert json.loads((out / MANIFEST).read_text())["splits"] == {"train": {"kept": True}}
    assert sorted(p.name for p in out.glob("val-*")) == []
