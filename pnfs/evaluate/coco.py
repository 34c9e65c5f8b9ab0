"""COCO keypoint evaluation: results from predictions, rescoring, OKS-NMS, pycocotools.

Pipeline for top-down predictions (one per person box, GT or a detector's):

1. instance score = box score × mean of the joint scores above ``rescore_threshold`` (0.2);
   0 when no joint passes;
2. OKS-NMS per image at 0.9 (:func:`pnfs.evaluate.oks.oks_nms`, greedy, every remaining
   candidate compared), areas = the person crop's area in image pixels;
3. ``COCOeval(gt, results, "keypoints")``; the standard ten numbers (AP, AP50, AP75, APm, APl,
   AR, AR50, AR75, ARm, ARl) are printed and returned.

Command line, for a results file written by anyone::

    python -m pnfs.evaluate.coco --annotations person_keypoints_val2017.json --results res.json [--json]
    python -m pnfs.evaluate.coco --annotations crowdpose_test.json --results res.json \
        --keypoints crowdpose --json

``--keypoints`` (default ``coco``) takes the OKS sigmas from a keypoint set (a built-in name or a
YAML path, :mod:`pnfs.keypoints`). CrowdPose reports AP, AP50, AP75, AR and its crowd split
AP_easy / AP_medium / AP_hard (:func:`crowd_split_stats`) instead of the area split.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pnfs.evaluate import strict_json
from pnfs.evaluate.oks import joint_sigmas, oks_nms
from pnfs.keypoints import load_keypoint_set

STAT_KEYS: tuple[str, ...] = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
CROWD_KEYS: tuple[str, ...] = ("AP", "AP50", "AP75", "AR", "AP_easy", "AP_medium", "AP_hard")
# CrowdPose's split of images by their crowd index, read from ``crowdIndex`` in the image
# entries: [low, high) per bin. The cut-offs are those of the CrowdPose authors' evaluation
# toolkit (crowdposetools/cocoeval.py, github.com/Jeff-sjtu/CrowdPose: get_type_result(first=0.2,
# second=0.8), easy < 0.2 <= medium < 0.8 <= hard), which produced the published AP easy /
# medium / hard; the paper's text (Li et al., CVPR 2019) names 0.1 for the first one.
CROWD_BINS: tuple[tuple[str, float, float], ...] = (
    ("easy", 0.0, 0.2),
    ("medium", 0.2, 0.8),
    ("hard", 0.8, float("inf")),
)
# crowdposetools (computeOks, evaluateImg) scores every CrowdPose person with 0.53 * box w * h
# as the OKS scale and for the area ranges, whatever ``area`` the file holds (its files have none)
CROWDPOSE_AREA_FACTOR = 0.53
PERSON_CATEGORY = 1


def instance_scores(box_scores: np.ndarray, joint_scores: np.ndarray, threshold: float = 0.2) -> np.ndarray:
    """box score [N] × mean of joint scores [N, K] above ``threshold`` (0 when none is) -> [N]."""
    joint_scores = np.asarray(joint_scores, dtype=np.float64)
    above = joint_scores > threshold
    count = above.sum(-1)
    mean = np.where(count > 0, (joint_scores * above).sum(-1) / np.maximum(count, 1), 0.0)
    return np.asarray(box_scores, dtype=np.float64) * mean


def coco_results(
    keypoints: np.ndarray,
    joint_scores: np.ndarray,
    image_ids: np.ndarray,
    box_scores: np.ndarray,
    areas: np.ndarray,
    sigmas: np.ndarray | None,
    *,
    rescore_threshold: float = 0.2,
    nms_threshold: float | None = 0.9,
) -> list[dict]:
    """COCO keypoint results after rescoring and per-image OKS-NMS.

    keypoints [N, K, 2] in original image pixels, joint_scores [N, K], image_ids [N],
    box_scores [N], areas [N] (person crop area in image pixels, for OKS-NMS).
    ``nms_threshold=None`` skips the NMS (ground-truth boxes need none, but it is harmless); only
    then may ``sigmas`` (the joints' OKS sigmas, which the NMS reads) be None.
    Returns dicts ``{image_id, category_id, keypoints: [x, y, s]*K, score}`` grouped by image.
    """
    if nms_threshold is not None and sigmas is None:
        raise ValueError(f"coco_results: OKS-NMS (nms_threshold={nms_threshold}) needs the joints' sigmas")
    keypoints = np.asarray(keypoints, dtype=np.float64)
    joint_scores = np.asarray(joint_scores, dtype=np.float64)
    image_ids = np.asarray(image_ids, dtype=np.int64)
    areas = np.asarray(areas, dtype=np.float64)
    scores = instance_scores(box_scores, joint_scores, rescore_threshold)
    results = []
    for image_id in np.unique(image_ids):
        members = np.flatnonzero(image_ids == image_id)
        if nms_threshold is not None and sigmas is not None:
            members = members[
                oks_nms(keypoints[members], scores[members], areas[members], sigmas, nms_threshold)
            ]
        for i in members:
            triples = np.concatenate([keypoints[i], joint_scores[i][:, None]], axis=1)
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": PERSON_CATEGORY,
                    "keypoints": [round(float(v), 4) for v in triples.reshape(-1)],
                    "score": float(scores[i]),
                }
            )
    return results


def load_detections(path: str | Path, score_threshold: float = 0.0) -> list[dict]:
    """Person boxes from a COCO detection-result json (list of image_id/category_id/bbox/score).

    Keeps category 1 with score >= ``score_threshold``; a malformed entry raises naming the
    file and the entry's index.
    """
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read detections: {err}") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of detections, got {type(entries).__name__}")
    kept = []
    for i, det in enumerate(entries):
        try:
            category, score, bbox = (
                int(det["category_id"]),
                float(det["score"]),
                [float(v) for v in det["bbox"]],
            )
            image_id = int(det["image_id"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: detection {i} is malformed ({err!r}): {det!r}") from None
        if len(bbox) != 4:
            raise ValueError(f"{path}: detection {i}: bbox must be [x, y, w, h], got {bbox}")
        if category == PERSON_CATEGORY and score >= score_threshold:
            kept.append({"image_id": image_id, "bbox": bbox, "score": score})
    return kept


def load_ground_truth(annotations):
    """A pycocotools ``COCO`` from a path (or an already-loaded one); loading chatter to stderr."""
    from pycocotools.coco import COCO

    if isinstance(annotations, COCO):
        return annotations
    path = Path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotations {str(path)!r} not found")
    with contextlib.redirect_stdout(sys.stderr):
        return COCO(str(path))


def joint_count_problem(gt, results: Sequence[dict], num_joints: int) -> None:
    """Raise naming the counts when the ground truth or the results hold another number of
    keypoints per person than the keypoint set that scores them (``num_joints`` sigmas)."""
    for what, entries in (("the annotations", gt.anns.values()), ("the results", results)):
        for entry in entries:
            values = entry.get("keypoints") if isinstance(entry, dict) else None
            if isinstance(values, list) and values and len(values) != 3 * num_joints:
                raise ValueError(
                    f"{what} hold {len(values) // 3} keypoints per person, the keypoint set scores "
                    f"{num_joints}: give their keypoint set (--keypoints crowdpose or a YAML)"
                )
            if isinstance(values, list) and values:
                break  # one entry of each says it; a file does not mix joint sets


def format_table(stats: dict[str, float]) -> str:
    """The ten numbers as one header line and one value line."""
    head = " ".join(f"{k:>6}" for k in STAT_KEYS)
    values = " ".join(f"{stats[k]:6.4f}" for k in STAT_KEYS)
    return f"{head}\n{values}"


def evaluate_keypoints(
    annotations,
    results: Sequence[dict] | str | Path,
    *,
    sigmas: np.ndarray | None = None,
    image_ids: Sequence[int] | None = None,
    verbose: bool = True,
) -> dict[str, float]:
    """pycocotools ``COCOeval(gt, dt, "keypoints")``: the ten stats under :data:`STAT_KEYS`.

    annotations: GT json path or a ``COCO``; results: a list of result dicts or a json path;
    sigmas: per-joint OKS sigmas for a non-COCO joint set (default: COCO's 17);
    image_ids: restrict the evaluation to these images (default: every GT image).
    pycocotools' own table is printed (to stdout when ``verbose``, else to stderr).
    """
    from pycocotools.cocoeval import COCOeval

    gt = load_ground_truth(annotations)
    if isinstance(results, (str, Path)):
        path = Path(results)
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read results: {err}") from None
        if not isinstance(results, list):
            raise ValueError(f"{path}: expected a list of results, got {type(results).__name__}")
    if len(results) == 0:
        raise ValueError("no keypoint results to evaluate (the list is empty)")
    num_joints = len(sigmas) if sigmas is not None else len(joint_sigmas(load_keypoint_set("coco")))
    joint_count_problem(gt, results, num_joints)
    known = set(gt.getImgIds())
    unknown = sorted({r.get("image_id") for r in results} - known, key=str)
    if unknown:
        raise ValueError(f"results name image ids not in the annotations: {unknown[:10]}")
    stream = sys.stdout if verbose else sys.stderr
    with contextlib.redirect_stdout(stream):
        dt = gt.loadRes(list(results))
        evaluator = COCOeval(gt, dt, "keypoints")
        if sigmas is not None:
            evaluator.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: float(v) for k, v in zip(STAT_KEYS, evaluator.stats)}


def crowdpose_ground_truth(annotations):
    """The ground truth (path or ``COCO``, changed in place) as crowdposetools scores it: every
    person's ``area`` = :data:`CROWDPOSE_AREA_FACTOR` * box w * h."""
    gt = load_ground_truth(annotations)
    for ann in gt.anns.values():
        ann["area"] = CROWDPOSE_AREA_FACTOR * ann["bbox"][2] * ann["bbox"][3]
    return gt


def crowd_bins(annotations) -> dict[str, list[int]]:
    """Image ids per CrowdPose bin (easy/medium/hard) by each image's ``crowdIndex``.

    An image without a numeric ``crowdIndex`` raises naming it: the split needs every one.
    """
    gt = load_ground_truth(annotations)
    bins: dict[str, list[int]] = {name: [] for name, _, _ in CROWD_BINS}
    for image_id, image in gt.imgs.items():
        index = image.get("crowdIndex")
        if isinstance(index, bool) or not isinstance(index, (int, float)):
            raise ValueError(
                f"image {image_id}: no numeric crowdIndex ({index!r}); the crowd split needs one"
            )
        for name, low, high in CROWD_BINS:
            if low <= index < high:
                bins[name].append(int(image_id))
                break
    return bins


def crowd_split_stats(
    annotations, results: Sequence[dict] | str | Path, sigmas: np.ndarray, *, verbose: bool = True
) -> dict[str, float]:
    """CrowdPose numbers: AP, AP50, AP75, AR over all images, AP_easy/medium/hard per bin.

    Each bin's AP is COCOeval's AP restricted to that bin's images (an empty bin gives NaN); the
    persons' areas are the toolkit's (:func:`crowdpose_ground_truth`).
    """
    gt = crowdpose_ground_truth(annotations)
    overall = evaluate_keypoints(gt, results, sigmas=sigmas, verbose=verbose)
    stats = {k: overall[k] for k in ("AP", "AP50", "AP75", "AR")}
    for name, image_ids in crowd_bins(gt).items():
        ap = float("nan")
        if image_ids:
            ap = evaluate_keypoints(gt, results, sigmas=sigmas, image_ids=image_ids, verbose=False)["AP"]
        stats[f"AP_{name}"] = ap
    return stats


def box_pck(
    annotations, keypoints: np.ndarray, ann_ids: np.ndarray, joints, alpha: float = 0.2
) -> dict[str, float]:
    """PCK@α of the box size, for keypoint sets without OKS sigmas (COCO-style AP needs them).

    keypoints [N, K, 2] in image pixels, ann_ids [N] the ground-truth annotation of each
    prediction (ground-truth boxes). A labelled joint (v > 0) is correct when its prediction
    lies within α · max(w, h) of the person's box. Returns ``PCK`` over all labelled joints,
    ``PCK/<joint>`` per joint (NaN where none is labelled) and ``alpha``.
    """
    gt = load_ground_truth(annotations)
    keypoints = np.asarray(keypoints, dtype=np.float64)
    correct = np.zeros(joints.num_joints)
    labelled = np.zeros(joints.num_joints)
    for xy, ann_id in zip(keypoints, np.asarray(ann_ids, dtype=np.int64)):
        if int(ann_id) not in gt.anns:
            raise ValueError(f"prediction for annotation {int(ann_id)}, which the ground truth does not have")
        ann = gt.anns[int(ann_id)]
        truth = np.asarray(ann["keypoints"], dtype=np.float64).reshape(joints.num_joints, 3)
        visible = truth[:, 2] > 0
        size = max(ann["bbox"][2], ann["bbox"][3])
        hit = np.linalg.norm(xy - truth[:, :2], axis=1) <= alpha * size
        correct += hit & visible
        labelled += visible
    if labelled.sum() == 0:
        raise ValueError("no labelled joints in the ground truth: PCK is undefined")
    stats = {"PCK": float(correct.sum() / labelled.sum()), "alpha": float(alpha)}
    for name, c, n in zip(joints.joints, correct, labelled):
        stats[f"PCK/{name}"] = float(c / n) if n else float("nan")
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pnfs.evaluate.coco", description=__doc__.split("\n")[0])
    parser.add_argument("--annotations", required=True, help="COCO ground-truth json")
    parser.add_argument("--results", required=True, help="COCO keypoint results json")
    parser.add_argument("--json", action="store_true", help="print only the stats as one JSON object")
    parser.add_argument(
        "--keypoints", default="coco", help="keypoint set whose OKS sigmas score: coco, crowdpose or a YAML"
    )
    args = parser.parse_args(argv)
    try:
        joints = load_keypoint_set(args.keypoints)
        sigmas = joint_sigmas(joints)
        if joints.name == "crowdpose":
            stats = crowd_split_stats(args.annotations, args.results, sigmas, verbose=not args.json)
        else:
            stats = evaluate_keypoints(args.annotations, args.results, sigmas=sigmas, verbose=not args.json)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(strict_json.dumps(stats))
    elif joints.name == "crowdpose":
        print(" ".join(f"{k:>9}" for k in CROWD_KEYS))
        print(" ".join(f"{stats[k]:9.4f}" for k in CROWD_KEYS))
    else:
        print(format_table(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
