"""The GPU path without DALI: batched nvJPEG decode + one batched affine warp on the device.

DataLoader workers only read bytes (no decoding) and the DataLoader pins each item in
page-locked host memory. A producer thread of the main process then, on a side CUDA stream,
decodes the batch's crops with ``torchvision.io.decode_jpeg(list, device=...)`` (one nvJPEG
batch), pads them into one tensor [N, 3, h_max, w_max] and warps all of them with one
``affine_grid`` + ``grid_sample`` whose sampling matrix is the inverse of each sample's
crop->input affine (the same matrices as the other loaders), while the training step of the
previous batch runs on the consumer's stream.

nvJPEG writes its outputs on a stream of its own (torchvision's decoder stream), which does not
wait for the stream the output memory was allocated on. The decode therefore runs with a
decode stream of ours as the current stream: its outputs come from that stream's memory, the
side stream waits for the decode and marks the crops as used on it (``record_stream``), so the
allocator hands a crop's memory to a later decode only after the warp that reads it has run.
(Decoding with the side stream current, the next batch's decode could reuse the memory of crops
whose warp is still queued there and overwrite them: two batches' pixels in one image.)
Handing a batch over, the consumer's stream
waits on the event recorded after that batch's work, and every tensor of the batch is
``record_stream``-ed on the consumer's stream so the allocator does not give its memory back
to the side stream while the step still reads it. Host->device copies are asynchronous from
pinned memory, so nothing on the side stream waits for the host.

Without CUDA the same producer thread decodes and warps on the CPU (no streams): that is what
the tests run, including the thread, the queue, the early stop and error propagation.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import fields

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F

from pnfs.data.bad_samples import BadSample, BadSampleReport
from pnfs.data.batch import IMAGENET_MEAN, IMAGENET_STD, PoseBatch, to_device
from pnfs.data.geometry import invert
from pnfs.data.loaders.plan_reader import CheckedBatch, PlanReader, plan_dataloader


def sampling_theta(
    crop_to_input: np.ndarray, crop_size: tuple[int, int], input_size: tuple[int, int]
) -> np.ndarray:
    """``F.affine_grid`` matrices [N, 2, 3] (float64) for warping crops padded to ``crop_size``.

    affine_grid maps normalised output coordinates to normalised input coordinates, with
    (align_corners=False) pixel centre j of a side of n pixels at (2j + 1) / n - 1. So

        theta = N_crop · inverse(crop_to_input) · N_input⁻¹,

    N_crop(u) = (2u + 1) / (w_max, h_max) - 1 and N_input⁻¹(x_n) = ((x_n + 1) · (W, H) - 1) / 2:
    output pixel (x, y) samples the crop at inverse(crop_to_input) · (x, y, 1), pixel centres
    at integers, as cv2.warpAffine does.
    """
    h_max, w_max = crop_size
    h, w = input_size
    m = invert(np.asarray(crop_to_input, dtype=np.float64))  # input px -> crop px
    theta = np.empty_like(m)
    for row, side in ((0, w_max), (1, h_max)):
        a, b, t = m[:, row, 0], m[:, row, 1], m[:, row, 2]
        theta[:, row, 0] = a * w / side
        theta[:, row, 1] = b * h / side
        theta[:, row, 2] = (a * (w - 1) + b * (h - 1) + 2 * t + 1) / side - 1
    return theta


def warp_batch(
    crops: list[torch.Tensor], crop_to_input: np.ndarray | torch.Tensor, input_size: tuple[int, int]
) -> torch.Tensor:
    """Bilinear warp of crops ([3, h_i, w_i] uint8, one device) -> float [N, 3, H, W] in 0..255.

    Output pixel (x, y) samples the crop at inverse(crop_to_input) · (x, y, 1), pixel centres at
    integers (as cv2.warpAffine); outside the crop is black (zeros padding).
    """
    device = crops[0].device
    n = len(crops)
    h_max = max(c.shape[1] for c in crops)
    w_max = max(c.shape[2] for c in crops)
    padded = torch.zeros((n, 3, h_max, w_max), dtype=torch.float32, device=device)
    for i, c in enumerate(crops):
        padded[i, :, : c.shape[1], : c.shape[2]] = c
    h, w = input_size
    theta = to_device(
        torch.from_numpy(sampling_theta(np.asarray(crop_to_input), (h_max, w_max), (h, w))).float(), device
    )
    grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
    return F.grid_sample(padded, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def bytes_item(b: int, got: CheckedBatch) -> dict:
    """The item of batch b: its raw JPEG bytes (uint8 tensors), geometry, ids and bad samples."""
    meta = got.meta
    return {
        "batch": b,
        "bad": got.bad,
        "jpg": [torch.frombuffer(bytearray(x["jpg"]), dtype=torch.uint8) for x in got.blobs],
        "crop_to_input": torch.from_numpy(got.crop_to_input),
        "keypoints": torch.from_numpy(got.keypoints).float(),
        "affine": torch.from_numpy(got.input_to_image).float(),
        "image_id": torch.from_numpy(meta.ids[:, 0].copy()),
        "ann_id": torch.from_numpy(meta.ids[:, 1].copy()),
        "score": torch.from_numpy(meta.score.copy()).float(),
    }


def _jpeg_header(jpg: bytes, _: np.ndarray) -> tuple[int, int]:
    """(height, width) of a JPEG; ValueError when its header does not parse."""
    return simplejpeg.decode_jpeg_header(jpg)[:2]


class PlanBytes(PlanReader):
    """Item b = :func:`bytes_item` of batch b (in a worker: no decoding, only the checks that
    cost no decode: raw arrays, json and the JPEG header; bad ones are replaced)."""

    def __getitem__(self, b: int) -> dict:
        return bytes_item(b, self.checked(b, _jpeg_header))


def decode_batch(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decode JPEG byte tensors (on the CPU) to RGB uint8 [3, h, w] on ``device``.

    One ``torchvision.io.decode_jpeg(list, device=...)`` call: a batched nvJPEG decode on CUDA
    (torchvision decodes on its own stream, makes the current stream wait for it and returns
    when the decode is done), one libjpeg decode per crop on the CPU.
    """
    from torchvision.io import decode_jpeg

    return decode_jpeg(jpegs, mode="RGB", device=device)


