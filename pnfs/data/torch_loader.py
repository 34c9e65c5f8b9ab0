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

import logging
import math

import cv2
import numpy as np
import simplejpeg
import torch

from pnfs.data.assemble import batch_geometry, normalise_hwc
from pnfs.data.bad_samples import (
    BAD_ARRAYS,
    BAD_JPEG,
    BadSample,
    BadSampleError,
    BadSampleReport,
    array_problem,
)
from pnfs.data.batch import PoseBatch
from pnfs.data.geometry import compose
from pnfs.data.plan import EpochPlan
from pnfs.data.shards import META_EXTS, SampleMeta, ShardSet, parse_meta

SAMPLE_EXTS = ("jpg", *META_EXTS)


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


class PlanReader(torch.utils.data.Dataset):
    """Map-style over the batches of an :class:`EpochPlan`: :meth:`read` gives batch b's raw
    samples, their metadata and the augmented geometry (crop->input, input->image, keypoints)."""

    def __init__(
        self,
        shards: ShardSet,
        plan: EpochPlan,
        input_size: tuple[int, int],
        margin: float,
        flip_perm: list[int],
    ):
        self.shards, self.plan = shards, plan
        self.input_size, self.margin, self.flip_perm = tuple(input_size), margin, flip_perm

    def __len__(self) -> int:
        return len(self.plan)

    def read(self, b: int) -> tuple[list[dict[str, bytes]], SampleMeta, np.ndarray, np.ndarray, np.ndarray]:
        """Batch b: (blobs, meta, crop_to_input [N,2,3], input_to_image [N,2,3], keypoints [N,K,3])."""
        blobs = [self.shards.read(int(s), int(p), SAMPLE_EXTS) for s, p in self.plan.batches[b]]
        meta = parse_meta(blobs)
        crop_to_input, input_to_image, keypoints = batch_geometry(
            meta, self.plan.augment[b], self.input_size, self.margin, self.flip_perm
        )
        return blobs, meta, crop_to_input, input_to_image, keypoints


class PlanBatches(PlanReader):
    """Item b = (batch b of the plan decoded and augmented, the bad samples met) (in a worker).

    A sample whose raw arrays or JPEG are bad (:mod:`pnfs.data.bad_samples`) is replaced by
    the next good sample of the rank's epoch after batch b (wrapping round), with slot i's
    augmentation: batch shapes and the per-rank batch count stay the plan's, so ranks stay
    in step whichever of them meets bad data. ``on_error="raise"`` raises instead.
    """

    def __init__(self, *args, on_error: str = "skip", **kwargs):
        super().__init__(*args, **kwargs)
        if on_error not in ("skip", "raise"):
            raise ValueError(f"data.on_error must be 'skip' or 'raise', got {on_error!r}")
        self.on_error = on_error

    def _spares(self, b: int):
        """The plan's samples after batch b, wrapping round: replacements for bad ones."""
        rest = self.plan.batches[b + 1 :] + self.plan.batches[: b + 1]
        yield from (tuple(int(v) for v in pair) for batch in rest for pair in batch)

    def _bad(self, reason: str, shard: int, pos: int, error: str) -> BadSample:
        bad = BadSample(reason, self.shards.urls[shard], self.shards.key(shard, pos), error)
        if self.on_error == "raise":
            raise BadSampleError(f"{bad} (data.on_error=raise; skip drops such samples)")
        return bad

    def _good_arrays(
        self, pair: tuple[int, int], spares, bad: list[BadSample]
    ) -> tuple[tuple[int, int], dict[str, bytes]]:
        """(pair, its blobs) of ``pair``, or of the next spare whose raw arrays are sound."""
        num_joints = len(self.flip_perm)
        while True:
            s, p = pair
            blobs = self.shards.read_present(s, p, SAMPLE_EXTS)
            problem = array_problem(blobs, num_joints) or (None if "jpg" in blobs else "no jpg")
            if problem is None:
                return pair, blobs
            bad.append(self._bad(BAD_ARRAYS, s, p, problem))
            pair = self._next_spare(spares)

    @staticmethod
    def _next_spare(spares) -> tuple[int, int]:
        try:
            return next(spares)
        except StopIteration:
            raise BadSampleError("every sample of this rank's epoch is bad") from None

    def __getitem__(self, b: int) -> tuple[PoseBatch, list[BadSample]]:
        bad: list[BadSample] = []
        spares = self._spares(b)
        pairs = [tuple(int(v) for v in pair) for pair in self.plan.batches[b]]
        pairs, blobs = map(list, zip(*(self._good_arrays(pair, spares, bad) for pair in pairs)))
        aug = self.plan.augment[b]
        decoded: list = [None] * len(blobs)
        todo = list(range(len(blobs)))
        while todo:  # geometry is per sample: a replaced slot leaves the others' unchanged
            meta = parse_meta(blobs)
            crop_to_input, input_to_image, keypoints = batch_geometry(
                meta, aug, self.input_size, self.margin, self.flip_perm
            )
            failed = []
            for i in todo:
                try:
                    decoded[i] = decode_for_input(blobs[i]["jpg"], crop_to_input[i])
                except ValueError as e:
                    bad.append(self._bad(BAD_JPEG, *pairs[i], str(e)))
                    pairs[i], blobs[i] = self._good_arrays(self._next_spare(spares), spares, bad)
                    failed.append(i)
            todo = failed
        crops = [image for image, _ in decoded]
        pixels = warp_crops(crops, np.stack([m for _, m in decoded]), self.input_size)
        batch = PoseBatch(
            image=normalise_hwc(pixels),
            keypoints=torch.from_numpy(keypoints).float(),
            affine=torch.from_numpy(input_to_image).float(),
            image_id=torch.from_numpy(meta.ids[:, 0].copy()),
            ann_id=torch.from_numpy(meta.ids[:, 1].copy()),
            score=torch.from_numpy(meta.score.copy()).float(),
        )
        return batch, bad


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def fork_safe_opencv() -> None:
    """Put OpenCV on one thread in this (parent) process before DataLoader workers fork.

    A fork taken after OpenCV's thread pool has run in the parent hangs the child's first
    cv2 call (reproduced with opencv 5.0 on CPU: an evaluation's overlays, then a new epoch's
    workers). The parent decodes only with ``num_workers=0`` and draws overlays, neither of
    which needs OpenCV's threads. Every loader with workers calls this, so every entry point
    (train, evaluate, predict) is covered."""
    cv2.setNumThreads(1)


class PoseLoader:
    """An iterable of PoseBatch with ``len()`` = batches of this rank's (remaining) epoch.

    Items that come as (PoseBatch, [BadSample]) (:class:`PlanBatches`) are unpacked: the bad
    samples go into ``bad_samples`` (which raises past its limit) and the run log."""

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        num_workers: int,
        pin_memory: bool = False,
        bad_samples: BadSampleReport | None = None,
    ):
        self.dataset = dataset
        self.num_workers = num_workers
        self.bad_samples = bad_samples if bad_samples is not None else BadSampleReport(limit=0)
        if num_workers > 0:
            fork_safe_opencv()
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=num_workers,
            worker_init_fn=_worker_init if num_workers > 0 else None,
            pin_memory=pin_memory,
            prefetch_factor=4 if num_workers > 0 else None,
            persistent_workers=False,
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        log = logging.getLogger("pnfs.train")
        for item in self.loader:
            if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], PoseBatch):
                item, bad = item
                for sample in bad:
                    log.warning("bad sample dropped: %s", sample)
                    self.bad_samples.add(sample)
            yield item
