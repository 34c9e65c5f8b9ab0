"""Crop geometry: pure functions on numpy arrays *and* torch tensors (batched over leading dims).

Pixel convention (see :mod:`pnfs.data.batch`): pixel (i, j) has its centre at (x=j, y=i), so an
image of width W covers x in [-0.5, W - 0.5]. All matrices are 2x3 affines ``[A | t]`` acting
on column vectors (x, y, 1); ``compose(A, B)`` applies B first.

The person box -> input mapping (HRNet's "center/scale" crop, without its rounding):

    region  = box widened to the input aspect W/H, times ``margin`` (1.25)
    M       = Flip · T(c_in) · R(rotation) · S(W / (region_w · scale)) · T(-c_box)

with c_in = ((W-1)/2, (H-1)/2): the region's edges land on the input's pixel edges. ``scale``
> 1 shows more context (the person looks smaller); a positive ``rotation`` (degrees) turns
the picture clockwise on screen (y points down); ``flip`` mirrors about the input's
vertical centre line x = (W-1)/2. Keypoints go through the same matrix; a flip also swaps
left/right joints (:func:`flip_joints`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

Array = Any  # np.ndarray or torch.Tensor


def _xp(x: Array):
    """The array module of ``x``. torch is imported only when a tensor comes in, so the
    sharding tools (numpy only) and their worker processes start without it."""
    if type(x).__module__.startswith("torch"):
        import torch

        return torch
    return np


def _like(value: Array | float, ref: Array) -> Array:
    """``value`` as an array of ``ref``'s kind/dtype/device (broadcastable)."""
    xp = _xp(ref)
    if xp is np:
        return np.asarray(value, dtype=ref.dtype)
    return xp.as_tensor(value, dtype=ref.dtype, device=ref.device)


def box_to_region(bbox: Array, aspect: float, margin: float = 1.25) -> tuple[Array, Array]:
    """Person box -> (centre [..., 2], size [..., 2]) of the region the input shows at scale 1.

    bbox: [..., 4] as x, y, w, h. The box is widened (never shrunk) to width/height ==
    ``aspect`` (input W / H), then both sides are multiplied by ``margin``.
    """
    xp = _xp(bbox)
    x, y, w, h = bbox[..., 0], bbox[..., 1], bbox[..., 2], bbox[..., 3]
    centre = xp.stack([x + w * 0.5, y + h * 0.5], -1)
    width = xp.maximum(w, h * aspect) * margin
    size = xp.stack([width, width / aspect], -1)
    return centre, size


def region_to_input(
    centre: Array,
    size: Array,
    input_size: tuple[int, int],
    scale: Array | float = 1.0,
    rotation: Array | float = 0.0,
    flip: Array | bool = False,
) -> Array:
    """Affine [..., 2, 3] mapping original pixels to input pixels (see the module docstring).

    centre, size: [..., 2] from :func:`box_to_region`; input_size: (H, W);
    scale, rotation (degrees), flip: scalars or [...] arrays.
    """
    xp = _xp(centre)
    out_h, out_w = input_size
    scale = _like(scale, centre)
    theta = _like(rotation, centre) * (math.pi / 180.0)
    flip = _like(flip, centre) > 0.5
    k = out_w / (size[..., 0] * scale)  # input px per original px (aspect kept)
    cos, sin = xp.cos(theta) * k, xp.sin(theta) * k
    cos, sin = cos + 0 * centre[..., 0], sin + 0 * centre[..., 0]  # broadcast to the batch
    cx, cy = centre[..., 0], centre[..., 1]
    mid_x, mid_y = (out_w - 1) / 2.0, (out_h - 1) / 2.0
    # R·S applied to (p - c), then + c_in.  R = [[cos, -sin], [sin, cos]].
    tx = mid_x - (cos * cx - sin * cy)
    ty = mid_y - (sin * cx + cos * cy)
    row_x = xp.stack([cos, -sin, tx], -1)
    row_y = xp.stack([sin, cos, ty], -1)
    # Flip: x -> (W - 1) - x, i.e. negate row_x and add W - 1 to its translation.
    sign = xp.where(flip, _like(-1.0, centre), _like(1.0, centre))
    offset = xp.where(flip, _like(out_w - 1.0, centre), _like(0.0, centre))
    row_x = row_x * sign[..., None]
    row_x = xp.stack([row_x[..., 0], row_x[..., 1], row_x[..., 2] + offset], -1)
    return xp.stack([row_x, row_y], -2)


def to_3x3(m: Array) -> Array:
    """[..., 2, 3] -> [..., 3, 3] with the row (0, 0, 1) appended."""
    xp = _xp(m)
    last = _like([0.0, 0.0, 1.0], m) + 0 * m[..., :1, :]
    return xp.concatenate([m, last], -2) if xp is np else xp.cat([m, last], -2)


