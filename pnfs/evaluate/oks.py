"""Object keypoint similarity (OKS) and greedy OKS-NMS.

COCO's OKS between a prediction ``d`` and a ground-truth person ``g`` with area ``s``:

    OKS = Σ_j exp(-d_j² / (2 s (2σ_j)²)) · [v_j > 0] / Σ_j [v_j > 0]

with d_j the distance of joint j and σ_j its per-joint sigma (``pnfs.keypoints.COCO.sigmas``
for the 17 COCO joints; ``cfg.eval.sigmas`` for custom, CrowdPose-style sets). Between two
*predictions* (OKS-NMS) every joint counts and the area is the mean of the two areas.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pnfs.keypoints import JointSet

EPS = np.spacing(1)


def joint_sigmas(joints: JointSet, sigmas: Sequence[float] | None = None) -> np.ndarray:
    """Per-joint OKS sigmas [K]: ``sigmas`` when given (custom sets), else the set's own."""
    chosen = sigmas if sigmas is not None else joints.sigmas
    if chosen is None:
        raise ValueError(
            f"joint set {joints.name!r} has no OKS sigmas; "
            f"give eval.sigmas (one per joint, {joints.num_joints})"
        )
    out = np.asarray(chosen, dtype=np.float64)
    if out.shape != (joints.num_joints,):
        raise ValueError(
            f"eval.sigmas: expected {joints.num_joints} values for {joints.name!r}, got {len(out)}"
        )
    if not np.all(out > 0):
        raise ValueError(f"eval.sigmas: every sigma must be > 0, got {out.tolist()}")
    return out


def oks(pred: np.ndarray, gt: np.ndarray, gt_area: np.ndarray, sigmas: np.ndarray, gt_box=None) -> np.ndarray:
    """COCO OKS of predictions against ground truth, as pycocotools computes it.

    pred:    [N, K, 2+] predicted (x, y[, score]) in image pixels
    gt:      [M, K, 3]  ground truth (x, y, v); joints with v > 0 count
    gt_area: [M]        ground-truth areas
    gt_box:  [M, 4]     (x, y, w, h); only used for people without labelled joints, where the
                        distance is measured to the box doubled around itself (COCO's rule)
    returns  [N, M]
    """
    pred = np.asarray(pred, dtype=np.float64)[..., :2]
    gt = np.asarray(gt, dtype=np.float64)
    gt_area = np.asarray(gt_area, dtype=np.float64)
    variances = (2 * np.asarray(sigmas, dtype=np.float64)) ** 2  # [K]
    labelled = gt[..., 2] > 0  # [M, K]
    any_labelled = np.asarray(labelled.any(axis=1))  # [M]
    delta = pred[:, None, :, :] - gt[None, :, :, :2]  # [N, M, K, 2]
    if gt_box is not None and not labelled.all(axis=1).all():
        box = np.asarray(gt_box, dtype=np.float64)
        lo = box[:, :2] - box[:, 2:]  # [M, 2]
        hi = box[:, :2] + 2 * box[:, 2:]
        outside = np.maximum(0, lo[None, :, None] - pred[:, None]) + np.maximum(
            0, pred[:, None] - hi[None, :, None]
        )
        none = ~any_labelled  # [M]
        delta = np.where(none[None, :, None, None], outside, delta)
    e = (delta**2).sum(-1) / variances / (gt_area[None, :, None] + EPS) / 2  # [N, M, K]
    counted = np.where(any_labelled[:, None], labelled, True)  # [M, K]
    return (np.exp(-e) * counted[None]).sum(-1) / counted.sum(-1)[None]


def pairwise_oks(keypoints: np.ndarray, areas: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """OKS between every pair of predictions [N, K, 2+] with areas [N] -> [N, N].

    All K joints count; the area of a pair is the mean of the two (the OKS-NMS convention of
    the top-down pose literature).
    """
    xy = np.asarray(keypoints, dtype=np.float64)[..., :2]
    areas = np.asarray(areas, dtype=np.float64)
    variances = (2 * np.asarray(sigmas, dtype=np.float64)) ** 2
    d2 = ((xy[:, None] - xy[None, :]) ** 2).sum(-1)  # [N, N, K]
    pair_area = (areas[:, None] + areas[None, :]) / 2
    e = d2 / variances / (pair_area[..., None] + EPS) / 2
    return np.exp(-e).mean(-1)


def oks_nms(
    keypoints: np.ndarray, scores: np.ndarray, areas: np.ndarray, sigmas: np.ndarray, threshold: float = 0.9
) -> np.ndarray:
    """Greedy OKS-NMS: indices of the kept predictions, best score first.

    Take the best remaining candidate, drop *every* remaining candidate whose OKS with it
    exceeds ``threshold``, repeat (the authors' version skipped one candidate after each
    removal). Ties in score keep the input order.

    keypoints [N, K, 2+], scores [N], areas [N] -> int64 [M] indices into the inputs
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    overlap = pairwise_oks(np.asarray(keypoints)[order], np.asarray(areas)[order], sigmas) > threshold
    removed = np.zeros(n, dtype=bool)
    keep = []
    for i in range(n):  # greedy by nature: each kept candidate decides the ones below it
        if removed[i]:
            continue
        keep.append(order[i])
        removed |= overlap[i]
    return np.asarray(keep, dtype=np.int64)
