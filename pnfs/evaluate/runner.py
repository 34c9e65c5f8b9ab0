"""Evaluate a model over a (sharded) validation loader: COCO AP or MPII PCKh.

Every rank runs inference on its share of the loader; predictions are gathered on rank 0
with :func:`pnfs.process_group.all_gather_objects` (when a process group is initialised),
de-duplicated by (image_id, ann_id) and sorted, so each sample counts exactly once and
the metrics do not depend on the world size.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pnfs.config import Config
from pnfs.data.batch import PoseBatch
from pnfs.deploy import freeze
from pnfs.evaluate import strict_json
from pnfs.evaluate.coco import (
    box_pck,
    coco_results,
    crowd_split_stats,
    crowdpose_ground_truth,
    evaluate_keypoints,
    format_table,
)
from pnfs.evaluate.mpii import load_mpii_ground_truth, table_iv
from pnfs.evaluate.oks import joint_sigmas
from pnfs.inference import inference_amp, predict
from pnfs.keypoints import JointSet
from pnfs.model.pnfs import PoseNFS
from pnfs.process_group import all_gather_objects
from pnfs.visualize import denormalize, draw_poses, save_rgb

FIELDS = ("keypoints", "scores", "image_id", "ann_id", "box_score", "area")


def collect_predictions(
    model: torch.nn.Module, loader, cfg: Config, device: torch.device, overlay_dir: Path | None = None
) -> dict[str, np.ndarray]:
    """Run the model over ``loader`` -> numpy arrays (see :data:`FIELDS`), in loader order.

    keypoints [N, K, 2] image px, scores [N, K], image_id/ann_id [N] int64, box_score [N],
    area [N] (the input crop's area in image px, used by OKS-NMS). Samples whose box score is
    below ``eval.det_score_threshold`` are dropped. The first ``eval.overlays`` crops get a
    PNG with the predicted pose when ``overlay_dir`` is given.
    """
    joints = cfg.joints
    perm = joints.flip_permutation() if cfg.eval.flip_test else None
    amp_dtype, amp_line = inference_amp(cfg.eval.amp, device)
    logging.getLogger("pnfs.train").info(amp_line)  # rank 0's logger shows it; the others' stay quiet
    if isinstance(model, PoseNFS):
        model = freeze(model)  # BN, alpha and beta folded; the model passed in is left as it was
    parts: dict[str, list[np.ndarray]] = {k: [] for k in FIELDS}
    drawn = 0
    was_training = model.training
    model.eval()
    try:
        for loaded in loader:
            batch: PoseBatch = loaded.to(device, non_blocking=True)
            images = batch.image
            if cfg.train.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            pred = predict(
                model,
                images,
                batch.affine,
                flip_permutation=perm,
                flip_shift=cfg.eval.flip_shift,
                refine=cfg.eval.refine,
                amp_dtype=amp_dtype,
            )
            keep = batch.score >= cfg.eval.det_score_threshold
            h, w = images.shape[-2:]
            a = batch.affine.double()
            area = (a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]).abs() * (h * w)  # crop area, image px
            for name, value in zip(
                FIELDS, (pred.keypoints, pred.scores, batch.image_id, batch.ann_id, batch.score, area)
            ):
                parts[name].append(value[keep].cpu().numpy())
            if overlay_dir is not None and drawn < cfg.eval.overlays:
                drawn += _draw_crops(
                    batch, pred.input_keypoints, pred.scores, joints, overlay_dir, drawn, cfg
                )
    finally:
        model.train(was_training)
    k = joints.num_joints
    empty = {"keypoints": (0, k, 2), "scores": (0, k)}
    return {
        name: np.concatenate(v)
        if v
        else np.zeros(empty.get(name, (0,)), np.int64 if "id" in name else np.float64)
        for name, v in parts.items()
    }


def _draw_crops(batch, input_keypoints, scores, joints: JointSet, out: Path, start: int, cfg: Config) -> int:
    count = min(len(batch), cfg.eval.overlays - start)
    for i in range(count):
        picture = draw_poses(
            denormalize(batch.image[i]),
            input_keypoints[i].float().cpu().numpy(),
            joints,
            scores[i].float().cpu().numpy(),
            cfg.eval.rescore_threshold,
        )
        name = f"{int(batch.image_id[i])}_{int(batch.ann_id[i])}.png"
        save_rgb(out / name, picture)
    return count


def gather_predictions(local: dict[str, np.ndarray], world_size: int) -> dict[str, np.ndarray] | None:
    """All ranks' predictions merged on rank 0: each (image_id, ann_id) once, sorted; None elsewhere."""
    shares = all_gather_objects(local) if world_size > 1 else [local]
    if world_size > 1 and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    merged = {name: np.concatenate([s[name] for s in shares]) for name in FIELDS}
    keys = np.stack([merged["image_id"], merged["ann_id"]], 1)
    _, first = np.unique(keys, axis=0, return_index=True)  # sorted by (image_id, ann_id)
    return {name: v[first] for name, v in merged.items()}


def coco_metrics(pred: dict[str, np.ndarray], cfg: Config) -> tuple[dict, list[dict]]:
    """COCO AP of gathered predictions against ``data.val_annotations``."""
    if not cfg.data.val_annotations:
        raise ValueError("data.val_annotations: COCO evaluation needs the ground-truth json; it is empty")
    joints = cfg.joints
    if joints.sigmas is None and cfg.eval.sigmas is None:  # no OKS without sigmas: PCK of the box
        stats = box_pck(
            cfg.data.val_annotations, pred["keypoints"], pred["ann_id"], joints, cfg.eval.pck_alpha
        )
        print(f"{joints.name} has no OKS sigmas: PCK@{cfg.eval.pck_alpha:g} of the box = {stats['PCK']:.4f}")
        results = coco_results(
            pred["keypoints"], pred["scores"], pred["image_id"], pred["box_score"], pred["area"], None,
            rescore_threshold=cfg.eval.rescore_threshold, nms_threshold=None,
        )  # fmt: skip
        return {**stats, "score": stats["PCK"]}, results
    sigmas = joint_sigmas(joints, cfg.eval.sigmas)
    results = coco_results(
        pred["keypoints"],
        pred["scores"],
        pred["image_id"],
        pred["box_score"],
        pred["area"],
        sigmas,
        rescore_threshold=cfg.eval.rescore_threshold,
        nms_threshold=cfg.eval.oks_nms_threshold,
    )
    crowdpose = (
        joints.name == "crowdpose"
    )  # its toolkit's areas and split by crowd index (pnfs.evaluate.coco)
    gt = crowdpose_ground_truth(cfg.data.val_annotations) if crowdpose else cfg.data.val_annotations
    stats = evaluate_keypoints(gt, results, sigmas=sigmas, verbose=False)
    print(format_table(stats), flush=True)
    if crowdpose:
        stats.update(crowd_split_stats(gt, results, sigmas, verbose=False))
    return {**stats, "score": stats["AP"]}, results


def mpii_metrics(pred: dict[str, np.ndarray], cfg: Config) -> tuple[dict, list[dict]]:
    """PCKh (Table IV layout) against ``data.val_annotations`` + ``data.val_head_sizes``; ann_id = row."""
    if not cfg.data.val_annotations:
        raise ValueError(
            "data.val_annotations: MPII evaluation needs the annotation json (valid.json); it is empty"
        )
    gt = load_mpii_ground_truth(cfg.data.val_annotations, cfg.data.val_head_sizes or None)
    pred = {
        name: v[np.argsort(pred["ann_id"], kind="stable")] for name, v in pred.items()
    }  # annotation order
    rows = pred["ann_id"]
    if rows.size and (rows.min() < 0 or rows.max() >= len(gt.images)):
        raise ValueError(
            f"predictions name MPII rows outside 0..{len(gt.images) - 1} of {cfg.data.val_annotations}: "
            "are the shards from another annotation file?"
        )
    missing = len(gt.images) - len(rows)
    if missing:
        print(
            f"warning: {missing} of {len(gt.images)} MPII persons have no prediction; scored without them",
            file=sys.stderr,
        )
    report = table_iv(
        pred["keypoints"],
        gt.joints[rows],
        gt.visible[rows],
        gt.head_size[rows],
        threshold=cfg.eval.pckh_threshold,
        hrnet_compat=cfg.eval.hrnet_compat,
    )
    print(report.table(), flush=True)
    results = [
        {
            "ann_id": int(a),
            "image_id": int(i),
            "image": gt.images[a],
            "keypoints": np.concatenate([k, s[:, None]], 1).round(4).tolist(),
        }
        for a, i, k, s in zip(rows, pred["image_id"], pred["keypoints"], pred["scores"])
    ]
    metrics = report.metrics()
    metrics["missing"] = int(missing)
    return {**metrics, "score": metrics["PCKh"]}, results


def evaluate_model(
    model: torch.nn.Module,
    loader,
    cfg: Config,
    *,
    device: torch.device | str,
    out_dir: str | Path | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Inference over this rank's share of the val loader, metrics on rank 0.

    Returns on rank 0 COCO keys (AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, ARl) or MPII
    keys (PCKh, PCKh@0.1, the Table IV columns, PCKh/<joint>), plus ``score`` (AP or PCKh),
    ``num_samples``; other ranks get ``{}``. With ``out_dir`` rank 0 writes results.json,
    metrics.json and overlays/*.png.
    """
    device = torch.device(device)
    out = Path(out_dir) if out_dir is not None else None
    overlay_dir = out / "overlays" if out is not None and rank == 0 else None
    local = collect_predictions(model, loader, cfg, device, overlay_dir)
    pred = gather_predictions(local, world_size)
    if pred is None:
        return {}
    if cfg.data.dataset == "coco":
        metrics, results = coco_metrics(pred, cfg)
    else:
        metrics, results = mpii_metrics(pred, cfg)
    metrics["num_samples"] = len(pred["ann_id"])
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results))
        (out / "metrics.json").write_text(strict_json.dumps(metrics, indent=1))
    return metrics
