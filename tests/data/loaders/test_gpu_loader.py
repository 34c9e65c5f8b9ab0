"""The ``gpu`` loader's parts: the batched warp, its affine_grid matrices, the producer thread
(order, early stop, errors) on the CPU, and the side-stream hand-over on CUDA (``gpu``)."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest
import simplejpeg
import torch
import torch.nn.functional as F

from pnfs.data.bad_samples import BadSampleReport
from pnfs.data.geometry import Augment, invert
from pnfs.data.loaders.assemble import batch_geometry, denormalise
from pnfs.data.loaders.gpu_loader import (
    GpuPoseLoader,
    PlanBytes,
    _as_is,
    _jpeg_header,
    _Normalise,
    decode_batch,
    sampling_theta,
    warp_batch,
)
from pnfs.data.shards.reader import ShardSet, parse_meta
from tests.data.loaders.test_plan_reader import FLIP, SIZE, plan, sample, write_shard


def _affines(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random well-conditioned crop->input affines [n, 2, 3] (rotation, scale, shift)."""
    theta = rng.uniform(-np.pi, np.pi, n)
    k = rng.uniform(0.5, 2.0, n)
    m = np.zeros((n, 2, 3))
    m[:, 0, 0], m[:, 0, 1] = k * np.cos(theta), -k * np.sin(theta)
    m[:, 1, 0], m[:, 1, 1] = k * np.sin(theta), k * np.cos(theta)
    m[:, :, 2] = rng.uniform(-20, 20, (n, 2))
    return m


def test_sampling_theta_samples_the_crop_at_the_inverse_map_of_each_pixel_centre():
    rng = np.random.default_rng(0)
    crop_to_input = _affines(rng, 5)
    crop_size, (h, w) = (37, 53), (24, 18)
    theta = torch.from_numpy(sampling_theta(crop_to_input, crop_size, (h, w)))
    grid = F.affine_grid(theta, [5, 3, h, w], align_corners=False)  # [5, h, w, 2] float64
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pixels = np.stack([xs, ys, np.ones_like(xs)], -1).reshape(-1, 3).astype(np.float64)
    src = np.einsum("nij,pj->npi", invert(crop_to_input), pixels)  # crop px of every input px
    expected = (2 * src + 1) / np.array([crop_size[1], crop_size[0]]) - 1
    np.testing.assert_allclose(grid.numpy().reshape(5, -1, 2), expected, atol=1e-9)


def test_warp_batch_is_exact_for_the_identity_and_integer_shifts():
    rng = np.random.default_rng(1)
    big = torch.from_numpy(rng.integers(0, 256, (3, 20, 30), dtype=np.uint8))
    small = torch.from_numpy(rng.integers(0, 256, (3, 9, 11), dtype=np.uint8))
    identity = np.array([[1.0, 0, 0], [0, 1, 0]])
    shift = np.array([[1.0, 0, 2], [0, 1, 3]])  # crop px (u, v) -> input px (u + 2, v + 3)
    out = warp_batch([big, small], np.stack([identity, shift]), (20, 30))
    assert out.shape == (2, 3, 20, 30) and out.dtype == torch.float32
    exact = dict(rtol=0, atol=1e-3)  # float32 grid coordinates; a half-pixel error moves values by ~100
    torch.testing.assert_close(out[0], big.float(), **exact)
    torch.testing.assert_close(out[1, :, 3:12, 2:13], small.float(), **exact)
    inside = torch.zeros(20, 30, dtype=torch.bool)
    inside[3:12, 2:13] = True
    assert out[1][:, ~inside].abs().max() < 1e-3  # black outside the crop, also over the padding


