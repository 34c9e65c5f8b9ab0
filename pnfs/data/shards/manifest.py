"""Shards against the ``manifest.json`` written beside them (docs/data.md).

Two checks, both on local shards only (a remote manifest is not fetched for them):

* :func:`check_manifest`: sample counts and byte sizes always, sha256 when asked
  (``data.verify_shards``); the problems come back as lines naming the shard and the manifest.
* :func:`check_coverage`: a warning when the augmentation (``data.scale_range``, the aspect of
  ``data.input_size``) can reach beyond what the shards' crops hold (black borders).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from pnfs.data.shards.reader import is_url, read_index


def check_coverage(paths: list[str], *, scale_range, input_size) -> None:
    """Warn when the augmentation can reach beyond what the shards' crops hold (black borders).

    scale_range: ``data.scale_range`` (lo, hi); input_size: ``data.input_size`` (h, w). The
    manifest's ``options`` for the split hold the ``max_scale`` and ``aspect_range`` the crops
    were cut for (``data_prep/shard_coco.py --max-scale / --aspect-range``).
    """
    if is_url(paths[0]):
        return  # a remote manifest is not fetched just for this warning
    manifest = Path(paths[0]).parent / "manifest.json"
    if not manifest.exists():
        return
    try:
        splits = json.loads(manifest.read_text()).get("splits", {})
    except (OSError, ValueError):
        return
    name = Path(paths[0]).name.rsplit("-", 1)[0]
    opts = splits.get(name, {}).get("options", {})
    h, w = input_size
    lo, hi = opts.get("aspect_range", [0.0, float("inf")])
    if scale_range[1] > opts.get("max_scale", float("inf")) + 1e-9 or not lo - 1e-9 <= w / h <= hi + 1e-9:
        warnings.warn(
            f"{manifest}: crops cover scale <= {opts.get('max_scale')} and input aspect {lo}..{hi}, but "
            f"data.scale_range={scale_range}, data.input_size={input_size}: parts of the input will be "
            "black; re-shard with --max-scale / --aspect-range",
            stacklevel=3,
        )


def check_manifest(paths: list[str], verify: bool) -> list[str]:
    """Problems of local shards against the ``manifest.json`` beside them: sample counts and
    sizes always (``bytes``, in manifests written since it was added), sha256 when ``verify``.
    URLs are not checked (their manifest is not fetched)."""
    from pnfs.data.shards.writer import sha256_file  # the writer pulls in cv2 and simplejpeg

    problems = []
    for folder in dict.fromkeys(Path(p).parent for p in paths if not is_url(p)):
        manifest = folder / "manifest.json"
        try:
            splits = json.loads(manifest.read_text()).get("splits", {})
        except (OSError, ValueError):
            continue
        listed = {e["file"]: e for split in splits.values() for e in split.get("shards", [])}
        for path in (Path(p) for p in paths if not is_url(p) and Path(p).parent == folder):
            entry = listed.get(path.name)
            if entry is None:
                continue
            size = path.stat().st_size
            if "bytes" in entry and entry["bytes"] != size:
                problems.append(f"{path}: {size} bytes, {manifest} lists {entry['bytes']}")
            elif "samples" in entry and len(read_index(path)) != entry["samples"]:
                problems.append(
                    f"{path}: {len(read_index(path))} samples, {manifest} lists {entry['samples']}"
                )
            if verify and "sha256" in entry and sha256_file(path) != entry["sha256"]:
                problems.append(f"{path}: sha256 differs from {manifest}")
    return problems
