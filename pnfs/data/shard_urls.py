"""Shards named by URL: ``http(s)://``, ``gs://``, ``pipe:<command>`` and local paths alike.

Every URL ``webdataset.gopen`` opens is read once per node into a local cache folder
(``data.cache_dir``; without one, a temporary folder of this process that lives until it
exits), and the loaders then read the cached copy by index exactly as they read a local
shard. Index access over a local copy keeps everything :mod:`pnfs.data.plan` guarantees
(the order is a pure function of (seed, epoch) and the shard list, equal batch counts, val
reads each sample once, ``start_sample`` resumes exactly), and the same bytes give
bitwise-identical batches whether a shard came from a disk or a server.

Object stores go through a ``pipe:`` command that writes the shard to stdout, e.g.
``pipe:aws s3 cp s3://bucket/coco/train-000000.tar -`` or ``pipe:gsutil cat gs://bucket/coco/train-000000.tar``
(webdataset opens ``gs://`` URLs with ``gsutil cat`` itself, and ``http(s)://`` with curl).
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from webdataset import gopen

from pnfs.data.sharding import write_index


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
    tail = url.rstrip("/").rsplit("/", 1)[-1].split()[-1] or "shard"
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
