"""Poses on photos or video frames: skeletons drawn on them (PNG) and the keypoints as JSON.

    python launch/predict.py --checkpoint CKPT --image photo.jpg [--out DIR]
    python launch/predict.py --checkpoint CKPT --image photos/ [--boxes detections.json]
    python launch/predict.py --checkpoint CKPT --video clip.mp4 [--box x,y,w,h ...]

Person boxes, in this order of precedence:

* ``--box x,y,w,h`` (repeatable): the same boxes on every image (image pixels);
* ``--boxes file.json``: COCO detection results (a list of ``{"image_id", "bbox": [x, y, w, h],
  "score", "category_id"}``; an entry may name its image by ``"file_name"`` instead). An
  image's id is its file stem read as a number (``000000000785.jpg`` -> 785); entries with a
  category other than 1 (person) or a score below ``--det-score`` are skipped;
* otherwise a torchvision person detector (``--detector``, default
  fasterrcnn_mobilenet_v3_large_fpn, COCO weights from torchvision's cache:
  :mod:`pnfs.detector`) keeps the people scoring at least ``--det-score``;
  ``--detector none`` makes the whole image one box.

``--image`` takes a file or a folder (its .jpg/.jpeg/.png/.bmp files); ``--video`` reads the
frames of a video file through OpenCV (a progress bar counts them on stderr). A box that lies
entirely outside its image is skipped with a warning; a ``--boxes`` file that names none of
the images is an error, and images it has no entry for are counted in a warning.

Per image (per frame: ``<video stem>_<frame:06d>``) DIR gets ``<stem>_pose.png`` and
``<stem>_pose.json`` with, per person, the box, its detection score, the keypoints
[[x, y, score], ...] in image pixels and the instance score (mean of the joint scores above
eval.rescore_threshold). The network is the frozen model
(:func:`pnfs.deploy.freeze`) under ``eval.amp``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

# torch, OpenCV and the model load after the arguments are parsed: --help and a mistyped flag
# answer at once
if TYPE_CHECKING:
    import torch

    from pnfs.config import Config

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
DEFAULT_DETECTOR = (
    "fasterrcnn_mobilenet_v3_large_fpn"  # pnfs.detector.DEFAULT_DETECTOR (a test keeps them equal)
)
Boxes = tuple[np.ndarray, np.ndarray]  # [P, 4] x, y, w, h and [P] detection scores


class Frames:
    """The frames to pose: (stem, source, RGB uint8 image) from ``items``, ``total`` of them
    (None: a video that does not say), counted in ``unit`` ("image" or "frame")."""

    def __init__(self, items: Iterator[tuple[str, str, np.ndarray]], total: int | None, unit: str):
        self.items, self.total, self.unit = items, total, unit


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
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="an image file (JPEG, PNG, ...) or a folder of them")
    source.add_argument("--video", help="a video file (frames read through OpenCV)")
    p.add_argument(
        "--box", action="append", type=parse_box, default=[], help="person box x,y,w,h (repeatable)"
    )
    p.add_argument("--boxes", default=None, help="COCO detection-result json with the person boxes")
    p.add_argument(
        "--detector",
        default=DEFAULT_DETECTOR,
        help=f"torchvision detection model for the boxes (default {DEFAULT_DETECTOR}); none: whole image",
    )
    p.add_argument("--det-score", type=float, default=0.5, help="keep detections scoring at least this")
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


# --------------------------------------------------------------------------- inputs and boxes


def read_frames(args: argparse.Namespace) -> Frames:
    """The --image file, the images of the --image folder, or the frames of the --video file.
    Missing inputs raise here, before any frame is read."""
    import cv2

    from pnfs.visualize import read_rgb

    if args.video is None:
        files = image_files(Path(args.image))
        return Frames(((path.stem, str(path), read_rgb(path)) for path in files), len(files), "image")
    capture = cv2.VideoCapture(str(args.video))
    if not capture.isOpened():
        raise ValueError(f"--video {args.video!r}: OpenCV cannot open it")
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None

    def frames() -> Iterator[tuple[str, str, np.ndarray]]:
        stem, index = Path(args.video).stem, 0
        try:
            while True:
                ok, bgr = capture.read()
                if not ok:
                    return
                yield f"{stem}_{index:06d}", f"{args.video}#{index}", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                index += 1
        finally:
            capture.release()

    return Frames(frames(), total, "frame")


def image_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"--image {str(path)!r}: the folder holds no {'/'.join(IMAGE_SUFFIXES)} files")
        return files
    if not path.is_file():
        raise ValueError(f"--image {str(path)!r}: no such file or folder")
    return [path]


def read_detections(path: str, min_score: float) -> dict[str, list[tuple[list[float], float]]]:
    """COCO detection results -> {image key: [(bbox, score), ...]}; keys are ``id:<n>`` or
    ``file:<name>``. Non-person and low-scoring entries are skipped."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--boxes {path!r}: cannot read it as JSON: {err}") from None
    if not isinstance(entries, list):
        raise ValueError(f"--boxes {path!r}: expected a list of COCO detection results")
    found: dict[str, list[tuple[list[float], float]]] = {}
    for i, entry in enumerate(entries):
        bbox = entry.get("bbox") if isinstance(entry, dict) else None
        if not (isinstance(bbox, list) and len(bbox) == 4 and bbox[2] > 0 and bbox[3] > 0):
            raise ValueError(f"--boxes {path!r}: entry {i} has no bbox [x, y, w, h] with w, h > 0: {entry!r}")
        score = float(entry.get("score", 1.0))
        if entry.get("category_id", 1) != 1 or score < min_score:
            continue
        key = f"file:{entry['file_name']}" if "file_name" in entry else f"id:{int(entry['image_id'])}"
        found.setdefault(key, []).append(([float(v) for v in bbox], score))
    return found


