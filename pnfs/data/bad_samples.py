"""Bad samples at training time: what is wrong with one, and the report of an epoch's.

``data.on_error=skip`` (default) drops a bad sample, names it (shard URL, sample key, reason)
and counts it; ``raise`` stops at the first with :class:`BadSampleError`. A run with more
than ``data.max_bad_samples`` bad samples stops with :class:`BadSampleError` too: silent rot
of a large part of a shard set is not something to train through.

Reasons (one test each in ``tests/data/test_bad_samples.py``):

* ``bad_jpeg``: the crop does not decode (garbled or cut bytes);
* ``bad_arrays``: a raw array (``kp.f32``, ``bbox.f32``, ``c2i.f32``, ``score.f32``,
  ``ids.i64``) is missing, has the wrong size or holds NaN/inf;
* ``bad_json``: the ``json`` member is missing, does not parse or is not an object;
* ``truncated_shard``: the shard ends inside one of the sample's members (found when the
  shard is opened: its members' spans are checked against the file size).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np

BAD_JPEG = "bad_jpeg"
BAD_ARRAYS = "bad_arrays"
BAD_JSON = "bad_json"
TRUNCATED_SHARD = "truncated_shard"


@dataclass(frozen=True)
class BadSample:
    """One dropped sample: ``reason`` (above), the shard's URL, the sample key, the error text."""

    reason: str
    shard: str
    key: str
    error: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.shard} sample {self.key}: {self.error}"


class BadSampleError(RuntimeError):
    """A bad sample under ``data.on_error=raise``, or more than ``data.max_bad_samples``."""


def array_problem(blobs: dict[str, bytes], num_joints: int) -> str | None:
    """What is wrong with a sample's raw arrays, or None (sizes and finite values)."""
    sizes = {"kp.f32": 12 * num_joints, "bbox.f32": 16, "c2i.f32": 24, "score.f32": 4, "ids.i64": 16}
    for ext, size in sizes.items():
        if ext not in blobs:
            return f"no {ext}"
        if len(blobs[ext]) != size:
            return f"{ext} has {len(blobs[ext])} bytes, expected {size}"
    for ext in ("kp.f32", "bbox.f32", "c2i.f32", "score.f32"):
        if not np.isfinite(np.frombuffer(blobs[ext], "<f4")).all():
            return f"{ext} holds NaN or inf"
    return None


def default_limit(epoch_samples: int) -> int:
    """0.1% of an epoch's samples, at least 1: the default ``data.max_bad_samples``."""
    return max(1, math.ceil(0.001 * epoch_samples))


@dataclass
class BadSampleReport:
    """Bad samples seen by one loader: counts per reason and every sample named (up to ``keep``)."""

    limit: int
    samples: list[BadSample] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    keep: int = 100

    def met(self, samples: list[BadSample]) -> None:
        """Log (``pnfs.train``, warning) and :meth:`add` each bad sample a batch replaced."""
        for bad in samples:
            logging.getLogger("pnfs.train").warning("bad sample dropped: %s", bad)
            self.add(bad)

    def add(self, bad: BadSample) -> None:
        self.counts[bad.reason] = self.counts.get(bad.reason, 0) + 1
        if len(self.samples) < self.keep:
            self.samples.append(bad)
        if self.total > self.limit:
            raise BadSampleError(
                f"{self.total} bad samples, more than data.max_bad_samples={self.limit} "
                f"({self.counts}); the latest: {bad}"
            )

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        """``{"total", "counts": {reason: n}, "samples": [{reason, shard, key, error}]}``."""
        return {
            "total": self.total,
            "counts": dict(self.counts),
            "samples": [asdict(s) for s in self.samples],
        }


def merge_rank_reports(reports: list[dict | None]) -> dict:
    """One report (:meth:`BadSampleReport.to_dict` layout) of every rank's epoch.

    A truncated shard is seen by every rank (each opens all shards), so its samples count
    once; a bad JPEG or array is met by the one rank that reads it, so those counts add up.
    """
    counts: dict[str, int] = {}
    samples: list[dict] = []
    seen: set[tuple[str, str, str]] = set()
    for report in (r for r in reports if r):
        for reason, n in report["counts"].items():
            counts[reason] = (
                max(counts.get(reason, 0), n) if reason == TRUNCATED_SHARD else counts.get(reason, 0) + n
            )
        for s in report["samples"]:
            ident = (s["reason"], s["shard"], s["key"])
            if ident not in seen:
                seen.add(ident)
                samples.append(s)
    return {"total": sum(counts.values()), "counts": counts, "samples": samples}
