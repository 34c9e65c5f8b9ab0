"""The GPU path without DALI: batched nvJPEG decode + one batched affine warp on the device.

DataLoader workers only read bytes (no decoding); the main process decodes the batch's
crops with ``torchvision.io.decode_jpeg(list, device="cuda")``, pads them into one tensor
[N, 3, h_max, w_max] and warps all of them with one ``grid_sample`` whose sampling grid is
the inverse of each sample's crop->input affine (same matrices as the other loaders).
Without CUDA it runs on the CPU (decode + warp), which is what the tests exercise.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from pnfs.data.assemble import normalise
from pnfs.data.batch import PoseBatch
from pnfs.data.geometry import invert
from pnfs.data.torch_loader import PlanReader, _worker_init, fork_safe_opencv


def warp_batch(
    crops: list[torch.Tensor], crop_to_input: torch.Tensor, input_size: tuple[int, int]
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
    to_crop = invert(crop_to_input.to(device=device, dtype=torch.float64)).float()  # [N, 2, 3]
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    base = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, h * w, 3)  # [1, HW, 3]
    src = base @ to_crop.transpose(1, 2)  # [N, HW, 2] crop px
    # align_corners=False: pixel centre j <-> (2j + 1) / size - 1
    scale = torch.tensor([2.0 / w_max, 2.0 / h_max], device=device)
    grid = (src * scale + scale / 2 - 1).view(n, h, w, 2)
    return F.grid_sample(padded, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class PlanBytes(PlanReader):
    """Item b = the raw JPEG bytes + geometry of batch b (no decoding in the worker)."""

    def __getitem__(self, b: int) -> dict:
        blobs, meta, crop_to_input, input_to_image, keypoints = self.read(b)
        return {
            "jpg": [torch.frombuffer(bytearray(x["jpg"]), dtype=torch.uint8) for x in blobs],
            "crop_to_input": torch.from_numpy(crop_to_input),
            "keypoints": torch.from_numpy(keypoints).float(),
            "affine": torch.from_numpy(input_to_image).float(),
            "image_id": torch.from_numpy(meta.ids[:, 0].copy()),
            "ann_id": torch.from_numpy(meta.ids[:, 1].copy()),
            "score": torch.from_numpy(meta.score.copy()).float(),
        }


def decode_batch(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decode JPEG byte tensors to RGB uint8 [3, h, w] on ``device`` (one batched call on CUDA)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision >= 0.29 points to torchcodec; nvJPEG batches stay here
        warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
        if device.type == "cuda":
            return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
        return [decode_jpeg(j, mode=ImageReadMode.RGB) for j in jpegs]


def _as_is(item):
    return item


class GpuPoseLoader:
    """Iterable of PoseBatch on ``device`` (CUDA when available), ``len()`` = batches."""

    def __init__(self, dataset: PlanBytes, num_workers: int, device: torch.device | str | None = None):
        self.dataset = dataset
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if num_workers > 0:
            fork_safe_opencv()
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=num_workers,
            worker_init_fn=_worker_init if num_workers > 0 else None,
            prefetch_factor=4 if num_workers > 0 else None,
            collate_fn=_as_is,
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        for item in self.loader:
            crops = decode_batch(item["jpg"], self.device)
            pixels = warp_batch(crops, item["crop_to_input"], self.dataset.input_size)
            yield PoseBatch(
                image=normalise(pixels),
                keypoints=item["keypoints"].to(self.device, non_blocking=True),
                affine=item["affine"].to(self.device, non_blocking=True),
                image_id=item["image_id"].to(self.device),
                ann_id=item["ann_id"].to(self.device),
                score=item["score"].to(self.device),
            )