class _Normalise:
    """(pixels - 255·mean) / (255·std) with the constants put on the device once."""

    def __init__(self, device: torch.device):
        self.mean = to_device(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0, device)
        self.std = to_device(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0, device)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std


_END = object()


class GpuPoseLoader:
    """Iterable of PoseBatch on ``device`` (CUDA when available), ``len()`` = batches.

    ``prefetch`` batches are decoded ahead of the consumer (on CUDA: on a side stream, while
    the consumer's stream runs the step of the batch before).
    """

    def __init__(
        self,
        dataset: PlanBytes,
        num_workers: int,
        device: torch.device | str | None = None,
        prefetch: int = 1,
        bad_samples: BadSampleReport | None = None,
    ):
        self.dataset = dataset
        self.bad_samples = bad_samples if bad_samples is not None else BadSampleReport(limit=0)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if prefetch < 1:
            raise ValueError(f"GpuPoseLoader: prefetch must be >= 1, got {prefetch}")
        self.prefetch = prefetch
        self.decode_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # page-locked items on CUDA: asynchronous copies
        self.loader = plan_dataloader(dataset, num_workers, self.device.type == "cuda", _as_is)

    def __len__(self) -> int:
        return len(self.dataset)

    def decode(self, jpegs: list[torch.Tensor]) -> list[torch.Tensor]:
        """:func:`decode_batch` on ``self.device``; on CUDA the crops are allocated on
        ``decode_stream`` and handed to the current stream (the producer's side stream): it waits
        for the decode, and their memory returns to a later decode only after its work on them."""
        if self.decode_stream is None:
            return decode_batch(jpegs, self.device)
        user = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.decode_stream):
            crops = decode_batch(jpegs, self.device)
        user.wait_stream(self.decode_stream)
        for crop in crops:
            crop.record_stream(user)
        return crops

    def _decode_one(self, jpg: bytes, _: np.ndarray) -> torch.Tensor:
        """One crop decoded on the device; ValueError when the decoder refuses it."""
        try:
            return self.decode([torch.frombuffer(bytearray(jpg), dtype=torch.uint8)])[0]
        except RuntimeError as e:
            raise ValueError(str(e)) from None

    def assemble(self, item: dict, normalise: _Normalise) -> tuple[PoseBatch, list[BadSample]]:
        """One item of :class:`PlanBytes` -> (PoseBatch on ``self.device`` (current stream), the
        bad samples replaced). When the batched decode fails, the batch is read again with a
        decode per crop, so the crops the decoder refuses are replaced as in the workers."""
        try:
            crops = self.decode(item["jpg"])
        except RuntimeError:
            got = self.dataset.checked(item["batch"], self._decode_one)
            assert got.decoded is not None  # checked() with a decode fills it
            item, crops = bytes_item(item["batch"], got), got.decoded
        pixels = warp_batch(crops, item["crop_to_input"], self.dataset.input_size)
        batch = PoseBatch(
            image=normalise(pixels),
            keypoints=to_device(item["keypoints"], self.device),
            affine=to_device(item["affine"], self.device),
            image_id=to_device(item["image_id"], self.device),
            ann_id=to_device(item["ann_id"], self.device),
            score=to_device(item["score"], self.device),
        )
        return batch, item["bad"]

    def _produce(self, items: Iterator[dict], out: queue.Queue, stop: threading.Event) -> None:
        """Producer thread: assemble each item (on a side stream on CUDA), queue (batch, event, bad)."""

        def put(x) -> bool:
            while not stop.is_set():
                try:
                    out.put(x, timeout=0.05)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            with ExitStack() as scope:
                side = None
                if self.device.type == "cuda":
                    scope.enter_context(torch.cuda.device(self.device))
                    side = torch.cuda.Stream(self.device)
                    scope.enter_context(torch.cuda.stream(side))
                normalise = _Normalise(self.device)
                for item in items:
                    if stop.is_set():
                        return
                    batch, bad = self.assemble(item, normalise)
                    ready = side.record_event() if side is not None else None
                    if not put((batch, ready, bad)):
                        return
            put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            put(e)

    def _hand_over(self, batch: PoseBatch, ready: torch.cuda.Event | None) -> PoseBatch:
        """Make the consumer's current stream wait for the batch and own its memory."""
        if ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ready)
            for f in fields(batch):
                getattr(batch, f.name).record_stream(stream)
        return batch

    def __iter__(self) -> Iterator[PoseBatch]:
        items = iter(self.loader)  # (workers start here, in the consumer's thread)
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        producer = threading.Thread(
            target=self._produce, args=(items, out, stop), name="pnfs-gpu-loader", daemon=True
        )
        producer.start()
        try:
            while True:
                got = out.get()
                if got is _END:
                    return
                if isinstance(got, BaseException):
                    raise got
                batch, ready, bad = got
                batch, got = self._hand_over(batch, ready), None  # (the consumer alone holds the batch)
                self.bad_samples.met(bad)
                yield batch
        finally:
            stop.set()
            producer.join()


def _as_is(item):
    return item
