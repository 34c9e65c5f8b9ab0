"""pnfs.data.annotations.coco: the reader widens a person's box to hold all its labelled
keypoints (the readers' bad-input cases run through data_prep/shard_coco.py in
tests/data_prep/test_shard_coco.py)."""

from __future__ import annotations

from pnfs.data.annotations.coco import read_coco_persons
from pnfs.data.annotations.records import SkipReport
from tests.data_prep.test_shard_coco import _person


def test_coco_reader_widens_the_box_to_the_keypoints():
    data = {
        "images": [{"id": 1, "file_name": "a.jpg"}],
        "annotations": [_person(bbox=(30.0, 30.0, 5.0, 5.0))],
    }
    (rec,) = read_coco_persons(data, SkipReport(), SkipReport())
    x, y, w, h = rec.bbox
    assert (x, y) == (20.0, 20.0) and x + w == 36.0 and y + h == 68.0
