"""The one batch contract every loader yields (torch/WebDataset, DALI, GPU path).

Pixel convention everywhere in pnfs: pixel (i, j) has its centre at integer coordinates
(x=j, y=i); an input pixel x maps to the heatmap coordinate u = x / stride (stride 4) and
back as x = u * stride. Targets are placed at the exact (unrounded) u, so decoding has no
constant half-pixel bias.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class PoseBatch:
    """A batch of N person crops.

    image:     [N, 3, H, W] float, RGB, normalised with ImageNet mean/std
    keypoints: [N, K, 3] float32, (x, y) in input pixels and a label weight in {0, 1}
               (1 = labelled and inside the crop; 0 = unlabelled or left the crop)
    affine:    [N, 2, 3] float32, maps input pixels -> original image pixels
    image_id:  [N] int64
    ann_id:    [N] int64 (detection index for detector boxes)
    score:     [N] float32 box score (1 for ground-truth boxes)
    """

    image: torch.Tensor
    keypoints: torch.Tensor
    affine: torch.Tensor
    image_id: torch.Tensor
    ann_id: torch.Tensor
    score: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PoseBatch:
        return replace(
            self,
            **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)},
        )

    def to_device(self, device: torch.device) -> PoseBatch:
        """Every field on ``device`` without the host waiting: host tensors go to a CUDA device
        asynchronously through page-locked memory (:func:`to_device`)."""
        return replace(self, **{f.name: to_device(getattr(self, f.name), device) for f in fields(self)})

    def pin_memory(self) -> PoseBatch:
        """Page-locked copy (torch DataLoader calls this with ``pin_memory=True``)."""
        return replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    def __len__(self) -> int:
        return self.image.shape[0]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``. A host tensor bound for CUDA is copied from page-locked memory (pinned
    here when it is not), so the copy is asynchronous: the caching host allocator keeps the pinned
    source until the copy has run. Other moves are plain ``.to``."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    if not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEATMAP_STRIDE = 4
