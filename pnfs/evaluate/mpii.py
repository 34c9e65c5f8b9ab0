"""MPII PCKh: per-joint accuracy normalised by head size, in the layout of the paper's Table IV.

A joint counts as correct when ``‖pred − gt‖ <= threshold × head_size`` (head size =
0.6 × the diagonal of the annotated head box, or given per person). Only visible
(annotated) joints are scored. The mean leaves out pelvis and thorax and weights every other
joint by how many visible instances it has. All values are percentages.

Note on "PCKh@0.1": the HRNet / SimpleBaseline evaluation code (also used by the PNFS
authors) builds thresholds as ``np.arange(0, 0.51, 0.01)`` and reads row 11, which is
**0.11**, not 0.1. We report 0.1 exactly; ``hrnet_compat=True`` (``--hrnet-compat``)
reproduces their 0.11 to compare with numbers from that lineage, including the paper's.

Command line (predictions in our joint order, 0-based original-image pixels, as
``launch/evaluate.py`` writes them)::

    python -m pnfs.evaluate.mpii --annotations valid.json --head-sizes gt_valid.mat \
        --predictions mpii_results.json [--hrnet-compat] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pnfs.keypoints import MPII, MPII_FROM_RAW

HEAD_SIZE_FACTOR = 0.6
HRNET_THRESHOLD_AT_01 = 0.11  # np.arange(0, 0.51, 0.01)[11]
EXCLUDED_FROM_MEAN = ("pelvis", "thorax")
TABLE_IV_COLUMNS = ("Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean", "Mean@0.1")
_GROUPS = {  # Table IV column -> joints (left/right averaged, as the HRNet lineage prints it)
    "Head": ("head_top",),
    "Shoulder": ("left_shoulder", "right_shoulder"),
    "Elbow": ("left_elbow", "right_elbow"),
    "Wrist": ("left_wrist", "right_wrist"),
    "Hip": ("left_hip", "right_hip"),
    "Knee": ("left_knee", "right_knee"),
    "Ankle": ("left_ankle", "right_ankle"),
}


def head_size_from_box(head_box: np.ndarray) -> np.ndarray:
    """0.6 × diagonal of head boxes [N, 4] (x1, y1, x2, y2) -> [N]."""
    box = np.asarray(head_box, dtype=np.float64)
    return HEAD_SIZE_FACTOR * np.linalg.norm(box[:, 2:] - box[:, :2], axis=1)


def head_sizes_from_gt_mat(path: str | Path, num_persons: int | None = None) -> np.ndarray:
    """Head sizes [N] from HRNet's ``annot/gt_valid.mat`` (the MPII validation ground truth).

    The file holds ``headboxes_src`` [2, 2, N] (corner: top-left, bottom-right; x, y;
    person), ``jnt_missing`` [16, N] and ``pos_gt_src`` [16, 2, N]. The head size is the
    standard MPII evaluation's (``evalPCKh.m`` of the MPII benchmark, reproduced in HRNet's
    ``lib/dataset/mpii.py`` as ``SC_BIAS * norm(headboxes_src[1] - headboxes_src[0])``)::

        head_size = 0.6 * ‖(x2, y2) − (x1, y1)‖

    Persons are in the order of ``valid.json``; ``num_persons`` checks the count.
    """
    import scipy.io

    path = Path(path)
    try:
        mat = scipy.io.loadmat(str(path))
    except (OSError, ValueError, scipy.io.matlab.MatReadError) as err:
        raise ValueError(f"data.val_head_sizes: {str(path)!r} cannot be read as a .mat file: {err}") from None
    boxes = mat.get("headboxes_src")
    if boxes is None:
        raise ValueError(
            f"data.val_head_sizes: {str(path)!r} has no 'headboxes_src' (HRNet's annot/gt_valid.mat has it)"
        )
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 3 or boxes.shape[:2] != (2, 2):
        raise ValueError(
            f"data.val_head_sizes: {str(path)!r}: headboxes_src must be [2, 2, N], got {list(boxes.shape)}"
        )
    if num_persons is not None and boxes.shape[2] != num_persons:
        raise ValueError(
            f"data.val_head_sizes: {str(path)!r} has {boxes.shape[2]} head boxes, the annotations "
            f"{num_persons} persons; use the gt_valid.mat that belongs to this valid.json"
        )
    return HEAD_SIZE_FACTOR * np.linalg.norm(boxes[1] - boxes[0], axis=0)


def pckh(
    pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, head_size: np.ndarray, threshold: float
) -> tuple[np.ndarray, float]:
    """PCKh per joint and the mean, in percent.

    pred, gt [N, 16, 2] in MPII joint order (ours, :data:`pnfs.keypoints.MPII`), visible [N, 16]
    (nonzero = annotated), head_size [N], threshold (0.5 for PCKh@0.5).
    Returns (per_joint [16], mean): per_joint is NaN for a joint with no visible instance;
    mean = Σ_j correct_j / Σ_j visible_j over all joints except pelvis and thorax.
    """
    pred = np.asarray(pred, dtype=np.float64)[..., :2]
    gt = np.asarray(gt, dtype=np.float64)[..., :2]
    visible = np.asarray(visible) > 0
    head_size = np.asarray(head_size, dtype=np.float64)
    n, k = visible.shape
    if k != MPII.num_joints or pred.shape[:2] != (n, k) or gt.shape[:2] != (n, k) or head_size.shape != (n,):
        raise ValueError(
            f"pckh: expected pred/gt [N, 16, 2], visible [N, 16], head_size [N]; got {pred.shape}, "
            f"{gt.shape}, {visible.shape}, {head_size.shape}"
        )
    if np.any(head_size <= 0):
        raise ValueError(
            f"pckh: head sizes must be > 0; person {int(np.argmin(head_size))} has {head_size.min()}"
        )
    error = np.linalg.norm(pred - gt, axis=-1) / head_size[:, None]  # [N, K], in head sizes
    correct = (error <= threshold) & visible
    counts = visible.sum(0)
    hits = correct.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_joint = np.where(counts > 0, 100.0 * hits / counts, np.nan)
    in_mean = np.array([name not in EXCLUDED_FROM_MEAN for name in MPII.joints])
    total = counts[in_mean].sum()
    mean = 100.0 * hits[in_mean].sum() / total if total > 0 else float("nan")
    return per_joint, float(mean)


@dataclass
class PCKhReport:
    """Table IV numbers: per-joint PCKh@threshold, the grouped columns, Mean and Mean@0.1."""

    per_joint: np.ndarray  # [16] at ``threshold``
    columns: dict[str, float]  # TABLE_IV_COLUMNS -> value
    threshold: float
    low_threshold: float  # 0.1, or 0.11 with hrnet_compat

    def metrics(self) -> dict[str, float]:
        """Flat metrics: PCKh, PCKh@0.1, the Table IV columns and PCKh/<joint>."""
        out = {"PCKh": self.columns["Mean"], "PCKh@0.1": self.columns["Mean@0.1"]}
        out.update(self.columns)
        out.update({f"PCKh/{name}": float(v) for name, v in zip(MPII.joints, self.per_joint)})
        return out

    def table(self) -> str:
        """Two lines in Table IV layout (header, values)."""
        low = "Mean@0.1" if self.low_threshold == 0.1 else f"Mean@0.1 (at {self.low_threshold}, HRNet-compat)"
        names = [*TABLE_IV_COLUMNS[:-1], low]
        head = " | ".join(f"{n:>8}" for n in names)
        values = " | ".join(
            f"{self.columns[c]:>{max(8, len(n))}.2f}" for c, n in zip(TABLE_IV_COLUMNS, names)
        )
        return f"PCKh@{self.threshold:g}\n{head}\n{values}"


def table_iv(
    pred: np.ndarray,
    gt: np.ndarray,
    visible: np.ndarray,
    head_size: np.ndarray,
    *,
    threshold: float = 0.5,
    hrnet_compat: bool = False,
) -> PCKhReport:
    """PCKh at ``threshold`` (0.5) and the mean at 0.1 (0.11 with ``hrnet_compat``)."""
    per_joint, mean = pckh(pred, gt, visible, head_size, threshold)
    low = HRNET_THRESHOLD_AT_01 if hrnet_compat else 0.1
    _, mean_low = pckh(pred, gt, visible, head_size, low)
    index = {name: i for i, name in enumerate(MPII.joints)}
    columns = {col: float(np.mean([per_joint[index[j]] for j in joints])) for col, joints in _GROUPS.items()}
    columns["Mean"] = mean
    columns["Mean@0.1"] = mean_low
    return PCKhReport(per_joint=per_joint, columns=columns, threshold=threshold, low_threshold=low)


@dataclass
class MPIIGroundTruth:
    """Validation persons in our joint order, 0-based image pixels (pixel centres at integers)."""

    joints: np.ndarray  # [N, 16, 2]
    visible: np.ndarray  # [N, 16]
    head_size: np.ndarray  # [N]
    images: list[str]


def load_mpii_ground_truth(annotations: str | Path, head_sizes: str | Path | None = None) -> MPIIGroundTruth:
    """Read an HRNet-style ``valid.json`` (raw MPII joint order, 1-based MATLAB pixels).

    Head sizes come from ``head_sizes`` (a json list, one ``{"image", "head_size"}`` per
    person in the same order, or HRNet's ``annot/gt_valid.mat``, see
    :func:`head_sizes_from_gt_mat`) or from a ``headbox`` [x1, y1, x2, y2] in each annotation.
    Joints and visibility are re-ordered together with :data:`pnfs.keypoints.MPII_FROM_RAW`.
    """
    path = Path(annotations)
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read MPII annotations: {err}") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty list of persons")
    order = list(MPII_FROM_RAW)
    joints, visible, images, boxes = [], [], [], []
    for i, e in enumerate(entries):
        try:
            j = np.asarray(e["joints"], dtype=np.float64)
            v = np.asarray(e["joints_vis"], dtype=np.float64)
            images.append(str(e["image"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: person {i} is malformed ({err!r})") from None
        if j.shape != (16, 2) or v.shape != (16,):
            raise ValueError(
                f"{path}: person {i}: joints must be 16x2 and joints_vis 16, got {j.shape}, {v.shape}"
            )
        joints.append(j[order] - 1.0)  # MATLAB 1-based -> our 0-based pixel centres
        visible.append(v[order])
        boxes.append(e.get("headbox"))
    if head_sizes is not None and Path(head_sizes).suffix.lower() == ".mat":
        size = head_sizes_from_gt_mat(head_sizes, len(entries))
    elif head_sizes is not None:
        hpath = Path(head_sizes)
        try:
            heads = json.loads(hpath.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{hpath}: cannot read head sizes: {err}") from None
        if not isinstance(heads, list) or len(heads) != len(entries):
            raise ValueError(
                f"{hpath}: expected a list of {len(entries)} head sizes (one per person of {path})"
            )
        for i, (h, image) in enumerate(zip(heads, images)):
            if h.get("image", image) != image:
                raise ValueError(
                    f"{hpath}: entry {i} is for image {h.get('image')!r}, annotation {i} for {image!r}"
                )
        size = np.asarray([float(h["head_size"]) for h in heads])
    elif all(b is not None for b in boxes):
        size = head_size_from_box(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
    else:
        raise ValueError(
            f"{path}: no head boxes in the annotations; give the head-size file (data.val_head_sizes)"
        )
    return MPIIGroundTruth(np.stack(joints), np.stack(visible), size, images)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pnfs.evaluate.mpii", description=__doc__.split("\n")[0])
    parser.add_argument("--annotations", required=True, help="HRNet-style valid.json")
    parser.add_argument(
        "--head-sizes",
        default=None,
        help="json list of {image, head_size} per person, or HRNet's gt_valid.mat",
    )
    parser.add_argument(
        "--predictions", required=True, help="json list of {ann_id, keypoints [[x, y, s]*16]}"
    )
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--hrnet-compat", action="store_true", help="compute 'Mean@0.1' at 0.11 like HRNet")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    args = parser.parse_args(argv)
    try:
        gt = load_mpii_ground_truth(args.annotations, args.head_sizes)
        pred = predictions_array(
            json.loads(Path(args.predictions).read_text()), len(gt.images), args.predictions
        )
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = table_iv(
        pred, gt.joints, gt.visible, gt.head_size, threshold=args.threshold, hrnet_compat=args.hrnet_compat
    )
    print(json.dumps(report.metrics()) if args.json else report.table())
    return 0


def predictions_array(entries: list, num_persons: int, source: str = "predictions") -> np.ndarray:
    """[N, 16, 2] from a list of ``{"ann_id": i, "keypoints": [[x, y, s], ...]}``; every person once."""
    out = np.full((num_persons, 16, 2), np.nan)
    seen = np.zeros(num_persons, dtype=bool)
    for i, e in enumerate(entries):
        try:
            a = int(e["ann_id"])
            k = np.asarray(e["keypoints"], dtype=np.float64).reshape(16, -1)[:, :2]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source}: entry {i} is malformed ({err!r})") from None
        if not 0 <= a < num_persons or seen[a]:
            raise ValueError(f"{source}: entry {i}: ann_id {a} is out of range or repeated")
        out[a], seen[a] = k, True
    if not seen.all():
        raise ValueError(f"{source}: no prediction for persons {np.flatnonzero(~seen)[:10].tolist()}")
    return out


if __name__ == "__main__":
    sys.exit(main())