def _jpeg(rng: np.random.Generator, h: int, w: int) -> torch.Tensor:
    smooth = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (7, 7), 2)
    ok, data = cv2.imencode(".jpg", smooth, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return torch.from_numpy(data.reshape(-1).copy())


class _Items(torch.utils.data.Dataset):
    """Items shaped like PlanBytes's: ``n`` batches of two crops; reading batch ``fail_at`` fails."""

    input_size = (32, 24)

    def __init__(self, n: int, fail_at: int | None = None):
        rng = np.random.default_rng(2)
        self.jpgs = [[_jpeg(rng, 40, 30), _jpeg(rng, 28, 36)] for _ in range(n)]
        self.fail_at = fail_at
        self.affines = _affines(rng, 2 * n).reshape(n, 2, 2, 3) * [[[1, 1, 0]]] + [[[0, 0, 12]]]

    def __len__(self) -> int:
        return len(self.jpgs)

    def __getitem__(self, b: int) -> dict:
        if b == self.fail_at:
            raise OSError(f"cannot read batch {b}")
        return {
            "batch": b,
            "bad": [],
            "jpg": self.jpgs[b],
            "crop_to_input": torch.from_numpy(self.affines[b]),
            "keypoints": torch.full((2, 17, 3), float(b)),
            "affine": torch.from_numpy(invert(self.affines[b])).float(),
            "image_id": torch.tensor([b, b]),
            "ann_id": torch.tensor([2 * b, 2 * b + 1]),
            "score": torch.ones(2),
        }


def _producers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pnfs-gpu-loader"]


@pytest.mark.parametrize("prefetch", [1, 3])
def test_producer_thread_keeps_the_order_and_ends(prefetch):
    loader = GpuPoseLoader(_Items(5), num_workers=0, device="cpu", prefetch=prefetch)
    batches = list(loader)
    assert len(loader) == 5 and [b.ann_id.tolist() for b in batches] == [[2 * b, 2 * b + 1] for b in range(5)]
    assert all(b.image.shape == (2, 3, 32, 24) and b.image.dtype == torch.float32 for b in batches)
    assert [float(b.keypoints[0, 0, 0]) for b in batches] == [0, 1, 2, 3, 4]
    assert not _producers()


def test_stopping_early_ends_the_producer_thread():
    batches = iter(GpuPoseLoader(_Items(6), num_workers=0, device="cpu", prefetch=2))
    assert int(next(batches).image_id[0]) == 0 and int(next(batches).image_id[0]) == 1
    assert _producers()  # decoding ahead, blocked on the full queue
    batches.close()  # what a `break` out of the epoch does
    assert not _producers()


def test_an_error_in_the_producer_reaches_the_consumer_after_the_good_batches():
    got = []
    with pytest.raises(OSError, match="cannot read batch 2"):
        for batch in GpuPoseLoader(_Items(4, fail_at=2), num_workers=0, device="cpu"):
            got.append(int(batch.image_id[0]))
    assert got == [0, 1]
    assert not _producers()


def test_prefetch_must_be_positive():
    with pytest.raises(ValueError, match="prefetch"):
        GpuPoseLoader(_Items(1), num_workers=0, device="cpu", prefetch=0)


@pytest.mark.gpu
def test_cuda_batches_match_the_cpu_path_while_the_consumer_stream_is_busy():
    """Side-stream decode + hand-over: what the step reads equals the CPU path's batches. The
    consumer's stream is kept busy (a sleep kernel) before it reads each batch and drops it at
    once, so a missing wait_event (reading before the warp) or record_stream (the allocator
    giving the memory to the next batch before the read) corrupts what is read."""
    items = _Items(8)
    ref = list(GpuPoseLoader(items, num_workers=0, device="cpu"))
    got = []
    for batch in GpuPoseLoader(items, num_workers=0, device="cuda", prefetch=2):
        assert all(getattr(batch, f).device.type == "cuda" for f in ("image", "keypoints", "affine", "score"))
        torch.cuda._sleep(50_000_000)  # the "training step" on the consumer's stream
        got.append((batch.image * 1.0, batch.keypoints * 1.0, batch.ann_id.clone()))
        del batch
    torch.cuda.synchronize()
    assert len(got) == len(ref)
    for a, (image, keypoints, ann_id) in zip(ref, got):
        assert torch.equal(a.keypoints, keypoints.cpu()) and torch.equal(a.ann_id, ann_id.cpu())
        diff = (denormalise(a.image) - denormalise(image.cpu())).abs()
        assert diff.mean() < 1.5  # nvJPEG vs libjpeg IDCT, same warp


@pytest.mark.gpu
def test_a_decode_does_not_write_into_crops_a_queued_warp_still_reads():
    """Batch 0's warp waits on the side stream behind a sleep kernel (the stream is busy) when
    its crops are dropped; batch 1's crops have the same sizes. Decoded with the side stream
    current, nvJPEG (on its own stream) writes batch 1 into batch 0's crops before that warp
    reads them; with the decode stream and record_stream the memory is not handed out early."""
    items = _Items(2)
    ref = list(GpuPoseLoader(items, num_workers=0, device="cpu"))
    loader = GpuPoseLoader(items, num_workers=0, device="cuda")
    normalise = _Normalise(loader.device)
    side = torch.cuda.Stream(loader.device)
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        first, _ = loader.assemble(items[0], normalise)
        second, _ = loader.assemble(items[1], normalise)
    torch.cuda.synchronize()
    for a, got in zip(ref, (first, second)):
        diff = (denormalise(a.image) - denormalise(got.image.cpu())).abs()
        assert diff.mean() < 1.5  # nvJPEG vs libjpeg IDCT, same warp; another batch's pixels: ~50


# ----------------------------------------------------------------------------- gpu-mutant tests
# (issue 26 part 6: gpu_loader.py under mutation, docs/testing.md) on the hand-made shard of
# test_plan_reader.py: a worker's item field by field, the producer's batch, the bad samples
# replaced in the worker (a header that does not parse) and in the producer (a JPEG whose header
# parses but whose data is cut: the batched decode fails, the batch is decoded crop by crop).


def _noise_jpeg_cut() -> bytes:
    """A 64 x 48 JPEG of noise whose last fifth is overwritten: the header parses, decoding fails."""
    data = simplejpeg.encode_jpeg(np.random.default_rng(5).integers(0, 256, (64, 48, 3)).astype(np.uint8))
    keep = len(data) * 4 // 5
    return data[:keep] + b"\xff" * (len(data) - keep)


def _plan_bytes(tmp_path, samples, batches) -> PlanBytes:
    shards = ShardSet.open([write_shard(tmp_path / "s.tar", samples)])
    return PlanBytes(shards, plan(batches, len(samples)), SIZE, 1.5, FLIP)


def test_a_workers_item_is_the_batchs_bytes_geometry_and_ids(tmp_path):
    samples = [sample(s) for s in range(5)]
    ds = _plan_bytes(tmp_path, samples, [[0, 1], [4, 2]])
    item, got = ds[1], ds.checked(1)
    assert set(item) == {
        "batch",
        "bad",
        "jpg",
        "crop_to_input",
        "keypoints",
        "affine",
        "image_id",
        "ann_id",
        "score",
    }
    assert item["batch"] == 1 and item["bad"] == []
    assert [bytes(j.numpy()) for j in item["jpg"]] == [samples[4]["jpg"], samples[2]["jpg"]]
    assert all(j.dtype == torch.uint8 and j.dim() == 1 for j in item["jpg"])
    assert item["crop_to_input"].dtype == torch.float64
    np.testing.assert_array_equal(item["crop_to_input"].numpy(), got.crop_to_input)
    assert item["keypoints"].dtype == torch.float32 and item["affine"].dtype == torch.float32
    torch.testing.assert_close(item["keypoints"], torch.from_numpy(got.keypoints).float())
    torch.testing.assert_close(item["affine"], torch.from_numpy(got.input_to_image).float())
    assert item["image_id"].tolist() == [104, 102] and item["ann_id"].tolist() == [204, 202]
    assert item["image_id"].dtype == torch.int64 and item["ann_id"].dtype == torch.int64
    assert item["score"].dtype == torch.float32 and item["score"].tolist() == pytest.approx([0.9, 0.7])


def test_a_header_that_does_not_parse_is_replaced_in_the_worker(tmp_path):
    samples = [sample(s) for s in range(4)]
    samples[1] = sample(1, jpg=b"\xff\xd8 no header")
    item = _plan_bytes(tmp_path, samples, [[0, 1]])[0]
    assert item["ann_id"].tolist() == [200, 202]
    ((reason, key, error),) = [(b.reason, b.key, b.error) for b in item["bad"]]
    assert (reason, key) == ("bad_jpeg", "101_201") and "tjDecompressHeader" in error


def test_decode_batch_gives_rgb_crops_channels_first():
    crops = decode_batch(
        [torch.frombuffer(bytearray(sample(s)["jpg"]), dtype=torch.uint8) for s in (1, 3)],
        torch.device("cpu"),
    )
    assert [tuple(c.shape) for c in crops] == [(3, 16, 12), (3, 16, 12)]
    assert all(c.dtype == torch.uint8 for c in crops)
    assert [int(c[:, 8, 6].float().mean().round()) for c in crops] == [20, 60]
    colour = simplejpeg.encode_jpeg(
        np.tile(np.uint8([200, 30, 90]), (16, 16, 1)), quality=100, colorsubsampling="444"
    )
    (c,) = decode_batch([torch.frombuffer(bytearray(colour), dtype=torch.uint8)], torch.device("cpu"))
    assert [abs(int(v) - w) <= 2 for v, w in zip(c[:, 8, 8], (200, 30, 90))] == [True] * 3  # RGB, not BGR


def test_normalise_puts_imagenets_constants_on_the_device():
    norm = _Normalise(torch.device("cpu"))
    np.testing.assert_allclose(norm.mean.view(3).numpy(), [123.675, 116.28, 103.53], rtol=1e-6)
    np.testing.assert_allclose(norm.std.view(3).numpy(), [58.395, 57.12, 57.375], rtol=1e-6)
    assert norm.mean.shape == (1, 3, 1, 1) and norm.std.shape == (1, 3, 1, 1)
    out = norm(torch.full((2, 3, 1, 1), 255.0))
    np.testing.assert_allclose(
        out[1].view(3).numpy(), [0.515 / 0.229, 0.544 / 0.224, 0.594 / 0.225], rtol=1e-5
    )
    meta = _Normalise(torch.device("meta"))
    assert meta.mean.device.type == "meta" and meta.std.device.type == "meta"


def test_the_loader_on_the_cpu_without_cuda():
    loader = GpuPoseLoader(_Items(2), num_workers=0)
    assert loader.device == torch.device("cpu") and loader.decode_stream is None and loader.prefetch == 1
    assert loader.loader.pin_memory is False and loader.loader.collate_fn is _as_is
    assert loader.bad_samples.limit == 0 and loader.bad_samples.samples == []
    assert GpuPoseLoader(_Items(2), num_workers=0, device="cpu").device == torch.device("cpu")
    with pytest.raises(ValueError) as e:
        GpuPoseLoader(_Items(1), num_workers=0, device="cpu", prefetch=-1)
    assert str(e.value) == "GpuPoseLoader: prefetch must be >= 1, got -1"
    assert _as_is(item := {"batch": 3}) is item


def test_the_producers_batch_from_a_workers_item(tmp_path):
    samples = [sample(s) for s in range(5)]
    ds = _plan_bytes(tmp_path, samples, [[0, 1], [4, 2]])
    loader = GpuPoseLoader(ds, num_workers=0, device="cpu", bad_samples=BadSampleReport(limit=3))
    batches = list(loader)
    assert len(loader) == len(batches) == 2
    batch = batches[1]
    assert batch.image.shape == (2, 3, 32, 24) and batch.image.dtype == torch.float32
    assert batch.ann_id.tolist() == [204, 202] and batch.image_id.tolist() == [104, 102]
    item = ds[1]
    for name in ("keypoints", "affine", "image_id", "ann_id", "score"):
        assert torch.equal(getattr(batch, name), item[name]), name
    for i, level in enumerate((80, 40)):  # the grey crops, normalised, at the input's centre
        want = [(level / 255 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
        assert batch.image[i, :, 15, 11].tolist() == pytest.approx(want, abs=0.02)
    assert loader.bad_samples.samples == []


def test_a_crop_the_batched_decode_refuses_is_replaced_crop_by_crop(tmp_path, caplog):
    samples = [sample(s) for s in range(5)]
    samples[1] = sample(1, jpg=_noise_jpeg_cut())
    ds = _plan_bytes(tmp_path, samples, [[0, 1], [3, 4]])
    loader = GpuPoseLoader(ds, num_workers=0, device="cpu", bad_samples=BadSampleReport(limit=3))
    with caplog.at_level("WARNING", logger="pnfs.train"):
        batches = list(loader)
    assert [b.ann_id.tolist() for b in batches] == [[200, 202], [203, 204]]
    ((reason, key, error),) = [(b.reason, b.key, b.error) for b in loader.bad_samples.samples]
    assert (reason, key) == ("bad_jpeg", "101_201") and "Image is incomplete or truncated" in error
    assert [r.getMessage() for r in caplog.records] == [
        f"bad sample dropped: {loader.bad_samples.samples[0]}"
    ]
    # the replaced slot carries the spare's geometry and pixels (grey 40 at the centre)
    want = batch_geometry(parse_meta([samples[0], samples[2]]), Augment.identity(2), SIZE, 1.5, FLIP)[2]
    torch.testing.assert_close(batches[0].keypoints, torch.from_numpy(want).float())
    assert batches[0].image[1, 0, 15, 11].item() == pytest.approx((40 / 255 - 0.485) / 0.229, abs=0.02)


def test_decode_one_turns_the_decoders_refusal_into_a_bad_jpeg(tmp_path):
    loader = GpuPoseLoader(_Items(1), num_workers=0, device="cpu")
    crop = loader._decode_one(sample(2)["jpg"], np.eye(2, 3))
    assert crop.shape == (3, 16, 12) and int(crop[0, 8, 6]) == 40
    with pytest.raises(ValueError, match=r"^decode_jpeg, .*Image is incomplete or truncated"):
        loader._decode_one(_noise_jpeg_cut(), np.eye(2, 3))


def test_the_workers_check_reads_height_and_width_from_the_header():
    assert _jpeg_header(sample(1)["jpg"], np.eye(2, 3)) == (16, 12)
    assert _jpeg_header(_noise_jpeg_cut(), np.eye(2, 3)) == (64, 48)  # the data is not read
    with pytest.raises(ValueError):
        _jpeg_header(b"\xff\xd8 no header", np.eye(2, 3))


class _Counted(_Items):
    """_Items that count the items read."""

    def __init__(self, n: int):
        super().__init__(n)
        self.read = 0

    def __getitem__(self, b: int) -> dict:
        self.read += 1
        return super().__getitem__(b)


def test_stopping_early_ends_a_producer_waiting_on_the_full_queue():
    """The producer waits to put a batch into the full queue when the consumer stops: it must
    see the stop (a put that blocks for good would hang the consumer's close)."""
    items = _Counted(6)
    batches = iter(GpuPoseLoader(items, num_workers=0, device="cpu", prefetch=1))
    next(batches)
    for _ in range(500):  # the queue holds one batch, the producer has the next one ready
        if items.read >= 3:
            break
        time.sleep(0.01)
    time.sleep(0.2)
    assert items.read == 3  # waiting: no further item read
    closer = threading.Thread(target=batches.close, daemon=True)
    closer.start()
    closer.join(10)
    assert not closer.is_alive(), "the producer did not see the stop"
    assert not _producers()


def test_warp_batch_works_on_the_crops_device():
    """Crops on another device (``meta`` here, CUDA in training): the padding, the matrices and
    the output are made there."""
    crops = [
        torch.zeros(3, 5, 6, dtype=torch.uint8, device="meta"),
        torch.zeros(3, 4, 7, dtype=torch.uint8, device="meta"),
    ]
    out = warp_batch(crops, np.stack([np.eye(2, 3)] * 2), (8, 6))
    assert out.device.type == "meta" and out.shape == (2, 3, 8, 6) and out.dtype == torch.float32


def test_decode_batch_gives_three_channels_for_a_grey_jpeg():
    grey = simplejpeg.encode_jpeg(np.full((16, 12, 1), 77, np.uint8), colorspace="GRAY")
    (crop,) = decode_batch([torch.frombuffer(bytearray(grey), dtype=torch.uint8)], torch.device("cpu"))
    assert crop.shape == (3, 16, 12) and crop[:, 8, 6].tolist() == [77, 77, 77]