def compose(a: Array, b: Array) -> Array:
    """The affine ``a ∘ b`` (apply ``b`` first), both [..., 2, 3]."""
    return (to_3x3(a) @ to_3x3(b))[..., :2, :]


def invert(m: Array) -> Array:
    """Inverse affine, [..., 2, 3] -> [..., 2, 3] (closed-form 2x2 inverse)."""
    xp = _xp(m)
    a, b, tx = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    c, d, ty = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    row_x = xp.stack([ia, ib, -(ia * tx + ib * ty)], -1)
    row_y = xp.stack([ic, id_, -(ic * tx + id_ * ty)], -1)
    return xp.stack([row_x, row_y], -2)


def transform_points(m: Array, points: Array) -> Array:
    """Apply [..., 2, 3] affines to points [..., K, 2] -> [..., K, 2]."""
    x, y = points[..., 0], points[..., 1]
    m = m[..., None, :, :]
    xs = m[..., 0, 0] * x + m[..., 0, 1] * y + m[..., 0, 2]
    ys = m[..., 1, 0] * x + m[..., 1, 1] * y + m[..., 1, 2]
    return _xp(points).stack([xs, ys], -1)


def inside_image(points: Array, size: tuple[int, int]) -> Array:
    """[..., K] bool: the point lies on the image of size (H, W), i.e. x in [-0.5, W-0.5)."""
    h, w = size
    x, y = points[..., 0], points[..., 1]
    return (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)


def flip_joints(keypoints: Array, permutation: list[int], flip: Array | bool) -> Array:
    """Swap left/right joints of [..., K, C] where ``flip`` ([...] or scalar) is true."""
    xp = _xp(keypoints)
    swapped = keypoints[..., permutation, :]
    flip = _like(flip, keypoints) > 0.5
    return xp.where(flip[..., None, None], swapped, keypoints)


def reachable_region(
    bbox: np.ndarray,
    margin: float = 1.25,
    max_scale: float = 1.3,
    aspects: tuple[float, ...] = (0.75, 1.0),
) -> np.ndarray:
    """[x0, y0, x1, y1] (original px, pixel edges) of everything any augmentation can show.

    ``aspects`` are the ends of the range of input W/H to cover (the region's diagonal is
    largest at an end). The region of :func:`box_to_region` for each aspect, enlarged by
    ``max_scale`` and turned by any angle, stays inside the circle around the box centre
    whose diameter is the region's diagonal; the square around that circle is returned.
    """
    bbox = np.asarray(bbox, dtype=np.float64)
    half = 0.0
    for aspect in aspects:
        centre, size = box_to_region(bbox, aspect, margin)
        half = max(half, 0.5 * max_scale * float(np.hypot(size[0], size[1])))
    cx, cy = float(centre[0]), float(centre[1])
    return np.array([cx - half, cy - half, cx + half, cy + half])


@dataclass
class Augment:
    """Per-sample augmentation parameters, arrays of length N (see :func:`region_to_input`)."""

    scale: np.ndarray  # [N] float
    rotation: np.ndarray  # [N] degrees
    flip: np.ndarray  # [N] bool

    @staticmethod
    def identity(n: int) -> Augment:
        return Augment(np.ones(n), np.zeros(n), np.zeros(n, dtype=bool))

    @staticmethod
    def sample(
        rng: np.random.Generator,
        n: int,
        rotation: float = 45.0,
        scale_range: tuple[float, float] = (0.7, 1.3),
        flip_prob: float = 0.5,
    ) -> Augment:
        """Uniform scale in ``scale_range``, uniform rotation in [-rotation, rotation], flip."""
        lo, hi = scale_range
        return Augment(
            scale=rng.uniform(lo, hi, n),
            rotation=rng.uniform(-rotation, rotation, n),
            flip=rng.random(n) < flip_prob,
        )

    def __getitem__(self, idx) -> Augment:
        return Augment(self.scale[idx], self.rotation[idx], self.flip[idx])

    def __len__(self) -> int:
        return len(self.scale)


def input_affines(
    bbox: Array, crop_to_image: Array, input_size: tuple[int, int], aug: Augment, margin: float = 1.25
) -> tuple[Array, Array]:
    """For N samples: (crop px -> input px [N,2,3], input px -> original px [N,2,3]).

    bbox: [N, 4] original px; crop_to_image: [N, 2, 3]. The one formula every loader uses.
    """
    h, w = input_size
    centre, size = box_to_region(bbox, w / h, margin)
    to_input = region_to_input(centre, size, input_size, aug.scale, aug.rotation, aug.flip)
    return compose(to_input, crop_to_image), invert(to_input)
