"""Shared helpers of the engine tests: a tiny synthetic shard set, a tiny model config, the
workers' environment and the parser of their final digest lines (checked by
tests/support/test_engine.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable

# a few thousand parameters and 64x64 inputs: every test trains in seconds on one core
TINY_OVERRIDES = [
    "data.dataset=coco",
    "data.input_size=[64,64]",
    "data.num_workers=0",
    "model.backbone.name=fabric",
    "model.backbone.fabric_channels=2",
    "model.backbone.fabric_layers=3",
    "model.channels=2",
    "model.vector_dim=2",
    "train.batch_size=4",
    "train.log_every=1",
    "train.deterministic=true",
    "train.eval_every=0",
    "eval.batch_size=8",
]

# Each field spelled out (no ".*"): a greedy gap would run on into a second rank's line that
# shares the same output line, take that rank's digest and hide its line from the set of ranks.
DIGEST = re.compile(
    r"\[rank (\d+)\] (finished|stopped): global_step=(\d+) epoch=\d+ weights_sha256=([0-9a-f]{64})"
)


def make_tiny_dataset(root: Path, train: int = 48, val: int = 12, shard_size: int = 8, seed: int = 3) -> dict:
    """make_synthetic + shard_coco into ``root``; returns the data.* overrides that point at it."""
    raw, shards = root / "raw", root / "shards"
    run = dict(check=True, capture_output=True, text=True, cwd=REPO)
    subprocess.run(
        [
            PY,
            "data_prep/make_synthetic.py",
            "--out",
            str(raw),
            "--train",
            str(train),
            "--val",
            str(val),
            "--seed",
            str(seed),
        ],
        **run,
    )
    for split in ("train", "val"):
        subprocess.run(
            [
                PY,
                "data_prep/shard_coco.py",
                "--images",
                str(raw / "images" / split),
                "--annotations",
                str(raw / "annotations" / f"person_keypoints_{split}.json"),
                "--out",
                str(shards / split),
                "--split",
                split,
                "--shard-size",
                str(shard_size),
                "--workers",
                "1",
                "--no-progress",
            ],
            **run,
        )
    return {
        "overrides": [
            f"data.train_shards={shards / 'train'}",
            f"data.val_shards={shards / 'val'}",
            f"data.val_annotations={raw / 'annotations' / 'person_keypoints_val.json'}",
        ],
        "raw": raw,
        "shards": shards,
    }


def worker_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONHASHSEED="0", **extra)
    return env


def digests(output: str) -> dict[int, tuple[str, int, str]]:
    """rank -> (finished|stopped, global_step, sha256) from the workers' final lines."""
    return {int(m.group(1)): (m.group(2), int(m.group(3)), m.group(4)) for m in DIGEST.finditer(output)}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_dataset(tmp_path_factory) -> dict:
    """The tiny data set, built once per pytest session (the first caller builds it)."""
    root = tmp_path_factory.getbasetemp() / "engine-tiny-data"
    done = root / "done"
    if not done.exists():
        info = make_tiny_dataset(root)
        done.write_text("ok")
        return info
    shards = root / "shards"
    raw = root / "raw"
    return {
        "overrides": [
            f"data.train_shards={shards / 'train'}",
            f"data.val_shards={shards / 'val'}",
            f"data.val_annotations={raw / 'annotations' / 'person_keypoints_val.json'}",
        ],
        "raw": raw,
        "shards": shards,
    }
