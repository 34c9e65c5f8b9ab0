"""pnfs/evaluate/boxes.py: the image table of a COCO annotation file and the loader of person
boxes on original images (``launch/evaluate.py --detections --images``, ``launch/predict.py``).

Each batch is checked against :func:`pnfs.inference.person_inputs` called by hand on the image
the box names, so a box read from the wrong image, a shard that takes the wrong boxes or a
margin lost on the way shows up as different pixels or affines (issue 26, mutation section of
docs/testing.md)."""

from __future__ import annotations

import json
import re

import cv2
import numpy as np
import pytest
import torch

import pnfs.evaluate.boxes as boxes_module
from pnfs.evaluate.boxes import BoxLoader, image_files
from pnfs.inference import person_inputs

INPUT = (32, 24)  # (H, W)


def write_image(path, seed: int) -> np.ndarray:
    """A random RGB image [40, 50, 3] written losslessly; returns what read_rgb will give."""
    rgb = np.random.default_rng(seed).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return rgb


@pytest.fixture
def images(tmp_path):
    """Three different images; image id 7 is ``a.png``, 3 is ``b.png``, 5 is ``c.png``."""
    files = {7: "a.png", 3: "b.png", 5: "c.png"}
    pixels = {i: write_image(tmp_path / name, seed=i) for i, name in files.items()}
    return tmp_path, files, pixels


# box i is ann_id i; image ids deliberately out of order and interleaved
BOXES = [
    {"image_id": 7, "bbox": [5.0, 4.0, 20.0, 30.0], "score": 0.9},
    {"image_id": 3, "bbox": [10.0, 2.0, 12.0, 16.0], "score": 0.8},
    {"image_id": 7, "bbox": [0.0, 0.0, 50.0, 40.0], "score": 0.7},
    {"image_id": 5, "bbox": [30.0, 10.0, 15.0, 25.0], "score": 0.6},
    {"image_id": 3, "bbox": [1.0, 1.0, 8.0, 8.0], "score": 0.5},
]


def expected(pixels, index: int, margin: float = 1.25) -> tuple[torch.Tensor, torch.Tensor]:
    box = BOXES[index]
    return person_inputs(pixels[box["image_id"]], np.asarray([box["bbox"]]), INPUT, margin)


def test_image_files_maps_int_ids_to_file_names(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": [{"id": "12", "file_name": "x.jpg"}, {"id": 4, "file_name": 9}]}))
    table = image_files(path)
    assert table == {12: "x.jpg", 4: "9"}
    assert all(type(k) is int and type(v) is str for k, v in table.items())
    assert image_files(str(path)) == table  # a str path as well as a Path


@pytest.mark.parametrize(
    "text, why",
    [
        (None, "FileNotFoundError"),
        ("{not json", "JSONDecodeError"),
        (json.dumps({"annotations": []}), "KeyError"),
        (json.dumps({"images": [7]}), "TypeError"),
    ],
)
def test_image_files_names_the_file_that_cannot_be_read(tmp_path, text, why):
    path = tmp_path / "ann.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: cannot read the image table: {why}\("):
        image_files(path)


def test_boxes_on_images_the_annotations_do_not_list_are_refused(images):
    folder, files, _ = images
    boxes = [{"image_id": i, "bbox": [0, 0, 4, 4], "score": 1.0} for i in [7, *range(100, 112)]]
    with pytest.raises(
        ValueError, match=r"do not list: \[100, 101, 102, 103, 104, 105, 106, 107, 108, 109\]$"
    ):
        BoxLoader(boxes, files, folder, INPUT, batch_size=2, num_joints=4)


