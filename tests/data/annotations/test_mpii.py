"""pnfs.data.annotations.mpii on the real MPII sample: 1-based MATLAB joints to 0-based, raw
order to ours (MPII_FROM_RAW), and HRNet's box from centre and scale."""

from __future__ import annotations

import json

import numpy as np

from pnfs.data.annotations.mpii import read_mpii_persons
from pnfs.data.annotations.records import SkipReport
from pnfs.keypoints import MPII_FROM_RAW


def test_mpii_reader_converts_to_zero_based_and_our_order(shared_data):
    entries = json.loads((shared_data / "mpii_sample" / "test_mpii.json").read_text())
    recs = read_mpii_persons(entries, SkipReport())
    assert len(recs) == 3
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
