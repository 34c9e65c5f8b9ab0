"""Person records -> WebDataset shards: ``OUT/<split>-%06d.tar`` + ``OUT/manifest.json``.

One sample per person, key ``<image_id>_<ann_id>``, with the components

    jpg        RGB JPEG crop of everything any augmentation can reach (downscaled to max_side)
    json       image_id, ann_id, bbox [x, y, w, h] (original px), keypoints [[x, y, v], ...]
               (crop px), crop_to_image (2x3, crop px -> original px), score,
               image_size [width, height], crop_size [width, height], image_file, area, joint_set
    kp.f32     [K, 3] keypoints (crop px), little-endian float32      } the same numbers as raw
    bbox.f32   [4] box (original px)                                  } arrays, for DALI and the
    c2i.f32    [2, 3] crop_to_image                                   } torch loader (they only
    score.f32  [1] box score                                          } check the json parses)
    ids.i64    [2] image_id, ann_id, little-endian int64

Each shard is written under a temporary name and renamed when complete, together with its
DALI index (``.idx``, wds2idx v1.2 format) and a stats sidecar in ``OUT/.parts``. A shard is
a pure function of its inputs: the sidecar stores ``inputs_sha256``, a hash of the shard's
records, the size of each of their image files and every option that changes the bytes
(:func:`inputs_digest`). A re-run reuses a complete shard only when that hash matches (an
interrupted run resumes); shards of the split written from other inputs, or left beyond the
new shard count, are refused (:class:`StaleShardsError`) unless ``overwrite=True``, which
deletes them first. The manifest always lists exactly the shards on disk. Bad input never
crashes the run: it is skipped and counted by reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import simplejpeg

from pnfs.data.annotations import records as R
from pnfs.data.annotations.records import PersonRecord, SkipReport
from pnfs.data.geometry import compose, invert, reachable_region, transform_points
from pnfs.data.shards.reader import read_index, write_index
from pnfs.errors import DataError

MANIFEST = "manifest.json"
PARTS_DIR = ".parts"
COMPONENTS = ("jpg", "json", "kp.f32", "bbox.f32", "c2i.f32", "score.f32", "ids.i64")
SHARD_FORMAT = 1  # bump when the bytes written for the same inputs change


@dataclass
class ShardOptions:
    out: Path
    split: str
    joint_set: str
    shard_size: int = 512
    max_side: int = 768  # longest crop side in px; larger crops are downscaled (INTER_AREA)
    margin: float = 1.25  # must cover the loader's data.margin
    max_scale: float = 1.3  # must cover the loader's data.scale_range[1]
    aspect_range: tuple[float, float] = (0.75, 1.0)  # input W/H the crops cover (256x192 .. square)
    clip_box: bool = True  # clip the person box to the image (COCO/HRNet); MPII boxes are kept
    quality: int = 94  # JPEG quality of the crops, 4:4:4 (4:2:0 blurs colour edges past 3/255 MAD)


# --------------------------------------------------------------------------- image decoding


class ImageError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def decode_image(path: Path) -> np.ndarray:
    """RGB uint8 [H, W, 3] of an image file; raises :class:`ImageError` with a skip reason.

    EXIF orientation is ignored on purpose (COCO/MPII annotate the stored pixels).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(R.MISSING_IMAGE, f"{path}: no such file") from None
    except OSError as e:
        raise ImageError(R.UNREADABLE_IMAGE, f"{path}: {e}") from None
    if data[:2] == b"\xff\xd8":
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        except ValueError as e:
            message = str(e).lower()
            if "premature end of jpeg file" in message:
                raise ImageError(R.TRUNCATED_JPEG, f"{path}: {e}") from None
            if "premature end of data segment" in message:  # the rest of the image would be grey
                raise ImageError(R.CORRUPT_JPEG, f"{path}: {e}") from None
            try:  # benign libjpeg warnings (extraneous bytes, ...) do not make a bad image
                return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=False)
            except ValueError as e2:
                raise ImageError(R.UNREADABLE_IMAGE, f"{path}: {e2}") from None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise ImageError(R.UNREADABLE_IMAGE, f"{path}: not a decodable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------- one sample


def clip_box(bbox: np.ndarray, width: int, height: int) -> np.ndarray | None:
    """[x, y, w, h] clipped to the image area [0, W] x [0, H]; None if nothing is left."""
    x0, y0 = max(bbox[0], 0.0), max(bbox[1], 0.0)
    x1, y1 = min(bbox[0] + bbox[2], float(width)), min(bbox[1] + bbox[3], float(height))
    if x1 <= x0 or y1 <= y0:
        return None
    return np.array([x0, y0, x1 - x0, y1 - y0])


def crop_person(image: np.ndarray, bbox: np.ndarray, opts: ShardOptions) -> tuple[np.ndarray, np.ndarray]:
    """(crop [h, w, 3], crop_to_image [2, 3]) of the reachable region, clipped to the image."""
    height, width = image.shape[:2]
    rx0, ry0, rx1, ry1 = reachable_region(bbox, opts.margin, opts.max_scale, tuple(opts.aspect_range))
    # pixel j covers [j - 0.5, j + 0.5): keep every pixel the region touches
    x0, y0 = max(0, math.floor(rx0 + 0.5)), max(0, math.floor(ry0 + 0.5))
    x1, y1 = min(width, math.ceil(rx1 + 0.5)), min(height, math.ceil(ry1 + 0.5))
    crop = image[y0:y1, x0:x1]
    ch, cw = crop.shape[:2]
    to_image = np.array([[1.0, 0.0, x0], [0.0, 1.0, y0]])
    if opts.max_side and max(ch, cw) > opts.max_side:
        f = opts.max_side / max(ch, cw)
        nw, nh = max(1, round(cw * f)), max(1, round(ch * f))
        crop = cv2.resize(crop, (nw, nh), interpolation=cv2.INTER_AREA)
        fx, fy = nw / cw, nh / ch
        # cv2.resize maps pixel centres: src = (dst + 0.5) / f - 0.5
        resized_to_crop = np.array([[1 / fx, 0.0, 0.5 / fx - 0.5], [0.0, 1 / fy, 0.5 / fy - 0.5]])
        to_image = compose(to_image, resized_to_crop)
    return np.ascontiguousarray(crop), to_image


def person_sample(
    image: np.ndarray, record: PersonRecord, opts: ShardOptions
) -> tuple[dict[str, bytes] | None, str | None]:
    """Encode one person; returns (components, None) or (None, skip reason)."""
    height, width = image.shape[:2]
    box = clip_box(record.bbox, width, height)
    if box is None:
        return None, R.BOX_OUTSIDE_IMAGE
    if not opts.clip_box:
        box = record.bbox
    crop, to_image = crop_person(image, box, opts)
    if crop.size == 0:
        return None, R.BOX_OUTSIDE_IMAGE
    kp = record.keypoints.copy()
    labelled = kp[:, 2] > 0
    kp[labelled, :2] = transform_points(invert(to_image), kp[labelled, :2])
    kp[~labelled] = 0.0
    meta = {
        "image_id": record.image_id,
        "ann_id": record.ann_id,
        "bbox": [float(v) for v in box],
        "keypoints": [[float(x), float(y), float(v)] for x, y, v in kp],
        "crop_to_image": to_image.tolist(),
        "score": float(record.score),
        "image_size": [width, height],
        "crop_size": [crop.shape[1], crop.shape[0]],
        "image_file": record.image_file,
        "area": float(record.area),
        "joint_set": opts.joint_set,
    }
    sample = {
        "jpg": simplejpeg.encode_jpeg(crop, quality=opts.quality, colorspace="RGB", colorsubsampling="444"),
        "json": json.dumps(meta).encode(),
        "kp.f32": kp.astype("<f4").tobytes(),
        "bbox.f32": np.asarray(box, dtype="<f4").tobytes(),
        "c2i.f32": to_image.astype("<f4").tobytes(),
        "score.f32": np.asarray([record.score], dtype="<f4").tobytes(),
        "ids.i64": np.asarray([record.image_id, record.ann_id], dtype="<i8").tobytes(),
    }
    return sample, None


# --------------------------------------------------------------------------- shard files


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes -> reproducible sha256
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _group_by_image(records: Sequence[PersonRecord]) -> list[tuple[str, list[PersonRecord]]]:
    groups: dict[str, list[PersonRecord]] = {}
    for rec in records:
        groups.setdefault(rec.image_file, []).append(rec)
    return list(groups.items())


def content_options(opts: ShardOptions) -> dict:
    """The options that change a shard's bytes (``out`` and ``shard_size`` do not: the size is
    in the records a shard gets)."""
    return {
        "split": opts.split,
        "joint_set": opts.joint_set,
        "max_side": opts.max_side,
        "margin": opts.margin,
        "max_scale": opts.max_scale,
        "aspect_range": [float(v) for v in opts.aspect_range],
        "clip_box": opts.clip_box,
        "quality": opts.quality,
    }


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1  # missing or unreadable: the writer skips it, and a new file changes the hash


def inputs_digest(records: Sequence[PersonRecord], image_dir: Path, opts: ShardOptions) -> str:
    """sha256 of what one shard is made from: the format, the content options and, per record,
    its key, image file (name and byte size), box, keypoints, area and score (float64 bytes)."""
    h = hashlib.sha256(json.dumps({"format": SHARD_FORMAT, **content_options(opts)}, sort_keys=True).encode())
    sizes: dict[str, int] = {}
    for rec in records:
        if rec.image_file not in sizes:
            sizes[rec.image_file] = _file_size(image_dir / rec.image_file)
        h.update(f"\n{rec.key}\t{rec.image_file}\t{sizes[rec.image_file]}\t".encode())
        h.update(np.asarray(rec.bbox, dtype="<f8").tobytes())
        h.update(np.asarray(rec.keypoints, dtype="<f8").tobytes())
        h.update(np.asarray([rec.area, rec.score], dtype="<f8").tobytes())
    return h.hexdigest()


class StaleShardsError(DataError):
    """``OUT`` holds shards of the split that the current inputs would not write."""


def _existing_shards(out: Path, split: str) -> dict[int, list[Path]]:
    """index -> the files of shard ``<split>-<index>`` present in ``out`` (tar, idx, sidecar)."""
    found: dict[int, list[Path]] = {}
    prefix = f"{split}-"
    candidates = [
        *out.glob(f"{split}-*.tar"),
        *out.glob(f"{split}-*.idx"),
        *(out / PARTS_DIR).glob(f"{split}-*.tar.json"),
    ]
    for path in candidates:
        digits = path.name[len(prefix) :].split(".", 1)[0]
        if len(digits) == 6 and digits.isdigit():
            found.setdefault(int(digits), []).append(path)
    return found


def _stored_digest(out: Path, name: str) -> str | None:
    """The ``inputs_sha256`` of a complete shard (tar, idx and sidecar present), else None."""
    final, stats_path = out / name, out / PARTS_DIR / f"{name}.json"
    if not (final.exists() and final.with_suffix(".idx").exists() and stats_path.exists()):
        return None
    try:
        return json.loads(stats_path.read_text()).get("inputs_sha256")
    except (OSError, json.JSONDecodeError):
        return None


def stale_shards(out: Path, split: str, digests: Sequence[str]) -> list[Path]:
    """Files of ``split`` in ``out`` that the shards with these input digests would not reuse:
    written from other records or options, incomplete, or beyond the new count."""
    stale: list[Path] = []
    for index, files in sorted(_existing_shards(out, split).items()):
        name = shard_name(split, index)
        if index >= len(digests) or _stored_digest(out, name) != digests[index]:
            stale += sorted(files)
    return stale


def write_shard(task: tuple[int, list[PersonRecord], Path, ShardOptions, str]) -> dict:
    """Write shard ``index`` (reused when complete with the same ``inputs_sha256``); returns its stats."""
    index, records, image_dir, opts, digest = task
    cv2.setNumThreads(1)
    name = shard_name(opts.split, index)
    final = opts.out / name
    stats_path = opts.out / PARTS_DIR / f"{name}.json"
    if _stored_digest(opts.out, name) == digest:
        stats = json.loads(stats_path.read_text())
        stats["reused"] = True
        return stats
    skipped = SkipReport()
    tmp = opts.out / f".{name}.tmp"
    count = 0
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for image_file, persons in _group_by_image(records):
            try:
                image = decode_image(image_dir / image_file)
            except ImageError as e:
                for rec in persons:
                    skipped.add(e.reason, rec.key)
                continue
            for rec in persons:
                sample, reason = person_sample(image, rec, opts)
                if sample is None:
                    assert reason is not None  # person_sample names why it made no sample
                    skipped.add(reason, rec.key)
                    continue
                for ext in COMPONENTS:
                    _tar_add(tar, f"{rec.key}.{ext}", sample[ext])
                count += 1
    tmp_idx = opts.out / f".{name}.idx.tmp"
    if count:
        write_index(tmp, tmp_idx)
    else:
        tmp_idx.write_text("v1.2 0\n")
    stats = {
        "file": name,
        "samples": count,
        "records": len(records),
        "sha256": sha256_file(tmp),
        "inputs_sha256": digest,
        "bytes": tmp.stat().st_size,
        "skipped": skipped.to_dict(),
    }
    tmp_stats = stats_path.with_name(f".{stats_path.name}.tmp")
    tmp_stats.write_text(json.dumps(stats))
    os.replace(tmp_stats, stats_path)
    os.replace(tmp_idx, final.with_suffix(".idx"))
    os.replace(tmp, final)
    stats["reused"] = False
    return stats


# --------------------------------------------------------------------------- the run


def update_manifest(out: Path, split: str, entry: dict | None) -> Path:
    """Merge one split's entry into ``OUT/manifest.json`` (other splits are kept); ``None``
    removes the split's entry (its shards are about to change)."""
    path = out / MANIFEST
    manifest: dict[str, Any] = {"format": "pnfs-webdataset-v1", "splits": {}}
    if path.exists():
        with contextlib.suppress(json.JSONDecodeError):
            manifest = json.loads(path.read_text())
    splits = manifest.setdefault("splits", {})
    if entry is None:
        splits.pop(split, None)
    else:
        splits[split] = entry
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)
    return path


