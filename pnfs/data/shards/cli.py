"""Shared command line of ``data_prep/shard_coco.py`` and ``data_prep/shard_mpii.py``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from pnfs.data.annotations.records import PersonRecord, SkipReport
from pnfs.data.shards.writer import ShardOptions, StaleShardsError, verify_shards, write_shards

EXIT_BAD_INPUT = 2


def common_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--images", required=True, help="folder holding the images")
    p.add_argument("--annotations", required=True, help="annotation json")
    p.add_argument("--out", required=True, help="output folder for <split>-%%06d.tar + manifest.json")
    p.add_argument("--split", default=None, help="split name (default: train/val from the annotation name)")
    p.add_argument("--shard-size", type=int, default=512, help="samples per shard (default 512)")
    p.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    p.add_argument("--max-side", type=int, default=768, help="longest crop side in px (0: never downscale)")
    p.add_argument("--margin", type=float, default=1.25, help="box margin the crops must cover")
    p.add_argument("--max-scale", type=float, default=1.3, help="largest augmentation scale to cover")
    p.add_argument(
        "--aspect-range",
        type=float,
        nargs=2,
        default=[0.75, 1.0],
        metavar=("LO", "HI"),
        help="input width/height ratios the crops must cover (default 0.75 1.0: 256x192 .. square)",
    )
    p.add_argument("--quality", type=int, default=94, help="JPEG quality of the crops (4:4:4 chroma)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace shards of the split in --out that were written from other annotations, records "
        "or options (without it such a folder is refused, exit 2); shards written from the same inputs "
        "are always reused, so an interrupted run resumes",
    )
    p.add_argument("--verify", action="store_true", help="re-read every shard after writing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def infer_split(annotation_file: str) -> str:
    """ "train" / "val" from the annotation file name (valid -> val), else "data"."""
    name = Path(annotation_file).name.lower()
    if "train" in name:
        return "train"
    if "val" in name:
        return "val"
    return "data"


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def run(
    args: argparse.Namespace,
    joint_set: str,
    read: Callable[[SkipReport, SkipReport], tuple[list[PersonRecord], int]],
    clip_box: bool,
    argv: list[str],
) -> int:
    """Check paths (exit 2 naming a missing one), read records, write shards, verify."""
    if not Path(args.annotations).is_file():
        fail(f"annotation file not found: {args.annotations}")
    if not Path(args.images).is_dir():
        fail(f"image folder not found: {args.images}")
    if not 1 <= args.quality <= 100:
        fail(f"--quality must be in 1..100, got {args.quality}")
    if not 0 < args.aspect_range[0] <= args.aspect_range[1]:
        fail(f"--aspect-range must be 0 < LO <= HI, got {args.aspect_range}")
    if args.shard_size < 1:
        fail(f"--shard-size must be >= 1, got {args.shard_size}")
    skipped, filtered = SkipReport(), SkipReport()
    try:
        records, total = read(skipped, filtered)
    except (ValueError, OSError) as e:  # not json, not the expected layout
        fail(f"cannot read annotations {args.annotations}: {e}")
    opts = ShardOptions(
        out=Path(args.out),
        split=args.split or infer_split(args.annotations),
        joint_set=joint_set,
        shard_size=args.shard_size,
        max_side=args.max_side,
        margin=args.margin,
        max_scale=args.max_scale,
        aspect_range=(args.aspect_range[0], args.aspect_range[1]),
        clip_box=clip_box,
        quality=args.quality,
    )
    try:
        entry = write_shards(
            records,
            Path(args.images),
            opts,
            skipped,
            filtered,
            workers=args.workers,
            command=argv,
            annotations_total=total,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except StaleShardsError as e:
        fail(str(e))
    c = entry["counts"]
    print(
        f"{opts.split}: {c['samples']} samples in {len(entry['shards'])} shards -> {opts.out} "
        f"({c['skipped']} skipped, {c['filtered']} filtered)"
    )
    for reason, info in entry["skipped"].items():
        print(f"  skipped {reason}: {info['count']} (first: {', '.join(info['first_ids'][:3])})")
    if args.verify:
        problems = verify_shards(opts.out, opts.split)
        for p in problems:
            print(f"verify: {p}", file=sys.stderr)
        if problems:
            return 1
        print(f"verify: {len(entry['shards'])} shards OK")
    return 0
