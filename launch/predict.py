"""Poses on one image: skeletons drawn on it (PNG) and the keypoints as JSON.

    python launch/predict.py --checkpoint CKPT --image photo.jpg [--box x,y,w,h ...] [--out DIR]

Each --box is one person (x, y, width, height in image pixels); without any, the whole
image is one box. Writes DIR/<image stem>_pose.png and DIR/<image stem>_pose.json with, per
person, the box, the keypoints [[x, y, score], ...] in image pixels and the instance score
(mean of the joint scores above eval.rescore_threshold).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from pnfs.config import ConfigError
from pnfs.deploy import freeze
from pnfs.evaluate.coco import instance_scores
from pnfs.evaluate.loading import load_for_inference
from pnfs.inference import inference_amp, person_inputs, predict
from pnfs.keypoints import joint_set
from pnfs.visualize import draw_poses, read_rgb, save_rgb


def parse_box(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--box {text!r}: expected four numbers x,y,w,h") from None
    if len(values) != 4 or values[2] <= 0 or values[3] <= 0 or not np.all(np.isfinite(values)):
        raise argparse.ArgumentTypeError(f"--box {text!r}: expected x,y,w,h with w, h > 0")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) or a bare state dict")
    p.add_argument("--config", default=None, help="config YAML or preset (default: the checkpoint's own)")
    p.add_argument("--image", required=True, help="an image file (JPEG, PNG, ...)")
    p.add_argument(
        "--box", action="append", type=parse_box, default=[], help="person box x,y,w,h (repeatable)"
    )
    p.add_argument("--out", default="runs/predict", help="output folder (default runs/predict)")
    p.add_argument("--no-flip", action="store_true", help="no flip test")
    p.add_argument(
        "--min-score",
        type=float,
        default=None,
        help="draw joints scoring at least this (default: eval.rescore_threshold)",
    )
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model, cfg = load_for_inference(args.checkpoint, args.config, args.overrides)
        image = read_rgb(args.image)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    height, width = image.shape[:2]
    boxes = np.asarray(args.box or [[0.0, 0.0, float(width), float(height)]], dtype=np.float64)
    joints = joint_set(cfg.data.dataset)
    device = torch.device(args.device)
    inputs, affine = person_inputs(image, boxes, tuple(cfg.data.input_size), cfg.data.margin)
    amp_dtype, amp_line = inference_amp(cfg.eval.amp, device)
    print(amp_line)
    pred = predict(
        freeze(model.to(device)),
        inputs.to(device),
        affine.to(device),
        flip_permutation=None if args.no_flip else joints.flip_permutation(),
        flip_shift=cfg.eval.flip_shift,
        refine=cfg.eval.refine,
        amp_dtype=amp_dtype,
    )
    keypoints, scores = pred.keypoints.cpu().numpy(), pred.scores.cpu().numpy()
    people = instance_scores(np.ones(len(boxes)), scores, cfg.eval.rescore_threshold)
    min_score = cfg.eval.rescore_threshold if args.min_score is None else args.min_score
    picture = draw_poses(image, keypoints, joints, scores, min_score)
    for x, y, w, h in boxes:
        cv2.rectangle(picture, (round(x), round(y)), (round(x + w), round(y + h)), (255, 255, 255), 1)
    out = Path(args.out)
    stem = Path(args.image).stem
    save_rgb(out / f"{stem}_pose.png", picture)
    record = {
        "image": str(args.image),
        "joints": list(joints.joints),
        "people": [
            {
                "box": box.tolist(),
                "keypoints": np.concatenate([k, s[:, None]], 1).round(3).tolist(),
                "score": float(p),
            }
            for box, k, s, p in zip(boxes, keypoints, scores, people)
        ],
    }
    (out / f"{stem}_pose.json").write_text(json.dumps(record, indent=1))
    print(f"{len(boxes)} people -> {out / f'{stem}_pose.png'}, {out / f'{stem}_pose.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
