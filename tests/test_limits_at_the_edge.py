"""Limits met at their edge (issue 26): at the limit, one step below it and one above it, so
that ``>`` and ``>=`` cannot pass for each other."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pnfs.data.bad_samples import BadSampleError
from pnfs.data.loaders.build import build_loader
from pnfs.evaluate.coco import instance_scores
from pnfs.evaluate.mpii import pckh
from pnfs.evaluate.oks import oks_nms, pairwise_oks
from tests.data.test_bad_samples import _cfg, corrupt, data  # noqa: F401  (module fixtures)

below, above = (lambda x: math.nextafter(x, -math.inf)), (lambda x: math.nextafter(x, math.inf))


def test_max_bad_samples_stops_only_past_the_limit(data, corrupt):  # noqa: F811
    """data.max_bad_samples=N: N bad samples in the epoch pass (reported), N + 1 stop the run."""
    folder, keys = corrupt
    bad = sum(len(k) for k in keys.values())
    assert bad >= 3
    for limit, stops in ((bad - 1, True), (bad, False), (bad + 1, False)):
        loader = build_loader(_cfg(data, f"data.max_bad_samples={limit}"), "train", shards=str(folder))
        if stops:
            with pytest.raises(
                BadSampleError, match=rf"{bad} bad samples, more than data\.max_bad_samples={limit}"
            ):
                list(loader)
        else:
            list(loader)
            assert loader.bad_samples.total == bad


def test_rescoring_counts_joints_strictly_above_0_2():
    """Instance score = box score x mean of the joint scores > 0.2; a joint at exactly 0.2 is out."""
    for low, counted in ((below(0.2), False), (0.2, False), (above(0.2), True)):
        got = instance_scores(np.array([0.5]), np.array([[low, 0.6, 0.0]]))  # default threshold
        want = 0.5 * ((low + 0.6) / 2 if counted else 0.6)
        assert got[0] == pytest.approx(want, rel=1e-12), low


def _pair_at(target: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two people whose OKS is ``target`` (to float64): the second is the first shifted along x."""
    sigmas = np.full(17, 0.05)
    first = np.stack([np.linspace(10, 90, 17), np.linspace(20, 180, 17)], -1)
    areas = np.array([5000.0, 5000.0])

    def value(shift: float) -> float:
        return float(pairwise_oks(np.stack([first, first + np.array([shift, 0.0])]), areas, sigmas)[0, 1])

    lo, hi = 0.0, 50.0  # OKS falls from 1 as the shift grows: bisect for the target
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if value(mid) > target else (lo, mid)
    return np.stack([first, first + np.array([hi, 0.0])]), areas, sigmas


@pytest.mark.parametrize("oks_value, both_kept", [(0.9 - 1e-6, True), (0.9 + 1e-6, False)])
def test_oks_nms_at_its_default_0_9(oks_value, both_kept):
    keypoints, areas, sigmas = _pair_at(oks_value)
    assert pairwise_oks(keypoints, areas, sigmas)[0, 1] == pytest.approx(oks_value, abs=1e-9)
    kept = oks_nms(keypoints, np.array([0.9, 0.8]), areas, sigmas)
    assert kept.tolist() == ([0, 1] if both_kept else [0])


def test_oks_nms_removes_only_an_overlap_that_exceeds_the_threshold():
    keypoints, areas, sigmas = _pair_at(0.9)
    overlap = float(pairwise_oks(keypoints, areas, sigmas)[0, 1])
    scores = np.array([0.3, 0.7])  # the second is taken first
    assert oks_nms(keypoints, scores, areas, sigmas, threshold=overlap).tolist() == [1, 0]
    assert oks_nms(keypoints, scores, areas, sigmas, threshold=above(overlap)).tolist() == [1, 0]
    assert oks_nms(keypoints, scores, areas, sigmas, threshold=below(overlap)).tolist() == [1]


@pytest.mark.parametrize("offset, correct", [(below(5.0), True), (5.0, True), (above(5.0), False)])
def test_pckh_counts_an_error_of_exactly_half_a_head_as_correct(offset, correct):
    """Head size 10 px, every joint off by ``offset`` px along x: PCKh@0.5 is 100 up to 5 px."""
    gt = np.stack([np.zeros(16), np.linspace(50, 400, 16)], -1)[None]  # x = 0: the offset is exact
    pred = gt + np.array([offset, 0.0])
    _, mean = pckh(pred, gt, np.ones((1, 16)), np.array([10.0]), 0.5)
    assert mean == (100.0 if correct else 0.0)
