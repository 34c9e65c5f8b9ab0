"""Reading shards: finding them, fetching URLs, their tar index and samples by index.

A shard is a WebDataset tar written by :mod:`pnfs.data.shards.writer`, with its DALI index
(``.idx``, wds2idx v1.2) beside it; without an index the tar's headers are scanned once.
Samples are read by (shard, position) with one ``pread`` at the index's offsets: no full-tar
scans on the hot path.

Shards named by URL (``http(s)://``, ``gs://``, ``pipe:<command>``) are read once per node
through ``webdataset.gopen`` into a local cache folder (``data.cache_dir``; without one, a
temporary folder of this process that lives until it exits), indexed there, and then read
exactly as a local shard. Index access over a local copy keeps everything
:mod:`pnfs.data.plan` guarantees (the order is a pure function of (seed, epoch) and the shard
list, equal batch counts, val reads each sample once, ``start_sample`` resumes exactly), and
the same bytes give bitwise-identical batches whether a shard came from a disk or a server.

Object stores go through a ``pipe:`` command that writes the shard to stdout, e.g.
``pipe:aws s3 cp s3://bucket/coco/train-000000.tar -`` or ``pipe:gsutil cat gs://bucket/coco/train-000000.tar``
(webdataset opens ``gs://`` URLs with ``gsutil cat`` itself, and ``http(s)://`` with curl).
"""

from __future__ import annotations

import atexit
import fcntl
import glob
import hashlib
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from webdataset import gopen

from pnfs.data.bad_samples import TRUNCATED_SHARD, BadSample


def is_url(spec: str) -> bool:
    """True for what needs ``webdataset.gopen`` (``scheme://...`` or ``pipe:...``), not a path."""
    spec = str(spec)
    return spec.startswith("pipe:") or ("://" in spec and not spec.startswith("file://"))


def expand_urls(spec: str) -> list[str]:
    """The URLs of a brace pattern (``http://h/train-{000000..000003}.tar``), in the given order."""
    from braceexpand import braceexpand

    return list(braceexpand(spec))


_PROCESS_CACHE: list[str] = []


def _process_cache() -> Path:
    """A temporary folder for this process's copies, removed when the process exits."""
    if not _PROCESS_CACHE:
        folder = tempfile.mkdtemp(prefix="pnfs-shards-")
        atexit.register(shutil.rmtree, folder, True)
        _PROCESS_CACHE.append(folder)
    return Path(_PROCESS_CACHE[0])


def cached_name(url: str) -> str:
    """``<sha1(url)[:16]>-<last path part>``: distinct URLs never share a cache file."""
    words = url.rstrip("/").rsplit("/", 1)[-1].split()  # a pipe command's last word
    tail = words[-1] if words else "shard"
    tail = tail if tail.endswith(".tar") else tail + ".tar"
    return f"{hashlib.sha1(url.encode()).hexdigest()[:16]}-{tail}"


