"""Inference: flip test, on-device decoding and back-projection to original image pixels.

Pixel convention (:mod:`pnfs.data.batch`): pixel centres sit at integer coordinates, input
pixel x maps to heatmap u = x / s (stride s = 4), targets sit at the exact u, and decoding
returns x = u · s. Everything below is batched tensor code on the batch's device.

**Flip test without a half-pixel shift.** Mirroring an input of width W as an array maps x to
W − 1 − x; mirroring a heatmap of width W/s as an array maps u to W/s − 1 − u, i.e. input
x to W − s − x. The two axes differ by (s − 1)/2 input pixels, so averaging the plain
array-flipped map with the original would shift every peak by 3/8 heatmap px at s = 4 (the
reason the HRNet lineage shifts the flipped map by one pixel, which is right only for its
own convention). We mirror the input about the heatmap's axis instead: array flip, then
s − 1 columns shift (edge replicated). Then the array flip of the output is exactly the
mirror of the input, and the maps are averaged with no shift at all.
``flip_shift=True`` gives the HRNet habit instead (plain array flip, flipped map shifted one
heatmap pixel right), kept for comparison only.

**Decoding.** :func:`pnfs.kernels.argmax_decode` (argmax, then 0.25 heatmap px toward the
larger neighbour: the paper's quarter offset). Its error on a perfect Gaussian is up to
0.25 heatmap px (1 input px at s = 4) per axis, with zero mean. ``refine="gaussian"`` adds a
log-domain 3-point quadratic fit around the argmax (exact for a Gaussian peak), for users
who want sub-pixel accuracy; the default stays the paper's quarter offset.

**Back-projection.** x_img = A · [u·s, v·s, 1] with A the batch's [2, 3] affine (input px
-> original image px).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch

from pnfs.data.batch import HEATMAP_STRIDE
from pnfs.data.geometry import box_to_region, invert, region_to_input
from pnfs.data.loaders.assemble import normalise
from pnfs.kernels import argmax_decode

Refine = Literal["quarter", "gaussian"]


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 natively: CUDA with bf16, or a CPU with AVX512-BF16/AMX."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def inference_amp(amp: str, device: torch.device | str) -> tuple[torch.dtype | None, str]:
    """``eval.amp`` on ``device`` -> (autocast dtype or None, a line saying which ran).

    ``auto``: bfloat16 autocast on a CUDA device that has it, float32 everywhere else (a CPU's
    bfloat16 moved a joint 75.8 px from the float32 export of the same checkpoint: speed is not
    worth that by default); ``bf16``: bfloat16 where the device runs it natively (CUDA or a CPU
    with AVX512-BF16/AMX), float32 otherwise, saying that it fell back; ``none``: float32.
    """
    device = torch.device(device)
    if amp not in ("auto", "bf16", "none"):
        raise ValueError(f"eval.amp: unknown value {amp!r}; expected 'auto', 'bf16' or 'none'")
    if amp == "none":
        return None, f"inference: float32 on {device.type} (eval.amp=none)"
    if amp == "auto" and device.type != "cuda":
        return None, f"inference: float32 on {device.type} (eval.amp=auto; eval.amp=bf16 for bfloat16)"
    if bf16_supported(device):
        return torch.bfloat16, f"inference: bfloat16 autocast on {device.type} (eval.amp={amp})"
    why = "fell back to float32" if amp == "bf16" else "float32"
    return None, f"inference: {why}: this {device.type} has no native bfloat16 (eval.amp={amp})"


def heatmap_stride(image_width: int, heatmap_width: int) -> int:
    if heatmap_width <= 0 or image_width % heatmap_width:
        raise ValueError(f"input width {image_width} is not a multiple of the heatmap width {heatmap_width}")
    return image_width // heatmap_width


def mirror_images(
    images: torch.Tensor, stride: int = HEATMAP_STRIDE, flip_shift: bool = False
) -> torch.Tensor:
    """[N, C, H, W] mirrored about x = (W − s)/2, the axis whose image is a heatmap array flip.

    out[..., x] = images[..., W − s − x] (the s − 1 last columns replicate the edge).
    With ``flip_shift`` (HRNet habit): the plain array flip, about x = (W − 1)/2.
    """
    flipped = images.flip(-1)
    if flip_shift or stride == 1:
        return flipped
    edge = flipped[..., -1:].expand(*flipped.shape[:-1], stride - 1)
    return torch.cat([flipped[..., stride - 1 :], edge], dim=-1)


def unmirror_scores(
    scores: torch.Tensor, flip_permutation: list[int], flip_shift: bool = False
) -> torch.Tensor:
    """Score maps of the mirrored input [N, K, h, w] -> maps in the original's frame and joints."""
    out = scores.flip(-1)[:, flip_permutation]
    if flip_shift:
        out = torch.cat([out[..., :1], out[..., :-1]], dim=-1)  # one heatmap pixel to the right
    return out