def write_shards(
    records: Sequence[PersonRecord],
    image_dir: Path,
    opts: ShardOptions,
    skipped: SkipReport,
    filtered: SkipReport,
    workers: int = 1,
    command: Sequence[str] | None = None,
    annotations_total: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Write all shards of one split and its manifest entry; returns the entry.

    Raises :class:`StaleShardsError` (nothing written) when ``opts.out`` holds shards of the
    split that these inputs would not reuse, unless ``overwrite``: then they are deleted first.
    """
    size = max(1, opts.shard_size)
    chunks = [list(records[start : start + size]) for start in range(0, len(records), size)]
    digests = [inputs_digest(chunk, image_dir, opts) for chunk in chunks]
    stale = stale_shards(opts.out, opts.split, digests) if opts.out.is_dir() else []
    if stale and not overwrite:
        names = sorted(
            {p.name.removesuffix(".json").removesuffix(".idx").removesuffix(".tar") + ".tar" for p in stale}
        )
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise StaleShardsError(
            f"{opts.out} holds '{opts.split}' shards written from other annotations, records or "
            f"options ({shown}); pass --overwrite to replace them, or choose another --out"
        )
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / PARTS_DIR).mkdir(exist_ok=True)
    if stale:
        update_manifest(opts.out, opts.split, None)  # the manifest never lists a deleted shard
        for path in stale:
            path.unlink()
    tasks = [(i, chunk, image_dir, opts, digest) for i, (chunk, digest) in enumerate(zip(chunks, digests))]
    results: list[dict] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(records), unit="person", desc=f"shards {opts.split}", file=sys.stderr)
    if workers > 1 and len(tasks) > 1:
        with get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            for stats in pool.imap_unordered(write_shard, tasks):
                results.append(stats)
                if bar:
                    bar.update(stats["records"])
    else:
        for task in tasks:
            stats = write_shard(task)
            results.append(stats)
            if bar:
                bar.update(stats["records"])
    if bar:
        bar.close()
    results.sort(key=lambda s: s["file"])
    for stats in results:
        skipped.merge(stats["skipped"])
    entry = {
        "joint_set": opts.joint_set,
        "counts": {
            "annotations": annotations_total if annotations_total is not None else len(records),
            "records": len(records),
            "samples": sum(s["samples"] for s in results),
            "skipped": skipped.total(),
            "filtered": filtered.total(),
        },
        "skipped": skipped.to_dict(),
        "filtered": filtered.to_dict(),
        "shards": [
            {
                "file": s["file"],
                "samples": s["samples"],
                "bytes": s.get("bytes", (opts.out / s["file"]).stat().st_size),
                "sha256": s["sha256"],
                "inputs_sha256": s["inputs_sha256"],
                "reused": s["reused"],
            }
            for s in results
        ],
        "options": {
            "shard_size": opts.shard_size,
            "max_side": opts.max_side,
            "margin": opts.margin,
            "max_scale": opts.max_scale,
            "aspect_range": list(opts.aspect_range),
            "clip_box": opts.clip_box,
            "quality": opts.quality,
        },
        "command": " ".join(command) if command is not None else " ".join(sys.argv),
    }
    update_manifest(opts.out, opts.split, entry)
    return entry


def verify_shards(out: Path, split: str) -> list[str]:
    """Re-read every shard of ``split``: sha256, index, every component; returns the problems."""
    manifest = json.loads((out / MANIFEST).read_text())
    entry = manifest["splits"][split]
    problems = []
    for shard in entry["shards"]:
        path = out / shard["file"]
        if not path.exists():
            problems.append(f"{path}: missing")
            continue
        if sha256_file(path) != shard["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
        index = read_index(path)
        if len(index) != shard["samples"]:
            problems.append(f"{path}: {len(index)} samples, manifest says {shard['samples']}")
        with open(path, "rb") as f:
            for key, comps in index:
                missing = [c for c in COMPONENTS if c not in comps]
                if missing:
                    problems.append(f"{path}: sample {key} lacks {missing}")
                    continue
                blobs = {}
                for ext, (off, size) in comps.items():
                    f.seek(off)
                    blobs[ext] = f.read(size)
                try:
                    meta = json.loads(blobs["json"])
                    crop = simplejpeg.decode_jpeg(blobs["jpg"], colorspace="RGB")
                    kp = np.frombuffer(blobs["kp.f32"], "<f4").reshape(-1, 3)
                except ValueError as e:
                    problems.append(f"{path}: sample {key}: {e}")
                    continue
                if list(crop.shape[1::-1]) != meta["crop_size"]:
                    problems.append(f"{path}: sample {key}: jpg size differs from json crop_size")
                if not np.allclose(kp, np.asarray(meta["keypoints"], dtype=np.float32)):
                    problems.append(f"{path}: sample {key}: kp.f32 differs from json keypoints")
    return problems