def test_every_box_is_cropped_from_its_own_image_grouped_by_image(images, monkeypatch):
    folder, files, pixels = images
    reads: list[str] = []
    real_read = boxes_module.read_rgb

    def counting_read(path):
        reads.append(path.name)
        return real_read(path)

    monkeypatch.setattr(boxes_module, "read_rgb", counting_read)
    loader = BoxLoader(BOXES, files, str(folder), INPUT, batch_size=2, num_joints=4)
    assert loader.image_dir == folder
    # sorted by (image id, box index): 3 -> boxes 1, 4; 5 -> box 3; 7 -> boxes 0, 2
    order = [1, 4, 3, 0, 2]
    assert loader.items == order
    batches = list(loader)
    assert len(loader) == len(batches) == 3  # 5 boxes, 2 a batch: the last batch has one
    assert [b.image.shape[0] for b in batches] == [2, 2, 1]
    assert reads == ["b.png", "c.png", "a.png"]  # one read per image: the loader keeps the last
    for batch, chunk in zip(batches, [order[0:2], order[2:4], order[4:]]):
        n = len(chunk)
        assert torch.equal(batch.ann_id, torch.tensor(chunk)) and batch.ann_id.dtype == torch.int64
        ids = [BOXES[i]["image_id"] for i in chunk]
        assert torch.equal(batch.image_id, torch.tensor(ids)) and batch.image_id.dtype == torch.int64
        assert batch.score.dtype == torch.float32
        assert torch.equal(batch.score, torch.tensor([BOXES[i]["score"] for i in chunk], dtype=torch.float32))
        assert torch.equal(batch.keypoints, torch.zeros(n, 4, 3))  # nothing labelled
        for row, i in enumerate(chunk):
            want_image, want_affine = expected(pixels, i)
            assert torch.equal(batch.image[row], want_image[0])
            assert torch.equal(batch.affine[row], want_affine[0])


def test_the_margin_reaches_the_crop(images):
    folder, files, pixels = images
    loader = BoxLoader(BOXES[:1], files, folder, INPUT, batch_size=4, num_joints=2, margin=2.0)
    (batch,) = list(loader)
    want_image, want_affine = expected(pixels, 0, margin=2.0)
    assert torch.equal(batch.affine, want_affine) and torch.equal(batch.image, want_image)
    assert not torch.equal(batch.affine, expected(pixels, 0)[1])  # 2.0 differs from the default


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_take_every_world_size_th_box_and_together_all_of_them(images, world_size):
    folder, files, _ = images
    seen: list[int] = []
    for rank in range(world_size):
        loader = BoxLoader(
            BOXES, files, folder, INPUT, batch_size=1, num_joints=2, rank=rank, world_size=world_size
        )
        mine = [int(b.ann_id) for b in loader]
        assert sorted(mine) == list(range(rank, len(BOXES), world_size))
        assert len(loader) == len(mine)
        seen += mine
    assert sorted(seen) == list(range(len(BOXES)))


@pytest.mark.parametrize("batch_size, batches", [(1, 5), (4, 2), (5, 1), (6, 1)])
def test_the_length_is_the_number_of_batches_rounded_up(images, batch_size, batches):
    folder, files, _ = images
    loader = BoxLoader(BOXES, files, folder, INPUT, batch_size=batch_size, num_joints=2)
    assert len(loader) == batches == len(list(loader))


def test_ids_written_as_floats_and_integer_scores_keep_the_batch_dtypes(images):
    """A hand-written or third-party boxes file may say ``"image_id": 3.0`` or ``"score": 1``:
    ids stay int64 (they are matched against the annotations), scores float32."""
    folder, files, _ = images
    boxes = [
        {"image_id": 3.0, "bbox": [1, 1, 8, 8], "score": 1},
        {"image_id": 5.0, "bbox": [2, 2, 9, 9], "score": 0},
    ]
    (batch,) = list(BoxLoader(boxes, files, folder, INPUT, batch_size=2, num_joints=2))
    assert batch.image_id.dtype == torch.int64 and batch.image_id.tolist() == [3, 5]
    assert batch.score.dtype == torch.float32 and batch.score.tolist() == [1.0, 0.0]
    assert batch.ann_id.dtype == torch.int64 and batch.ann_id.tolist() == [0, 1]
