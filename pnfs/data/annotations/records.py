"""Person records: what the readers produce and the shard writer consumes.

A record is one person instance of one image (one ground-truth annotation, or one
detector box with ``--detections``). Coordinates are original-image pixels with the pnfs
pixel convention (pixel (i, j) has its centre at x=j, y=i; see :mod:`pnfs.data.batch`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class PersonRecord:
    """One person.

    image_file: path of the image relative to the image folder
    image_id:   int (COCO image id; MPII: the number in the file name)
    ann_id:     int (COCO annotation id; MPII: row in the annotation list; detections: index)
    bbox:       [4] float64, x, y, w, h in original image pixels
    keypoints:  [K, 3] float64, x, y, v (v > 0: labelled; COCO 1 occluded / 2 visible)
    area:       float (COCO segment area; MPII: box area)
    score:      float, box score (1 for ground-truth boxes)
    """

    image_file: str
    image_id: int
    ann_id: int
    bbox: np.ndarray
    keypoints: np.ndarray
    area: float
    score: float = 1.0

    @property
    def key(self) -> str:
        """The WebDataset sample key ``<image_id>_<ann_id>``."""
        return f"{self.image_id}_{self.ann_id}"


class SkipReport:
    """Counts of skipped (bad) or filtered inputs by reason, keeping the first few ids of each."""

    def __init__(self, keep_ids: int = 10):
        self.keep_ids = keep_ids
        self.counts: OrderedDict[str, int] = OrderedDict()
        self.first_ids: dict[str, list[str]] = {}

    def add(self, reason: str, ident: object, count: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + count
        ids = self.first_ids.setdefault(reason, [])
        if len(ids) < self.keep_ids:
            ids.append(str(ident))

    def merge(self, other: SkipReport | dict) -> None:
        data = other.to_dict() if isinstance(other, SkipReport) else other
        for reason, entry in data.items():
            self.counts[reason] = self.counts.get(reason, 0) + int(entry["count"])
            ids = self.first_ids.setdefault(reason, [])
            ids.extend(entry["first_ids"][: max(0, self.keep_ids - len(ids))])

    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {r: {"count": n, "first_ids": list(self.first_ids.get(r, []))} for r, n in self.counts.items()}


# Reasons a sample is skipped as bad input (manifest "skipped"); one test each.
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
TRUNCATED_JPEG = "truncated_jpeg"  # the file ends inside the image (libjpeg: premature end of JPEG file)
CORRUPT_JPEG = "corrupt_jpeg"  # damaged scan data (libjpeg: premature end of data segment)
BOX_OUTSIDE_IMAGE = "box_outside_image"
ZERO_AREA_BOX = "zero_area_box"
BAD_COORDINATES = "bad_coordinates"  # NaN / inf / negative
WRONG_KEYPOINT_COUNT = "wrong_keypoint_count"
MALFORMED_ANNOTATION = "malformed_annotation"

# Reasons a person is left out by the data set's filter (manifest "filtered"); not errors.
FILTER_CROWD = "iscrowd"
FILTER_NO_AREA = "area_not_positive"
FILTER_NO_KEYPOINTS = "no_labelled_keypoints"
FILTER_LOW_SCORE = "detection_score_below_threshold"
FILTER_NOT_PERSON = "not_person_category"
