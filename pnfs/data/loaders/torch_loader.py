"""The CPU loader: WebDataset shards + torch DataLoader, simplejpeg decode, cv2.warpAffine.

The DataLoader is map-style over the batches of an :class:`~pnfs.data.plan.EpochPlan`
(``batch_size=None``): batch b goes to worker b mod W, which reads its samples from the
shards by index (one pread each), decodes the crops, warps them and returns a finished
:class:`PoseBatch`. Batches arrive in plan order, so order and resumption are exact.

A crop holds everything any augmentation can reach, usually at more pixels than the input
needs: it is decoded at the smallest libjpeg DCT scale (1, 1/2, 1/4, 1/8) that still gives
at least one decoded pixel per input pixel (:func:`decode_for_input`): cheaper than a full
decode, and it averages pixel blocks where a bilinear warp of the full crop would alias.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import simplejpeg
import torch

from pnfs.data.bad_samples import BadSample, BadSampleReport
from pnfs.data.batch import PoseBatch
from pnfs.data.geometry import compose
from pnfs.data.loaders.assemble import normalise_hwc
from pnfs.data.loaders.plan_reader import PlanReader, plan_dataloader


def decode_for_input(data: bytes, crop_to_input: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 [h', w', 3], decoded px -> input px [2, 3]) of one crop (simplejpeg).

    The decode scale f is the smallest of 1, 1/2, 1/4, 1/8 with f >= the largest stretch of
    ``crop_to_input`` (input px per crop px), so the warp never magnifies what a full decode
    would have shown at that size. libjpeg's scaled IDCT returns ceil(size · f) pixels, each
    about the mean of its (1/f)² block: decoded pixel d has its centre at crop x =
    (d + 0.5) / f - 0.5. Crops under 8 px a side are decoded whole (there the output size
    would not tell which scale libjpeg picked).
    """
    (a, b), (c, d) = crop_to_input[:, :2].tolist()  # largest singular value of the 2x2 part:
    squares, det = a * a + b * b + c * c + d * d, a * d - b * c
    stretch = math.sqrt(0.5 * (squares + math.sqrt(max(squares * squares - 4.0 * det * det, 0.0))))
    f = 1.0
    while f > 0.125 and stretch <= f / 2:
        f /= 2
    h, w = simplejpeg.decode_jpeg_header(data)[:2]
    if f == 1.0 or min(h, w) < 8:
        return simplejpeg.decode_jpeg(data, colorspace="RGB"), crop_to_input
    image = simplejpeg.decode_jpeg(
        data, colorspace="RGB", min_height=math.ceil(h * f), min_width=math.ceil(w * f)
    )
    if image.shape[:2] != (math.ceil(h * f), math.ceil(w * f)):
        raise ValueError(f"scaled JPEG decode gave {image.shape[:2]} for {h}x{w} at scale {f}")
    decoded_to_crop = np.array([[1 / f, 0.0, 0.5 / f - 0.5], [0.0, 1 / f, 0.5 / f - 0.5]])
    return image, compose(crop_to_input, decoded_to_crop)


def warp_crops(crops: list[np.ndarray], crop_to_input: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """cv2.warpAffine of each crop to the input: uint8 [N, H, W, 3] (bilinear, black border)."""
    h, w = input_size
    out = np.empty((len(crops), h, w, 3), np.uint8)
    for i, crop in enumerate(crops):
        cv2.warpAffine(
            crop,
            crop_to_input[i].astype(np.float64),
            (w, h),
            dst=out[i],
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=(0, 0, 0),
        )
    return out


class PlanBatches(PlanReader):
    """Item b = (batch b of the plan decoded and augmented, the bad samples met) (in a worker);
    bad samples are replaced as :mod:`pnfs.data.loaders.plan_reader` says."""

    def __getitem__(self, b: int) -> tuple[PoseBatch, list[BadSample]]:
        got = self.checked(b, decode_for_input)
        meta, decoded = got.meta, got.decoded
        assert decoded is not None  # checked() with a decode fills it
        pixels = warp_crops(
            [image for image, _ in decoded], np.stack([m for _, m in decoded]), self.input_size
        )
        batch = PoseBatch(
            image=normalise_hwc(pixels),
            keypoints=torch.from_numpy(got.keypoints).float(),
            affine=torch.from_numpy(got.input_to_image).float(),
            image_id=torch.from_numpy(meta.ids[:, 0].copy()),
            ann_id=torch.from_numpy(meta.ids[:, 1].copy()),
            score=torch.from_numpy(meta.score.copy()).float(),
        )
        return batch, got.bad


class PoseLoader:
    """An iterable of PoseBatch with ``len()`` = batches of this rank's (remaining) epoch.

    Items that come as (PoseBatch, [BadSample]) (:class:`PlanBatches`) are unpacked: the bad
    samples go into ``bad_samples`` (which raises past its limit) and the run log."""

    def __init__(
        self,
        dataset: PlanReader,
        num_workers: int,
        pin_memory: bool = False,
        bad_samples: BadSampleReport | None = None,
    ):
        self.dataset = dataset
        self.num_workers = num_workers
        self.bad_samples = bad_samples if bad_samples is not None else BadSampleReport(limit=0)
        self.loader = plan_dataloader(dataset, num_workers, pin_memory)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        for item in self.loader:
            if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], PoseBatch):
                item, bad = item
                self.bad_samples.met(bad)
            yield item
