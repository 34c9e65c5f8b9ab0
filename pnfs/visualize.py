"""Pose overlays: skeletons drawn on RGB images (uint8 [H, W, 3]) with OpenCV."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from pnfs.data.batch import IMAGENET_MEAN, IMAGENET_STD
from pnfs.keypoints import JointSet

# One colour per limb, cycling, for keypoint sets without their own ``colors``; RGB.
PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
)  # fmt: skip


def draw_poses(
    image: np.ndarray,
    keypoints: np.ndarray,
    joints: JointSet,
    scores: np.ndarray | None = None,
    threshold: float = 0.2,
    thickness: int | None = None,
) -> np.ndarray:
    """A copy of ``image`` (RGB uint8 [H, W, 3]) with poses [P, K, 2] drawn.

    Joints whose score is below ``threshold`` (and limbs touching them) are left out; without
    scores every joint is drawn. Line width scales with the image size unless given.
    """
    canvas = np.ascontiguousarray(image.copy())
    keypoints = np.asarray(keypoints, dtype=np.float64).reshape(-1, joints.num_joints, 2)
    shown = (
        np.ones(keypoints.shape[:2], dtype=bool)
        if scores is None
        else np.asarray(scores).reshape(keypoints.shape[:2]) >= threshold
    )
    shown &= np.isfinite(keypoints).all(-1)
    width = thickness or max(1, round(max(canvas.shape[:2]) / 200))
    for person, visible in zip(keypoints, shown):
        points = [(round(x), round(y)) for x, y in person]
        for e, (a, b) in enumerate(joints.skeleton):
            if visible[a] and visible[b]:
                colour = joints.colors[e] if joints.colors else PALETTE[e % len(PALETTE)]
                cv2.line(canvas, points[a], points[b], colour, width, cv2.LINE_AA)
        for j, point in enumerate(points):
            if visible[j]:
                cv2.circle(canvas, point, width + 1, (255, 255, 255), -1, cv2.LINE_AA)
                cv2.circle(canvas, point, width + 1, (0, 0, 0), 1, cv2.LINE_AA)
    return canvas


def denormalize(image: torch.Tensor) -> np.ndarray:
    """A normalised RGB input [3, H, W] (ImageNet statistics) -> uint8 [H, W, 3]."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    pixels = (image.float() * std + mean).clamp(0, 1) * 255
    return pixels.round().byte().permute(1, 2, 0).cpu().numpy()


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file -> RGB uint8 [H, W, 3]; a clear error when it cannot be read."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot read image {str(path)!r}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def save_rgb(path: str | Path, image: np.ndarray) -> None:
    """Write an RGB uint8 image (PNG/JPEG by extension); parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write image {str(path)!r}")


def draw_results_on_images(
    results: list[dict],
    joints: JointSet,
    image_dir: str | Path,
    image_names: dict[int, str],
    out_dir: str | Path,
    limit: int = 8,
    threshold: float = 0.2,
) -> list[Path]:
    """Skeletons of result dicts (``image_id``, ``keypoints`` flat or [[x, y, s]]) on the originals.

    The first ``limit`` images (by id) that have results get ``<out_dir>/<image_id>.png``;
    returns the written paths.
    """
    by_image: dict[int, list[np.ndarray]] = {}
    for r in results:
        by_image.setdefault(int(r["image_id"]), []).append(
            np.asarray(r["keypoints"], dtype=np.float64).reshape(-1, 3)
        )
    written = []
    for image_id in sorted(by_image)[:limit]:
        people = np.stack(by_image[image_id])
        picture = draw_poses(
            read_rgb(Path(image_dir) / image_names[image_id]),
            people[..., :2],
            joints,
            people[..., 2],
            threshold,
        )
        path = Path(out_dir) / f"{image_id}.png"
        save_rgb(path, picture)
        written.append(path)
    return written