def predict_scores(
    model: torch.nn.Module,
    images: torch.Tensor,
    flip_permutation: list[int] | None = None,
    flip_shift: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Score maps [N, K, H/s, W/s] (float32); flip test when ``flip_permutation`` is given.

    The flip test runs original and mirrored images in one forward pass of 2N images. Only
    the forward pass runs under autocast (``amp_dtype``, e.g. bfloat16 on CUDA).
    """

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            return model(x).float()

    if flip_permutation is None:
        return forward(images)
    n, width = images.shape[0], images.shape[-1]
    # the stride is only known after a forward pass; every pnfs model has stride 4, and we check it
    stride = HEATMAP_STRIDE
    both = forward(torch.cat([images, mirror_images(images, stride, flip_shift)]))
    if heatmap_stride(width, both.shape[-1]) != stride:
        raise ValueError(f"model output width {both.shape[-1]} is not input width {width} / {stride}")
    return 0.5 * (both[:n] + unmirror_scores(both[n:], flip_permutation, flip_shift))


def refine_gaussian(scores: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Sub-pixel peaks by a 3-point quadratic fit of log(score), per axis.

    scores [N, K, h, w], coords [N, K, 2] from argmax_decode (argmax ± 0.25) -> [N, K, 2].
    The stencil is centred on the argmax (moved inwards by one pixel on the border); with the
    values L, C, R at c − 1, c, c + 1 the peak is c + (ln L − ln R) / (2 (ln L − 2 ln C + ln R)),
    which is exact for a Gaussian. The result is kept within ±0.5 px of the argmax; where the
    fit has no maximum (or the map is under 3 px wide) the quarter-offset value stays.
    """
    n, k, h, w = scores.shape
    flat = scores.float().reshape(n, k, h * w)
    peak = torch.round(coords).long()  # argmax_decode's offsets are ±0.25, so this is the argmax
    tiny = torch.finfo(torch.float32).tiny

    def log_at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return flat.gather(-1, (yy * w + xx).unsqueeze(-1)).squeeze(-1).clamp_min(tiny).log()

    def fit(axis: int, size: int) -> torch.Tensor:
        if size < 3:
            return coords[..., axis]
        at = peak[..., axis]
        c = at.clamp(1, size - 2)
        if axis == 0:
            lo, mid, hi = (log_at(peak[..., 1], c + d) for d in (-1, 0, 1))
        else:
            lo, mid, hi = (log_at(c + d, peak[..., 0]) for d in (-1, 0, 1))
        curvature = lo - 2 * mid + hi
        ok = curvature < 0
        step = 0.5 * (lo - hi) / torch.where(ok, curvature, torch.ones_like(curvature))
        position = torch.minimum(torch.maximum(c.float() + step, at.float() - 0.5), at.float() + 0.5)
        return torch.where(ok, position, coords[..., axis])

    return torch.stack([fit(0, w), fit(1, h)], dim=-1)


def decode(scores: torch.Tensor, refine: Refine = "quarter") -> tuple[torch.Tensor, torch.Tensor]:
    """scores [N, K, h, w] -> (coords [N, K, 2] in heatmap px, maxvals [N, K])."""
    coords, maxvals = argmax_decode(scores)
    if refine == "gaussian":
        coords = refine_gaussian(scores, coords)
    elif refine != "quarter":
        raise ValueError(f"eval.refine: unknown value {refine!r}; expected 'quarter' or 'gaussian'")
    return coords, maxvals


def back_project(coords: torch.Tensor, affine: torch.Tensor, stride: int = HEATMAP_STRIDE) -> torch.Tensor:
    """Heatmap coords [N, K, 2] -> original image px [N, K, 2] through affine [N, 2, 3] (input -> image)."""
    xy = coords.to(affine.dtype) * stride
    return xy @ affine[:, :, :2].transpose(1, 2) + affine[:, None, :, 2]


@dataclass
class PosePrediction:
    """keypoints [N, K, 2] in original image px, scores [N, K], input_keypoints [N, K, 2] in input px."""

    keypoints: torch.Tensor
    scores: torch.Tensor
    input_keypoints: torch.Tensor


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    images: torch.Tensor,
    affine: torch.Tensor,
    *,
    flip_permutation: list[int] | None = None,
    flip_shift: bool = False,
    refine: Refine = "quarter",
    amp_dtype: torch.dtype | None = None,
) -> PosePrediction:
    """Images [N, 3, H, W] + affine [N, 2, 3] -> poses in original image pixels (no grad).

    Decoding and back-projection run in float32 whatever ``amp_dtype`` the forward used.
    """
    scores = predict_scores(model, images, flip_permutation, flip_shift, amp_dtype)
    stride = heatmap_stride(images.shape[-1], scores.shape[-1])
    with torch.autocast(images.device.type, enabled=False):  # also inside a caller's autocast region
        coords, maxvals = decode(scores, refine)
        keypoints = back_project(coords, affine.float(), stride)
    return PosePrediction(keypoints=keypoints, scores=maxvals, input_keypoints=coords * stride)


def person_inputs(
    image: np.ndarray, boxes: np.ndarray, input_size: tuple[int, int], margin: float = 1.25
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop people out of one RGB image the way the loaders do (no augmentation).

    image uint8 [H0, W0, 3], boxes [P, 4] (x, y, w, h in image px), input_size (H, W) ->
    (normalised inputs [P, 3, H, W], affine [P, 2, 3] input px -> image px).
    """
    h, w = input_size
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    centre, size = box_to_region(boxes, w / h, margin)
    to_input = region_to_input(centre, size, (h, w))
    crops = np.stack(
        [
            cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
            for m in to_input
        ]
    )
    images = normalise(torch.from_numpy(crops).permute(0, 3, 1, 2))
    return images, torch.from_numpy(invert(to_input)).float()
