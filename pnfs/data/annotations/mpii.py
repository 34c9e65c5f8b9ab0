"""MPII annotations (the HRNet/mmpose ``annot/{train,valid}.json`` layout) -> person records.

Each entry holds ``image``, ``center`` [x, y], ``scale`` (person height / 200 px), ``joints``
(16 x [x, y]) and ``joints_vis`` (16 x 0/1) in the raw MPII joint order.

Conversions, stated once:

* coordinates in that json are MATLAB 1-based; we subtract 1 from joints and centre, so they
  follow the pnfs pixel convention (0-based pixel centres), as HRNet's reader does;
* the box is the HRNet one: centre y += 15·scale, a square of side 200·scale px; the loader's
  ``margin`` (1.25) then gives HRNet's ``scale × 1.25`` region;
* joints *and* visibility are re-ordered with :data:`pnfs.keypoints.MPII_FROM_RAW` (the
  authors' code forgot the visibility);
* ``image_id`` is the number in the file name, ``ann_id`` the entry's row in the json (the
  order PCKh evaluation and the head-size file use).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from pnfs.data.annotations import records as R
from pnfs.data.annotations.records import PersonRecord, SkipReport
from pnfs.keypoints import MPII, MPII_FROM_RAW

PIXELS_PER_SCALE = 200.0
CENTRE_SHIFT = 15.0  # HRNet: centre y += 15 * scale


def _image_id(name: str) -> int | None:
    digits = re.sub(r"\D", "", Path(name).stem)
    return int(digits) if digits else None


def mpii_box(center: tuple[float, float], scale: float) -> np.ndarray:
    """[x, y, w, h] (0-based px) of an HRNet-json centre (1-based) and scale."""
    cx = center[0] - 1.0
    cy = center[1] + CENTRE_SHIFT * scale - 1.0
    side = PIXELS_PER_SCALE * scale
    return np.array([cx - side / 2, cy - side / 2, side, side])


def read_mpii_persons(annotations: str | Path | list, skipped: SkipReport) -> list[PersonRecord]:
    """All persons of an MPII annotation json, in file order."""
    if isinstance(annotations, list):
        entries = annotations
    else:
        with open(annotations) as f:
            entries = json.load(f)
    if not isinstance(entries, list):
        raise ValueError(f"{annotations}: not an MPII annotation list")
    num_joints = MPII.num_joints
    order = list(MPII_FROM_RAW)
    out = []
    for row, entry in enumerate(entries):
        ident = f"row{row}"
        try:
            image = str(entry["image"])
            center = [float(v) for v in entry["center"]]
            scale = float(entry["scale"])
            joints = np.asarray(entry["joints"], dtype=np.float64)
            vis = np.asarray(entry["joints_vis"], dtype=np.float64).reshape(-1)
        except (KeyError, TypeError, ValueError):
            skipped.add(R.MALFORMED_ANNOTATION, ident)
            continue
        image_id = _image_id(image)
        if len(center) != 2 or image_id is None or joints.ndim != 2 or joints.shape[1] != 2:
            skipped.add(R.MALFORMED_ANNOTATION, ident)
            continue
        if joints.shape[0] != num_joints or vis.shape[0] != num_joints:
            skipped.add(R.WRONG_KEYPOINT_COUNT, ident)
            continue
        labelled = joints[vis > 0] - 1.0
        if (
            not all(math.isfinite(v) for v in [*center, scale])
            or not np.isfinite(labelled).all()
            or (labelled < 0).any()
            or min(center) < 0
        ):
            skipped.add(R.BAD_COORDINATES, ident)
            continue
        if scale <= 0:
            skipped.add(R.ZERO_AREA_BOX, ident)
            continue
        keypoints = np.concatenate([joints - 1.0, (vis > 0)[:, None].astype(np.float64)], 1)[order]
        keypoints[keypoints[:, 2] == 0, :2] = 0.0
        box = mpii_box((center[0], center[1]), scale)
        out.append(
            PersonRecord(
                image_file=image,
                image_id=image_id,
                ann_id=row,
                bbox=box,
                keypoints=keypoints,
                area=float(box[2] * box[3]),
            )
        )
    return out
