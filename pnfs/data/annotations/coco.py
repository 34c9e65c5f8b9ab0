"""COCO person-keypoint annotations (and detector boxes) -> :class:`PersonRecord` s.

Any keypoint set in COCO format reads the same way (``joints``: COCO's 17 by default, CrowdPose's
14, a custom set's K). Filter (the usual top-down protocol): ``iscrowd == 0``, ``area > 0`` and at
least one labelled keypoint (v > 0); an annotation without ``area`` (CrowdPose's) gets the box's
w × h for that filter (the evaluation scores CrowdPose people with its toolkit's 0.53 × w × h,
:func:`pnfs.evaluate.coco.crowdpose_ground_truth`). The box is widened to cover
every labelled keypoint. Bad annotations (malformed, wrong keypoint count, NaN/negative
numbers, zero-area box) are skipped and counted by reason in a :class:`SkipReport`, never raised.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pnfs.data.annotations import records as R
from pnfs.data.annotations.records import PersonRecord, SkipReport
from pnfs.keypoints import COCO, JointSet

PERSON_CATEGORY = 1


def _numbers(value, n: int | None = None) -> list[float] | None:
    """A list of real numbers (length n if given), else None."""
    if not isinstance(value, (list, tuple)) or (n is not None and len(value) != n):
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    return [float(v) for v in value]


def _finite_non_negative(values) -> bool:
    return all(math.isfinite(v) and v >= 0 for v in values)


def widen_box(bbox: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """[x, y, w, h] enlarged to contain every labelled keypoint of [K, 3]."""
    labelled = keypoints[keypoints[:, 2] > 0, :2]
    if len(labelled) == 0:
        return bbox
    x0 = min(bbox[0], labelled[:, 0].min())
    y0 = min(bbox[1], labelled[:, 1].min())
    x1 = max(bbox[0] + bbox[2], labelled[:, 0].max())
    y1 = max(bbox[1] + bbox[3], labelled[:, 1].max())
    return np.array([x0, y0, x1 - x0, y1 - y0])


def load_json(path: str | Path):
    with open(path) as f:
        return json.load(f)


def image_table(data: dict) -> dict[int, dict]:
    """image id -> image entry of a COCO json (entries without an int id are ignored)."""
    return {im["id"]: im for im in data.get("images", []) if isinstance(im, dict) and "id" in im}


def read_coco_persons(
    annotations: str | Path | dict, skipped: SkipReport, filtered: SkipReport, joints: JointSet = COCO
) -> list[PersonRecord]:
    """Ground-truth persons of a COCO-format keypoints json of ``joints``, in annotation order."""
    data = load_json(annotations) if not isinstance(annotations, dict) else annotations
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{annotations}: not a COCO annotation file (no 'annotations' list)")
    images = image_table(data)
    num_joints = joints.num_joints
    out = []
    for i, ann in enumerate(data["annotations"]):
        ident = ann.get("id", f"#{i}") if isinstance(ann, dict) else f"#{i}"
        if not isinstance(ann, dict):
            skipped.add(R.MALFORMED_ANNOTATION, ident)
            continue
        if ann.get("category_id", PERSON_CATEGORY) != PERSON_CATEGORY:
            filtered.add(R.FILTER_NOT_PERSON, ident)
            continue
        bbox = _numbers(ann.get("bbox"), 4)
        kps = _numbers(ann.get("keypoints"))
        image_id, ann_id = ann.get("image_id"), ann.get("id")
        if (
            bbox is None
            or kps is None
            or not isinstance(image_id, int)
            or not isinstance(ann_id, int)
            or image_id not in images
            or "file_name" not in images[image_id]
        ):
            skipped.add(R.MALFORMED_ANNOTATION, ident)
            continue
        if len(kps) != 3 * num_joints:
            skipped.add(R.WRONG_KEYPOINT_COUNT, ident)
            continue
        keypoints = np.asarray(kps, dtype=np.float64).reshape(num_joints, 3)
        labelled = keypoints[keypoints[:, 2] > 0, :2]
        if not _finite_non_negative(bbox) or not _finite_non_negative(labelled.ravel()):
            skipped.add(R.BAD_COORDINATES, ident)
            continue
        if ann.get("iscrowd", 0):
            filtered.add(R.FILTER_CROWD, ident)
            continue
        area = ann.get("area", bbox[2] * bbox[3])
        if not isinstance(area, (int, float)) or not area > 0:
            filtered.add(R.FILTER_NO_AREA, ident)
            continue
        if len(labelled) == 0:
            filtered.add(R.FILTER_NO_KEYPOINTS, ident)
            continue
        if bbox[2] <= 0 or bbox[3] <= 0:
            skipped.add(R.ZERO_AREA_BOX, ident)
            continue
        box = widen_box(np.asarray(bbox, dtype=np.float64), keypoints)
        out.append(
            PersonRecord(
                image_file=str(images[image_id]["file_name"]),
                image_id=image_id,
                ann_id=ann_id,
                bbox=box,
                keypoints=keypoints,
                area=float(area),
            )
        )
    return out


def read_coco_detections(
    detections: str | Path | list,
    annotations: str | Path | dict,
    skipped: SkipReport,
    filtered: SkipReport,
    score_threshold: float = 0.0,
    joints: JointSet = COCO,
) -> list[PersonRecord]:
    """Person boxes of a COCO detection-result list; ``ann_id`` is the index in that list.

    Keypoints are all zero (unlabelled): these samples are for inference only.
    """
    dets = load_json(detections) if not isinstance(detections, list) else detections
    if not isinstance(dets, list):
        raise ValueError(f"{detections}: not a COCO detection-result list")
    data = load_json(annotations) if not isinstance(annotations, dict) else annotations
    images = image_table(data)
    out = []
    for i, det in enumerate(dets):
        bbox = _numbers(det.get("bbox"), 4) if isinstance(det, dict) else None
        if (
            bbox is None
            or det.get("image_id") not in images
            or not isinstance(det.get("score", 1.0), (int, float))
        ):
            skipped.add(R.MALFORMED_ANNOTATION, f"det#{i}")
            continue
        if det.get("category_id", PERSON_CATEGORY) != PERSON_CATEGORY:
            filtered.add(R.FILTER_NOT_PERSON, f"det#{i}")
            continue
        score = float(det.get("score", 1.0))
        if not _finite_non_negative([*bbox, score]):
            skipped.add(R.BAD_COORDINATES, f"det#{i}")
            continue
        if score < score_threshold:
            filtered.add(R.FILTER_LOW_SCORE, f"det#{i}")
            continue
        if bbox[2] <= 0 or bbox[3] <= 0:
            skipped.add(R.ZERO_AREA_BOX, f"det#{i}")
            continue
        image_id = det["image_id"]
        out.append(
            PersonRecord(
                image_file=str(images[image_id]["file_name"]),
                image_id=image_id,
                ann_id=i,
                bbox=np.asarray(bbox, dtype=np.float64),
                keypoints=np.zeros((joints.num_joints, 3)),
                area=bbox[2] * bbox[3],
                score=score,
            )
        )
    return out