def table_keys(stem: str) -> list[str]:
    """The keys of :func:`read_detections` that name the image with this file stem."""
    keys = [f"id:{int(stem)}"] if stem.isdigit() else []
    return keys + [f"file:{stem + s}" for s in (*IMAGE_SUFFIXES, *(s.upper() for s in IMAGE_SUFFIXES))]


class DetectionTable:
    """(stem, image) -> the boxes of ``--boxes`` for that image; counts the images it had none for."""

    def __init__(self, path: str, min_score: float) -> None:
        self.path = path
        self.table = read_detections(path, min_score)
        self.without_entry: list[str] = []

    def names_any(self, stems: list[str]) -> bool:
        return any(k in self.table for stem in stems for k in table_keys(stem))

    def __call__(self, stem: str, image: np.ndarray) -> Boxes:
        rows = [row for k in table_keys(stem) for row in self.table.get(k, [])]
        if not any(k in self.table for k in table_keys(stem)):
            self.without_entry.append(stem)
        return np.asarray([b for b, _ in rows], np.float64).reshape(-1, 4), np.asarray([s for _, s in rows])


def inside_image(boxes: Boxes, width: int, height: int) -> tuple[Boxes, np.ndarray]:
    """(the boxes that overlap the image [0, W] x [0, H], those that lie entirely outside [Q, 4])."""
    xywh, scores = boxes
    x0, y0 = xywh[:, 0], xywh[:, 1]
    x1, y1 = x0 + xywh[:, 2], y0 + xywh[:, 3]
    overlaps = (np.minimum(x1, width) > np.maximum(x0, 0)) & (np.minimum(y1, height) > np.maximum(y0, 0))
    return (xywh[overlaps], scores[overlaps]), xywh[~overlaps]


def box_source(args: argparse.Namespace) -> Callable[[str, np.ndarray], Boxes]:
    """(stem, image) -> (boxes, scores) from --box, --boxes, the detector or the whole image."""
    if args.box:
        fixed = np.asarray(args.box, dtype=np.float64)
        return lambda stem, image: (fixed, np.ones(len(fixed)))
    if args.boxes is not None:
        return DetectionTable(args.boxes, args.det_score)
    if args.detector == "none":
        return lambda stem, image: (
            np.asarray([[0.0, 0.0, float(image.shape[1]), float(image.shape[0])]]),
            np.ones(1),
        )
    from pnfs.detector import PersonDetector

    detector = PersonDetector(args.detector, args.det_score, args.device)
    return lambda stem, image: detector(image)


# --------------------------------------------------------------------------- poses and outputs


