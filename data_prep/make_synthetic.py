"""A procedurally drawn person-keypoint data set in COCO format: the embedded demo/test data.

    python data_prep/make_synthetic.py --out data/synthetic [--train 1000 --val 200 --seed 0]

writes ``OUT/images/{train,val}/*.jpg`` and ``OUT/annotations/person_keypoints_{train,val}.json``
(``--train``/``--val`` count *people*; images hold 1-3 of them).

Each person is a stick-figure body with COCO's 17 keypoints: a skeleton with plausible
proportions (height 40-85 % of the image), random arm/leg/torso angles, thick limbs shaded
like cylinders, a head with eyes, nose and ears. Left limbs are drawn in blue tones and right
limbs in orange tones, so left/right is learnable from the picture. Backgrounds are smooth
random colour fields with clutter; occluder boxes and overlapping people hide joints, which
are then labelled v=1 (labelled, not visible) as in COCO; joints off the image are v=0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import cv2
import numpy as np

IMAGE_W, IMAGE_H = 320, 256
JOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
SKELETON_1BASED = [
    [16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7],
    [6, 8], [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7],
]  # fmt: skip
# limbs drawn as shaded segments: (joint a, joint b, side) with side 0 left, 1 right
LIMBS = ((5, 7, 0), (7, 9, 0), (6, 8, 1), (8, 10, 1), (11, 13, 0), (13, 15, 0), (12, 14, 1), (14, 16, 1))


def _rot(angle: float) -> np.ndarray:
    """Unit vector of an angle in degrees measured from straight down (y grows downwards)."""
    a = math.radians(angle)
    return np.array([math.sin(a), math.cos(a)])


def make_pose(rng: np.random.Generator, height: float, hip: np.ndarray) -> np.ndarray:
    """[17, 2] joint positions of a figure of ``height`` px standing with its hips at ``hip``."""
    tilt = rng.uniform(-15, 15)
    up = -_rot(tilt)  # from the hips towards the neck
    side = np.array([-up[1], up[0]])  # towards the image right
    width = rng.uniform(0.75, 1.0)  # body turned a little away from the camera
    neck = hip + up * 0.30 * height
    kp = np.zeros((17, 2))
    # the person faces the camera: their left is on the image right
    kp[5] = neck + side * 0.11 * height * width
    kp[6] = neck - side * 0.11 * height * width
    kp[11] = hip + side * 0.075 * height * width
    kp[12] = hip - side * 0.075 * height * width
    for s, (shoulder, elbow, wrist) in enumerate(((5, 7, 9), (6, 8, 10))):
        sign = 1 if s == 0 else -1
        upper = tilt + sign * rng.uniform(-20, 160)  # 0 = hanging down, outwards positive
        bend = sign * rng.uniform(0, 120)
        kp[elbow] = kp[shoulder] + _rot(-upper) * 0.17 * height
        kp[wrist] = kp[elbow] + _rot(-(upper + bend)) * 0.15 * height
    for s, (hip_j, knee, ankle) in enumerate(((11, 13, 15), (12, 14, 16))):
        sign = 1 if s == 0 else -1
        thigh = tilt + sign * rng.uniform(-10, 40)
        bend = sign * rng.uniform(-60, 5)
        kp[knee] = kp[hip_j] + _rot(-thigh) * 0.24 * height
        kp[ankle] = kp[knee] + _rot(-(thigh + bend)) * 0.23 * height
    head_tilt = tilt + rng.uniform(-20, 20)
    head_up = -_rot(head_tilt)
    head_side = np.array([-head_up[1], head_up[0]])
    head = neck + head_up * 0.11 * height
    kp[0] = head - head_up * 0.015 * height  # nose
    kp[1] = head + head_up * 0.015 * height + head_side * 0.028 * height  # left eye (image right)
    kp[2] = head + head_up * 0.015 * height - head_side * 0.028 * height
    kp[3] = head + head_side * 0.062 * height  # left ear
    kp[4] = head - head_side * 0.062 * height
    return kp


def _shaded_segment(img, mask, pid, a, b, thickness, colour) -> None:
    """A limb as a cylinder: a dark outline, the colour, then a light core."""
    pa, pb = tuple(round(float(v)) for v in a), tuple(round(float(v)) for v in b)
    colour = np.asarray(colour, dtype=float)
    cv2.line(img, pa, pb, tuple((colour * 0.45).tolist()), thickness + 2, cv2.LINE_AA)
    cv2.line(img, pa, pb, tuple(colour.tolist()), thickness, cv2.LINE_AA)
    cv2.line(
        img, pa, pb, tuple(np.minimum(colour * 1.35 + 30, 255).tolist()), max(1, thickness // 3), cv2.LINE_AA
    )
    cv2.line(mask, pa, pb, pid, thickness + 2)


def draw_person(img, mask, pid, kp, height, rng) -> None:
    """Draw one figure into ``img`` (RGB) and its id into ``mask``."""
    t = max(3, int(0.055 * height))
    left = np.array([rng.uniform(20, 70), rng.uniform(80, 140), rng.uniform(190, 250)])  # blue tones
    right = np.array([rng.uniform(210, 250), rng.uniform(110, 160), rng.uniform(20, 60)])  # orange tones
    torso = rng.uniform(60, 200, 3)
    skin = np.array([rng.uniform(170, 235), rng.uniform(130, 180), rng.uniform(100, 150)])
    body = np.array([kp[5], kp[6], kp[12], kp[11]]).round().astype(np.int32)
    cv2.fillConvexPoly(img, body, tuple(torso.tolist()), cv2.LINE_AA)
    cv2.polylines(img, [body], True, tuple((torso * 0.5).tolist()), 2, cv2.LINE_AA)
    cv2.fillConvexPoly(mask, body, pid)
    for a, b, s in LIMBS:
        _shaded_segment(img, mask, pid, kp[a], kp[b], t, left if s == 0 else right)
    for j in (5, 7, 9, 11, 13, 15, 6, 8, 10, 12, 14, 16):  # joint knobs
        colour = (left if j % 2 == 1 else right) * 0.6
        cv2.circle(
            img,
            tuple(round(float(v)) for v in kp[j]),
            max(2, t // 2 + 1),
            tuple(colour.tolist()),
            -1,
            cv2.LINE_AA,
        )
    neck = (kp[5] + kp[6]) / 2
    head = (kp[3] + kp[4]) / 2
    cv2.line(img, tuple(neck.round().astype(int).tolist()), tuple(head.round().astype(int).tolist()),
             tuple(skin.tolist()), max(2, t - 1), cv2.LINE_AA)  # fmt: skip
    radius = max(3, int(0.07 * height))
    centre = tuple(head.round().astype(int).tolist())
    cv2.circle(img, centre, radius, tuple(skin.tolist()), -1, cv2.LINE_AA)
    cv2.circle(img, centre, radius, tuple((skin * 0.5).tolist()), 1, cv2.LINE_AA)
    cv2.circle(mask, centre, radius, pid, -1)
    dot = max(1, radius // 5)
    cv2.circle(
        img, tuple(kp[1].round().astype(int).tolist()), dot, (30, 60, 200), -1, cv2.LINE_AA
    )  # left eye
    cv2.circle(img, tuple(kp[2].round().astype(int).tolist()), dot, (200, 40, 30), -1, cv2.LINE_AA)
    cv2.circle(img, tuple(kp[0].round().astype(int).tolist()), dot, (120, 40, 40), -1, cv2.LINE_AA)
    for j, colour in ((3, (40, 80, 220)), (4, (230, 120, 40))):  # ears
        cv2.circle(img, tuple(kp[j].round().astype(int).tolist()), dot + 1, colour, -1, cv2.LINE_AA)


def background(rng: np.random.Generator) -> np.ndarray:
    """Smooth random colour field + clutter, [H, W, 3] uint8 RGB."""
    small = rng.uniform(40, 215, (4, 5, 3)).astype(np.float32)
    img = cv2.resize(small, (IMAGE_W, IMAGE_H), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0, 8, img.shape).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(rng.integers(3, 8)):  # clutter: muted shapes and strokes
        colour = tuple(rng.uniform(40, 200, 3).tolist())
        if rng.random() < 0.5:
            x, y = rng.integers(0, IMAGE_W), rng.integers(0, IMAGE_H)
            cv2.rectangle(
                img,
                (int(x), int(y)),
                (int(x + rng.integers(10, 60)), int(y + rng.integers(10, 60))),
                colour,
                -1,
            )
        else:
            p = rng.integers(0, [IMAGE_W, IMAGE_H, IMAGE_W, IMAGE_H])
            cv2.line(img, (int(p[0]), int(p[1])), (int(p[2]), int(p[3])), colour, int(rng.integers(1, 4)))
    return img


def make_image(rng: np.random.Generator, num_people: int):
    """(RGB image, [(keypoints [17, 3], bbox, area)]) of one picture."""
    img = background(rng)
    mask = np.zeros((IMAGE_H, IMAGE_W), np.int32)
    poses = []
    for p in range(num_people):
        height = rng.uniform(0.4, 0.85) * IMAGE_H
        hip = np.array([rng.uniform(0.15, 0.85) * IMAGE_W, rng.uniform(0.35, 0.75) * IMAGE_H + 0.1 * height])
        kp = make_pose(rng, height, hip)
        draw_person(img, mask, p + 1, kp, height, rng)
        poses.append((kp, height))
    if rng.random() < 0.35:  # an occluder box over part of someone
        kp, height = poses[int(rng.integers(len(poses)))]
        cx, cy = kp[int(rng.integers(17))]
        w, h = rng.uniform(0.2, 0.45, 2) * height
        x0, y0 = int(cx - w * rng.uniform(0, 1)), int(cy - h * rng.uniform(0, 1))
        colour = tuple(rng.uniform(30, 220, 3).tolist())
        cv2.rectangle(img, (x0, y0), (int(x0 + w), int(y0 + h)), colour, -1)
        cv2.rectangle(mask, (x0, y0), (int(x0 + w), int(y0 + h)), -1, -1)
    people = []
    for p, (kp, height) in enumerate(poses):
        xy = kp.round().astype(int)
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < IMAGE_W) & (xy[:, 1] >= 0) & (xy[:, 1] < IMAGE_H)
        vis = np.zeros(17)
        for j in np.flatnonzero(inside):
            x, y = xy[j]
            window = mask[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2]
            vis[j] = 2 if (window == p + 1).any() else 1
        keypoints = np.concatenate([np.where(inside[:, None], kp, 0.0), vis[:, None]], 1)
        area = float((mask == p + 1).sum())
        pad = 0.08 * height
        x0, y0 = np.clip(kp.min(0) - pad, 0, None)
        x1, y1 = np.minimum(kp.max(0) + pad, [IMAGE_W - 1, IMAGE_H - 1])
        if vis.sum() == 0 or area == 0 or x1 <= x0 or y1 <= y0:
            continue
        people.append((keypoints, [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], area))
    return img, people


def make_split(out: Path, split: str, num_people: int, rng: np.random.Generator, first_id: int) -> int:
    """Draw images until ``num_people`` people are annotated; returns their count."""
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    image_id = first_id
    while len(annotations) < num_people:
        want = min(int(rng.integers(1, 4)), num_people - len(annotations))
        img, people = make_image(rng, want)
        if not people:
            continue
        name = f"{image_id:012d}.jpg"
        cv2.imwrite(
            str(image_dir / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92]
        )
        images.append({"id": image_id, "file_name": name, "width": IMAGE_W, "height": IMAGE_H})
        for kp, bbox, area in people:
            annotations.append(
                {
                    "id": first_id * 10 + len(annotations),
                    "image_id": image_id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "bbox": bbox,
                    "area": area,
                    "num_keypoints": int((kp[:, 2] > 0).sum()),
                    "keypoints": [round(float(v), 2) for v in kp.ravel()],
                }
            )
        image_id += 1
    data = {
        "info": {"description": f"pnfs synthetic people, {split}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {
                "id": 1,
                "name": "person",
                "supercategory": "person",
                "keypoints": list(JOINTS),
                "skeleton": SKELETON_1BASED,
            }
        ],
    }
    ann_dir = out / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    (ann_dir / f"person_keypoints_{split}.json").write_text(json.dumps(data))
    return len(annotations)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=1000, help="people in the train split")
    p.add_argument("--val", type=int, default=200, help="people in the val split")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.train < 0 or args.val < 0:
        p.error("--train and --val must be >= 0")
    cv2.setNumThreads(1)
    out = Path(args.out)
    rng = np.random.default_rng(args.seed)
    n_train = make_split(out, "train", args.train, rng, first_id=1)
    n_val = make_split(out, "val", args.val, np.random.default_rng([args.seed, 1]), first_id=1_000_000)
    print(f"{out}: {n_train} train / {n_val} val people")
    return 0


if __name__ == "__main__":
    sys.exit(main())
