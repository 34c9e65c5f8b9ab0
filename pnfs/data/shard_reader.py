"""Finding shards and reading samples out of them by index (no full-tar scans on the hot path).

A shard is a WebDataset tar written by :mod:`pnfs.data.sharding`, with its DALI index
(``.idx``) beside it; without an index the tar's headers are scanned once. Shards named by
URL are read from a local copy (:mod:`pnfs.data.shard_urls`).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pnfs.data.bad_samples import TRUNCATED_SHARD, BadSample
from pnfs.data.shard_urls import expand_urls, is_url, local_copy
from pnfs.data.sharding import read_index


def expand_shards(spec: str | os.PathLike | list, split: str | None = None) -> list[str]:
    """Shards of a brace pattern (``train-{000000..000009}.tar``), a glob, a folder (its
    ``<split>-*.tar``, or every tar), a URL pattern (``http://host/train-{000000..000009}.tar``,
    ``pipe:...``; see :mod:`pnfs.data.shard_urls`) or a list of those.

    Paths are sorted and must exist; URLs keep their pattern's order (a remote listing is not
    possible, so nothing is checked until a shard is read)."""
    if isinstance(spec, (list, tuple)):
        out: list[str] = []
        for s in spec:
            out.extend(expand_shards(s, split))
        return list(dict.fromkeys(out)) if any(is_url(u) for u in out) else sorted(dict.fromkeys(out))
    spec = str(spec)
    if not spec:
        raise ValueError("no shards given (data.train_shards / data.val_shards is empty)")
    if is_url(spec):
        return expand_urls(spec)
    path = Path(spec)
    if path.is_dir():
        found = sorted(glob.glob(str(path / f"{split}-*.tar"))) if split else []
        found = found or sorted(glob.glob(str(path / "*.tar")))
        if not found:
            raise FileNotFoundError(f"no .tar shards in folder {spec}")
        return found
    from braceexpand import braceexpand

    out = []
    for pattern in braceexpand(spec):
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"shard not found: {pattern}")
        out.extend(matches)
    return sorted(dict.fromkeys(out))


@dataclass
class SampleMeta:
    """The numbers of N samples (raw arrays of the shards).

    keypoints: [N, K, 3] crop px; bbox: [N, 4] original px; crop_to_image: [N, 2, 3];
    score: [N]; ids: [N, 2] (image_id, ann_id).
    """

    keypoints: np.ndarray
    bbox: np.ndarray
    crop_to_image: np.ndarray
    score: np.ndarray
    ids: np.ndarray


def whole_samples(
    index: list[tuple[str, dict[str, tuple[int, int]]]], file_size: int
) -> tuple[list[tuple[str, dict[str, tuple[int, int]]]], list[tuple[str, str]]]:
    """(the samples of ``index`` wholly inside a file of ``file_size`` bytes, [(key, why)] of the rest)."""
    kept, cut = [], []
    members = set(index[0][1]) if index else set()
    for i, (key, comps) in enumerate(index):
        past = [e for e, (o, n) in comps.items() if o + n > file_size]
        if past:
            o, n = comps[past[0]]
            cut.append(
                (
                    key,
                    f"the shard ends at byte {file_size}, inside member {key}.{past[0]} (bytes {o}..{o + n})",
                )
            )
        elif i == len(index) - 1 and len(index) > 1 and set(comps) < members:
            cut.append((key, f"the shard ends after members {sorted(comps)} of its last sample"))
        else:
            kept.append((key, comps))
    return kept, cut


@dataclass
class ShardSet:
    """Shard paths with their indexes; reads samples by (shard, position).

    ``paths`` are local files (cached copies for URLs), ``urls`` what the configuration named
    (the same as ``paths`` for local shards): messages name the URL."""

    paths: list[str]
    index: list[list[tuple[str, dict[str, tuple[int, int]]]]]
    urls: list[str] = field(default_factory=list)
    dropped: list[BadSample] = field(default_factory=list)  # truncated samples left out of ``index``
    _files: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.urls = list(self.urls) or list(self.paths)

    @staticmethod
    def open(urls: list[str], cache_dir: str | os.PathLike | None = None) -> ShardSet:
        """Index the shards ``urls`` (paths or URLs; URLs are copied into ``cache_dir`` first).

        Samples a truncated shard cuts (a member running past the end of the file, or the
        shard's last sample missing members the others have) are left out and listed in
        ``dropped``: every rank opens the same shards, so every rank plans the same samples."""
        paths = [str(local_copy(u, cache_dir)) for u in urls]
        index, dropped = [], []
        for url, path in zip(urls, paths):
            kept, cut = whole_samples(read_index(Path(path)), os.path.getsize(path))
            index.append(kept)
            dropped += [BadSample(TRUNCATED_SHARD, str(url), key, why) for key, why in cut]
        return ShardSet(paths, index, list(urls), dropped=dropped)

    @property
    def remote(self) -> bool:
        return self.urls != self.paths

    @property
    def counts(self) -> list[int]:
        return [len(ix) for ix in self.index]

    def __getstate__(self):  # file descriptors do not travel to worker processes
        return {"paths": self.paths, "index": self.index, "urls": self.urls, "dropped": self.dropped}

    def __setstate__(self, state):
        self.paths, self.index, self.urls, self._files = state["paths"], state["index"], state["urls"], {}
        self.dropped = state["dropped"]

    def _fd(self, shard: int) -> int:
        fd = self._files.get(shard)
        if fd is None:
            fd = self._files[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return fd

    def key(self, shard: int, pos: int) -> str:
        return self.index[shard][pos][0]

    def read(self, shard: int, pos: int, exts: tuple[str, ...]) -> dict[str, bytes]:
        """The components ``exts`` of one sample, read with a single pread."""
        key, comps = self.index[shard][pos]
        try:
            spans = [comps[e] for e in exts]
        except KeyError as e:
            raise KeyError(f"{self.urls[shard]}: sample {key} has no component {e}") from None
        lo = min(o for o, _ in spans)
        hi = max(o + s for o, s in spans)
        blob = os.pread(self._fd(shard), hi - lo, lo)
        return {e: blob[o - lo : o - lo + s] for e, (o, s) in zip(exts, spans)}

    def read_present(self, shard: int, pos: int, exts: tuple[str, ...]) -> dict[str, bytes]:
        """The components of ``exts`` the sample has (missing ones left out), one pread each."""
        comps = self.index[shard][pos][1]
        spans = {e: comps[e] for e in exts if e in comps}
        if not spans:
            return {}
        lo = min(o for o, _ in spans.values())
        hi = max(o + n for o, n in spans.values())
        blob = os.pread(self._fd(shard), hi - lo, lo)
        return {e: blob[o - lo : o - lo + n] for e, (o, n) in spans.items()}

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()


META_EXTS = ("kp.f32", "bbox.f32", "c2i.f32", "score.f32", "ids.i64")


def parse_meta(blobs: list[dict[str, bytes]]) -> SampleMeta:
    """Stack the raw little-endian arrays of N samples."""
    return SampleMeta(
        keypoints=np.stack([np.frombuffer(b["kp.f32"], "<f4").reshape(-1, 3) for b in blobs]).astype(
            np.float64
        ),
        bbox=np.stack([np.frombuffer(b["bbox.f32"], "<f4") for b in blobs]).astype(np.float64),
        crop_to_image=np.stack([np.frombuffer(b["c2i.f32"], "<f4").reshape(2, 3) for b in blobs]).astype(
            np.float64
        ),
        score=np.concatenate([np.frombuffer(b["score.f32"], "<f4") for b in blobs]),
        ids=np.stack([np.frombuffer(b["ids.i64"], "<i8") for b in blobs]),
    )
