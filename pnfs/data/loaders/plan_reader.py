"""The batches of an :class:`~pnfs.data.plan.EpochPlan` read from the shards, under the
bad-sample policy: the one reader of the ``torch`` and ``gpu`` loaders, and their one
DataLoader construction.

A sample whose raw arrays or json are bad, or whose JPEG does not decode
(:mod:`pnfs.data.bad_samples`), is replaced by the next good sample of the rank's epoch
stream after its batch (:meth:`EpochPlan.spares`, wrapping round), with the bad slot's
augmentation: batch shapes and the per-rank batch count stay the plan's, so ranks stay in
step whichever of them meets bad data, and a resumed epoch replaces exactly as the
uninterrupted one. ``on_error="raise"`` raises :class:`BadSampleError` instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from pnfs.data.bad_samples import (
    BAD_ARRAYS,
    BAD_JPEG,
    BAD_JSON,
    BadSample,
    BadSampleError,
    array_problem,
)
from pnfs.data.loaders.assemble import batch_geometry
from pnfs.data.plan import EpochPlan
from pnfs.data.shards.reader import META_EXTS, SampleMeta, ShardSet, parse_meta

SAMPLE_EXTS = ("jpg", "json", *META_EXTS)


@dataclass
class CheckedBatch:
    """Batch b after the policy: N (shard, sample) pairs, their blobs, metadata and geometry.

    crop_to_input / input_to_image: [N, 2, 3]; keypoints: [N, K, 3] input px + weight;
    decoded: what ``decode`` gave per sample (None when no decode was asked for); bad: the
    samples replaced, in the order met."""

    pairs: list[tuple[int, int]]
    blobs: list[dict[str, bytes]]
    meta: SampleMeta
    crop_to_input: np.ndarray
    input_to_image: np.ndarray
    keypoints: np.ndarray
    decoded: list | None
    bad: list[BadSample]


def json_problem(data: bytes) -> str | None:
    """What is wrong with a sample's json member (not UTF-8 json, not an object), or None."""
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        return f"json does not parse: {e}"
    return None if isinstance(meta, dict) else f"json is a {type(meta).__name__}, not an object"


class PlanReader(torch.utils.data.Dataset):
    """Map-style over the batches of an :class:`EpochPlan`; :meth:`checked` reads batch b."""

    def __init__(
        self,
        shards: ShardSet,
        plan: EpochPlan,
        input_size: tuple[int, int],
        margin: float,
        flip_perm: list[int],
        on_error: str = "skip",
    ):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"data.on_error must be 'skip' or 'raise', got {on_error!r}")
        self.shards, self.plan, self.on_error = shards, plan, on_error
        self.input_size, self.margin, self.flip_perm = (input_size[0], input_size[1]), margin, flip_perm

    def __len__(self) -> int:
        return len(self.plan)

    def _bad(self, reason: str, shard: int, pos: int, error: str) -> BadSample:
        bad = BadSample(reason, self.shards.urls[shard], self.shards.key(shard, pos), error)
        if self.on_error == "raise":
            raise BadSampleError(f"{bad} (data.on_error=raise; skip drops such samples)")
        return bad

    @staticmethod
    def _next_spare(spares: Iterator[tuple[int, int]]) -> tuple[int, int]:
        try:
            return next(spares)
        except StopIteration:
            raise BadSampleError("every sample of this rank's epoch is bad") from None

    def _sound(
        self, pair: tuple[int, int], spares: Iterator[tuple[int, int]], bad: list[BadSample]
    ) -> tuple[tuple[int, int], dict[str, bytes]]:
        """(pair, its blobs) of ``pair``, or of the next spare whose arrays, json and jpg are there."""
        num_joints = len(self.flip_perm)
        while True:
            s, p = pair
            blobs = self.shards.read_present(s, p, SAMPLE_EXTS)
            problem = array_problem(blobs, num_joints) or (None if "jpg" in blobs else "no jpg")
            if problem is not None:
                bad.append(self._bad(BAD_ARRAYS, s, p, problem))
            elif (problem := json_problem(blobs["json"]) if "json" in blobs else "no json") is not None:
                bad.append(self._bad(BAD_JSON, s, p, problem))
            else:
                return pair, blobs
            pair = self._next_spare(spares)

    def checked(self, b: int, decode: Callable[[bytes, np.ndarray], object] | None = None) -> CheckedBatch:
        """Batch b with bad samples replaced; ``decode(jpg, crop_to_input [2, 3])`` decodes one
        crop and raises ValueError for a bad JPEG (that sample is replaced too)."""
        bad: list[BadSample] = []
        spares = self.plan.spares(b)
        sound = [self._sound((int(pair[0]), int(pair[1])), spares, bad) for pair in self.plan.batches[b]]
        pairs, blobs = [p for p, _ in sound], [x for _, x in sound]
        aug = self.plan.augment[b]
        decoded: list | None = None if decode is None else [None] * len(blobs)
        todo = list(range(len(blobs))) if decode is not None else []
        while True:  # geometry is per sample: a replaced slot leaves the others' unchanged
            meta = parse_meta(blobs)
            crop_to_input, input_to_image, keypoints = batch_geometry(
                meta, aug, self.input_size, self.margin, self.flip_perm
            )
            failed = []
            for i in todo:
                assert decode is not None and decoded is not None  # todo is empty without decode
                try:
                    decoded[i] = decode(blobs[i]["jpg"], crop_to_input[i])
                except ValueError as e:
                    bad.append(self._bad(BAD_JPEG, *pairs[i], str(e)))
                    pairs[i], blobs[i] = self._sound(self._next_spare(spares), spares, bad)
                    failed.append(i)
            if not failed:
                return CheckedBatch(
                    pairs, blobs, meta, crop_to_input, input_to_image, keypoints, decoded, bad
                )
            todo = failed


def worker_init(_: int) -> None:
    """DataLoader ``worker_init_fn``: one intra-op thread per worker (torch and OpenCV)."""
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


def plan_dataloader(
    dataset: torch.utils.data.Dataset,
    num_workers: int,
    pin_memory: bool,
    collate_fn: Callable | None = None,
) -> torch.utils.data.DataLoader:
    """The DataLoader of both loaders: item b = dataset[b] (``batch_size=None``), in order
    (batch b from worker b mod W), prefetching 4 items per worker."""
    if num_workers > 0:
        fork_safe_opencv()
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=worker_init if num_workers > 0 else None,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
        collate_fn=collate_fn,  # None: DataLoader's default_convert (batch_size=None)
    )