def write_poses(
    model: torch.nn.Module,
    cfg: Config,
    args: argparse.Namespace,
    stem: str,
    source: str,
    image: np.ndarray,
    boxes: Boxes,
    amp_dtype: torch.dtype | None,
) -> int:
    """Poses of the people in ``boxes`` on ``image`` -> DIR/<stem>_pose.png and .json; returns P."""
    import cv2
    import torch

    from pnfs.evaluate.coco import instance_scores
    from pnfs.inference import person_inputs, predict
    from pnfs.visualize import draw_poses, save_rgb

    joints = cfg.joints
    box_xywh, box_scores = boxes
    k = joints.num_joints
    keypoints, scores = np.zeros((0, k, 2)), np.zeros((0, k))
    if len(box_xywh):
        device = torch.device(args.device)
        inputs, affine = person_inputs(image, box_xywh, tuple(cfg.data.input_size), cfg.data.margin)
        pred = predict(
            model,
            inputs.to(device).contiguous(memory_format=torch.channels_last),
            affine.to(device),
            flip_permutation=None if args.no_flip else joints.flip_permutation(),
            flip_shift=cfg.eval.flip_shift,
            refine=cfg.eval.refine,
            amp_dtype=amp_dtype,
        )
        keypoints, scores = pred.keypoints.cpu().numpy(), pred.scores.cpu().numpy()
    people = instance_scores(box_scores, scores, cfg.eval.rescore_threshold)
    min_score = cfg.eval.rescore_threshold if args.min_score is None else args.min_score
    picture = draw_poses(image, keypoints, joints, scores, min_score) if len(box_xywh) else image.copy()
    for x, y, w, h in box_xywh:
        cv2.rectangle(picture, (round(x), round(y)), (round(x + w), round(y + h)), (255, 255, 255), 1)
    out = Path(args.out)
    save_rgb(out / f"{stem}_pose.png", picture)
    record = {
        "image": source,
        "joints": list(joints.joints),
        "people": [
            {
                "box": box.tolist(),
                "box_score": float(b),
                "keypoints": np.concatenate([kp, s[:, None]], 1).round(3).tolist(),
                "score": float(p),
            }
            for box, b, kp, s, p in zip(box_xywh, box_scores, keypoints, scores, people)
        ],
    }
    (out / f"{stem}_pose.json").write_text(json.dumps(record, indent=1))
    return len(box_xywh)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from pnfs.config import ConfigError
    from pnfs.deploy import freeze
    from pnfs.evaluate.loading import load_for_inference
    from pnfs.inference import inference_amp

    def warn(message: str) -> None:
        tqdm.write(f"warning: {message}", file=sys.stderr)

    try:
        model, cfg = load_for_inference(args.checkpoint, args.config, args.overrides)
        frames = read_frames(args)
        boxes_of = box_source(args)
        if isinstance(boxes_of, DetectionTable) and args.image is not None:
            stems = [path.stem for path in image_files(Path(args.image))]
            if not boxes_of.names_any(stems):
                raise ValueError(
                    f"--boxes {args.boxes!r}: no entry names any of the {len(stems)} image(s) of --image "
                    f"(e.g. {stems[0]}): an entry's image_id is the file stem read as a number "
                    "(000000000785.jpg -> 785), or its file_name the file's name"
                )
        amp_dtype, amp_line = inference_amp(cfg.eval.amp, args.device)
        print(amp_line, file=sys.stderr)
        network = freeze(model.to(args.device))
        count = people = outside = 0
        bar = tqdm(
            frames.items, total=frames.total, unit=frames.unit, desc="poses", file=sys.stderr,
            disable=frames.total == 1, leave=True,
        )  # fmt: skip
        for stem, source, image in bar:
            boxes, off = inside_image(boxes_of(stem, image), image.shape[1], image.shape[0])
            for x, y, w, h in off:
                size = f"{image.shape[1]}x{image.shape[0]}"
                warn(f"{source}: box {x:g},{y:g},{w:g},{h:g} lies outside the {size} image; skipped")
            outside += len(off)
            people += write_poses(network, cfg, args, stem, source, image, boxes, amp_dtype)
            count += 1
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if isinstance(boxes_of, DetectionTable) and boxes_of.without_entry:
        missed = boxes_of.without_entry
        warn(
            f"--boxes {args.boxes!r} has no entry for {len(missed)} of the {count} {frames.unit}(s) "
            f"(e.g. {missed[0]}): no people there"
        )
    skipped = f", {outside} box(es) outside their {frames.unit} skipped" if outside else ""
    print(f"{people} people on {count} {frames.unit}(s){skipped} -> {Path(args.out)}/*_pose.png, *_pose.json")
    return 0


if __name__ == "__main__":
    from pnfs.errors import run_main

    sys.exit(run_main(main))