def local_copy(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local path of shard ``url``: itself when it is a path, else a cached copy.

    The download streams through ``webdataset.gopen`` into a temporary file beside the cache
    entry, its DALI index is written beside it (``.idx``), and the tar is renamed into place
    only when complete, under an exclusive lock on
    ``<entry>.lock``, so ranks of one node that share ``cache_dir`` download a shard once and
    never read a partial copy.
    """
    if not is_url(url):
        return Path(str(url).removeprefix("file://"))
    folder = Path(cache_dir) if cache_dir else _process_cache()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / cached_name(url)
    if target.exists():
        return target
    with open(folder / (target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        partial = folder / f".{target.name}.{os.getpid()}.part"
        try:
            with gopen(url, "rb") as stream, open(partial, "wb") as out:
                shutil.copyfileobj(stream, out, 1 << 20)
        except Exception as e:
            partial.unlink(missing_ok=True)
            raise OSError(f"cannot read shard {url}: {e}") from e
        if partial.stat().st_size == 0:
            partial.unlink()
            raise OSError(f"cannot read shard {url}: it gave no bytes")
        write_index(partial, target.with_suffix(".idx"))
        os.replace(partial, target)
    return target


def read_index(tar_path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {ext: (offset, size)})] of a shard, from its ``.idx`` or by scanning the tar."""
    idx = tar_path.with_suffix(".idx")
    if idx.exists():
        lines = idx.read_text().splitlines()
        out = []
        for n, line in enumerate(lines[1:], start=2):
            parts = line.split()
            if not parts or len(parts) % 4:
                raise ValueError(f"{idx}: line {n}: expected groups of 'ext offset size name', got {line!r}")
            comps = {}
            for i in range(0, len(parts), 4):
                ext, off, size, name = parts[i : i + 4]
                comps[ext] = (int(off), int(size))
            out.append((name[: name.find(".")], comps))
        return out
    return scan_tar(tar_path)


def scan_tar(tar_path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {ext: (offset, size)})] from the tar's headers, in file order.

    A tar cut inside a member's data (a truncated download) ends the scan at that member, which
    is listed with its full size: :func:`whole_samples` then cuts it by the file's size, as it
    does for a shard with an index."""
    out: list[tuple[str, dict[str, tuple[int, int]]]] = []
    with tarfile.open(tar_path) as tar:
        try:
            for member in tar:
                if not member.isfile():
                    continue
                dot = member.name.find(".", member.name.rfind("/") + 1)
                key, ext = member.name[:dot], member.name[dot + 1 :]
                if not out or out[-1][0] != key:
                    out.append((key, {}))
                out[-1][1][ext] = (member.offset_data, member.size)
        except tarfile.ReadError as err:
            if "unexpected end of data" not in str(err):  # only the file ending inside a member
                raise
    return out


def write_index(tar_path: Path, index_path: Path) -> int:
    """Write the DALI (wds2idx v1.2) index of a tar; returns its sample count."""
    entries = scan_tar(tar_path)
    lines = [f"v1.2 {len(entries)}"]
    for key, comps in entries:
        lines.append(" ".join(f"{ext} {off} {size} {key}.{ext}" for ext, (off, size) in comps.items()))
    index_path.write_text("\n".join(lines) + "\n")
    return len(entries)


def expand_shards(spec: str | os.PathLike | list, split: str | None = None) -> list[str]:
    """Shards of a brace pattern (``train-{000000..000009}.tar``), a glob, a folder (its
    ``<split>-*.tar``, or every tar), a URL pattern (``http://host/train-{000000..000009}.tar``,
    ``pipe:...``; see :mod:`pnfs.data.shards.reader`) or a list of those.

    Paths are sorted, must exist and be ``.tar`` files (a ``.idx`` index or a sidecar given by
    mistake is refused, naming it); a pattern that matches nothing is refused naming the
    pattern. URLs keep their pattern's order (a remote listing is not possible, so nothing is
    checked until a shard is read)."""
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
            raise FileNotFoundError(_nothing_matches(pattern))
        not_tar = [m for m in matches if not m.endswith(".tar")]
        if not_tar:
            raise ValueError(
                f"{not_tar[0]} is not a .tar shard (a shard's .idx index or a sidecar?): give the .tar "
                "files or their folder"
            )
        out.extend(matches)
    return sorted(dict.fromkeys(out))


def _nothing_matches(pattern: str) -> str:
    """Why a local shard path or pattern found nothing, naming it and its nearest folder."""
    wildcard = glob.has_magic(pattern)
    what = f"no file matches the pattern {pattern}" if wildcard else f"shard not found: {pattern}"
    folder = Path(pattern).parent
    while glob.has_magic(str(folder)):
        folder = folder.parent
    if not folder.is_dir():
        return f"{what} (the folder {folder} does not exist)"
    # shards of that name deeper down (data/demo/val-*.tar -> data/demo/shards-seed0/val/...)
    tars = sorted(folder.rglob(Path(pattern).name)) if glob.has_magic(Path(pattern).name) else []
    tars = tars or sorted(folder.rglob("*.tar"))
    if tars:
        shown = ", ".join(str(p.relative_to(folder)) for p in tars[:3]) + (", ..." if len(tars) > 3 else "")
        return f"{what} (under {folder}: {shown})"
    return f"{what} (no .tar under {folder})"


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
