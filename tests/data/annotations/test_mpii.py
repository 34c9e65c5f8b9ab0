"""pnfs.data.annotations.mpii on the real MPII sample: 1-based MATLAB joints to 0-based, raw
order to ours (MPII_FROM_RAW), and HRNet's box from centre and scale."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pnfs.data.annotations.mpii import mpii_box, read_mpii_persons
from pnfs.data.annotations.records import SkipReport
from pnfs.keypoints import MPII_FROM_RAW


def test_mpii_reader_converts_to_zero_based_and_our_order(shared_data):
    entries = json.loads((shared_data / "mpii_sample" / "test_mpii.json").read_text())
    recs = read_mpii_persons(entries, SkipReport())
    assert [r.ann_id for r in recs] == [0, 1, 2]  # the row in the file, each entry kept
    raw = np.asarray(entries[1]["joints"])
    vis = np.asarray(entries[1]["joints_vis"])
    kp = recs[1].keypoints
    order = list(MPII_FROM_RAW)
    np.testing.assert_array_equal(kp[:, 2], vis[order])  # visibility re-ordered with the joints
    lab = vis[order] > 0
    np.testing.assert_allclose(kp[lab, :2], raw[order][lab] - 1.0)
    # HRNet box: centre y + 15 * scale, side 200 * scale (the loader's margin adds the x1.25)
    s, (cx, cy) = entries[1]["scale"], entries[1]["center"]
    x, y, w, h = recs[1].bbox
    np.testing.assert_allclose([x + w / 2, y + h / 2, w], [cx - 1, cy + 15 * s - 1, 200 * s])
    assert recs[1].image_id == 51423444 and recs[1].ann_id == 1


# ----------------------------------------------------------------------------- hand-made entries

# ours[i] = raw[RAW_OF_OURS[i]], written out from docs/data.md's joint lists (not the reader's table)
RAW_OF_OURS = (9, 8, 7, 13, 12, 14, 11, 15, 10, 3, 2, 4, 1, 5, 0, 6)


DROP = object()  # a field left out of the entry


def entry(**fields) -> dict:
    """An HRNet-json MPII entry: raw joint j at (10 + j, 100 + 2 j) (1-based), all visible."""
    out = {
        "image": "015601864.jpg",
        "center": [101.0, 51.0],
        "scale": 2.0,
        "joints": [[10.0 + j, 100.0 + 2 * j] for j in range(16)],
        "joints_vis": [1] * 16,
    }
    out.update(fields)
    return out


def read(entries: list) -> tuple[list, dict]:
    skipped = SkipReport()
    people = read_mpii_persons(entries, skipped)
    return people, skipped.to_dict()


def test_mpii_box_is_hrnets_square_below_the_centre():
    """centre (101, 51) 1-based, scale 2: centre (100, 50 + 30), side 400, in 0-based px."""
    np.testing.assert_array_equal(mpii_box((101.0, 51.0), 2.0), [-100.0, -120.0, 400.0, 400.0])
    np.testing.assert_array_equal(mpii_box((1.0, 1.0), 0.5), [-50.0, -42.5, 100.0, 100.0])


def test_a_hand_made_entry_becomes_one_record_with_every_field():
    vis = [1] * 16
    vis[2] = vis[13] = 0  # raw 2 (r_hip) is our 7, raw 13 (l_shoulder) our 3
    joints = [[10.0 + j, 100.0 + 2 * j] for j in range(16)]
    joints[13] = [float("nan"), -5.0]  # an unlabelled joint's numbers are not read
    (rec,), skipped = read([entry(joints=joints, joints_vis=vis, image="images/07/000123.jpg")])
    assert skipped == {}
    assert rec.image_file == "images/07/000123.jpg" and rec.image_id == 123 and rec.ann_id == 0
    assert rec.key == "123_0" and rec.score == 1.0
    expected = np.zeros((16, 3))
    for ours, raw in enumerate(RAW_OF_OURS):
        if vis[raw]:
            expected[ours] = [10.0 + raw - 1, 100.0 + 2 * raw - 1, 1.0]
    np.testing.assert_array_equal(rec.keypoints, expected)
    np.testing.assert_array_equal(rec.bbox, [-100.0, -120.0, 400.0, 400.0])
    assert rec.area == 160000.0 and type(rec.area) is float


def test_records_come_in_file_order_with_the_row_as_ann_id_and_skipped_rows_counted(tmp_path):
    entries = [
        entry(image="1.jpg"),
        entry(image="no-digits.jpg"),
        entry(image="3.jpg", joints_vis=[[1]] * 16),
    ]
    path = tmp_path / "valid.json"
    path.write_text(json.dumps(entries))
    skipped = SkipReport()
    people = read_mpii_persons(path, skipped)  # from a file, the same as from the list
    assert [(p.image_id, p.ann_id) for p in people] == [(1, 0), (3, 2)]
    assert skipped.to_dict() == {"malformed_annotation": {"count": 1, "first_ids": ["row1"]}}
    assert people[1].keypoints[:, 2].tolist() == [1.0] * 16  # [[v], ...] is read flat
    assert read_mpii_persons(str(path), SkipReport())[0].key == "1_0"


def test_not_a_list_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "annot.json"
    path.write_text('{"image": "1.jpg"}')
    with pytest.raises(ValueError, match=f"{path}: not an MPII annotation list"):
        read_mpii_persons(path, SkipReport())


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"image": DROP}, "malformed_annotation"),
        ({"center": None}, "malformed_annotation"),
        ({"center": [1.0, "x"]}, "malformed_annotation"),
        ({"center": [1.0, 2.0, 3.0]}, "malformed_annotation"),
        ({"scale": "big"}, "malformed_annotation"),
        ({"joints": [10.0] * 16}, "malformed_annotation"),  # one number per joint
        ({"joints": [[1.0, 2.0, 3.0]] * 16}, "malformed_annotation"),
        ({"joints_vis": "all"}, "malformed_annotation"),
        ({"joints": [["a", 2.0]] * 16}, "malformed_annotation"),
        ({"image": "abc.jpg"}, "malformed_annotation"),
        ({"joints": [[1.0, 2.0]] * 15}, "wrong_keypoint_count"),
        ({"joints_vis": [1] * 17}, "wrong_keypoint_count"),
        ({"center": [float("nan"), 2.0]}, "bad_coordinates"),
        ({"scale": float("inf")}, "bad_coordinates"),
        ({"center": [-1.0, 2.0]}, "bad_coordinates"),
        ({"center": [2.0, -0.5]}, "bad_coordinates"),
        ({"joints": [[0.5, 5.0]] * 16}, "bad_coordinates"),  # 1-based 0.5 is -0.5 0-based
        ({"joints": [[5.0, 0.5]] * 16}, "bad_coordinates"),
        ({"joints": [[5.0, float("inf")]] * 16}, "bad_coordinates"),
        ({"scale": 0.0}, "zero_area_box"),
        ({"scale": -1.0, "center": [5.0, 5.0]}, "zero_area_box"),
    ],
)
def test_each_bad_entry_is_skipped_by_its_reason_and_the_good_one_kept(fields, reason):
    bad = {k: v for k, v in entry(**fields).items() if v is not DROP}
    people, skipped = read([bad, entry(image="1.jpg")])  # the good one after the bad one
    assert [(p.image_id, p.ann_id) for p in people] == [(1, 1)]
    assert skipped == {reason: {"count": 1, "first_ids": ["row0"]}}


def test_coordinates_at_their_lower_edge_are_kept():
    """A joint at 1-based 1 is pixel 0; a centre at 0 is allowed (only below 0 is bad)."""
    (rec,), skipped = read([entry(joints=[[1.0, 1.0]] * 16, center=[0.0, 0.0], scale=1e-3)])
    assert skipped == {}
    np.testing.assert_array_equal(rec.keypoints[:, :2], np.zeros((16, 2)))
    np.testing.assert_allclose(rec.bbox, [-1.1, -1.085, 0.2, 0.2])
