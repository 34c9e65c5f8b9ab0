"""Person boxes on full images -> PoseBatch: detector boxes for evaluation, any box for prediction.

The shards of ``data_prep/shard_coco.py`` (with or without ``--detections``) are the fast
path; this one reads the original images and needs no shards: ``launch/evaluate.py
--detections D.json --images DIR`` and ``launch/predict.py`` use it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pnfs.data.batch import PoseBatch
from pnfs.inference import person_inputs
from pnfs.visualize import read_rgb


def image_files(annotations: str | Path) -> dict[int, str]:
    """image id -> file name, from a COCO annotation json."""
    path = Path(annotations)
    try:
        data = json.loads(path.read_text())
        return {int(im["id"]): str(im["file_name"]) for im in data["images"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: cannot read the image table: {err!r}") from None


class BoxLoader:
    """Iterable of PoseBatch over person boxes on original images, sharded by box index.

    boxes: dicts with image_id, bbox [x, y, w, h], score; box i is ``ann_id`` i; this rank
    takes boxes i with i % world_size == rank, grouped per image, ``batch_size`` at a time.
    """

    def __init__(
        self,
        boxes: list[dict],
        files: dict[int, str],
        image_dir: str | Path,
        input_size: tuple[int, int],
        batch_size: int,
        num_joints: int,
        margin: float = 1.25,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.image_dir = Path(image_dir)
        missing = sorted({b["image_id"] for b in boxes} - set(files))
        if missing:
            raise ValueError(f"boxes name image ids that the annotations do not list: {missing[:10]}")
        mine = [i for i in range(len(boxes)) if i % world_size == rank]
        self.items = sorted(mine, key=lambda i: (boxes[i]["image_id"], i))
        self.boxes, self.files = boxes, files
        self.input_size, self.batch_size, self.margin = input_size, batch_size, margin
        self.num_joints = num_joints

    def __len__(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def __iter__(self) -> Iterator[PoseBatch]:
        cache: tuple[int, np.ndarray] | None = None
        for start in range(0, len(self.items), self.batch_size):
            chunk = self.items[start : start + self.batch_size]
            images, affines = [], []
            for i in chunk:
                image_id = self.boxes[i]["image_id"]
                if cache is None or cache[0] != image_id:
                    cache = (image_id, read_rgb(self.image_dir / self.files[image_id]))
                x, a = person_inputs(
                    cache[1], np.asarray([self.boxes[i]["bbox"]]), self.input_size, self.margin
                )
                images.append(x)
                affines.append(a)
            n = len(chunk)
            yield PoseBatch(
                image=torch.cat(images),
                keypoints=torch.zeros(n, self.num_joints, 3),  # unknown: nothing labelled
                affine=torch.cat(affines),
                image_id=torch.tensor([self.boxes[i]["image_id"] for i in chunk], dtype=torch.int64),
                ann_id=torch.tensor(chunk, dtype=torch.int64),
                score=torch.tensor([self.boxes[i]["score"] for i in chunk], dtype=torch.float32),
            )
