"""HRNet-W32 for pose (Sun et al., CVPR 2019; the paper's Table VI row [47]).

    images [N, 3, H, W] -> stem (two 3x3 stride-2 convs) -> stage 1 (4 bottlenecks, 256 ch)
      -> stages 2, 3, 4 (1, 4 and 3 modules of 4 basic blocks per branch, 2 / 3 / 4 branches of
         32 / 64 / 128 / 256 ch, each module ending in the fuse layers that exchange the branches)
      -> the 1/4 branch [N, 32, H/4, W/4] -> 1x1 head (:class:`pnfs.model.baseline.BaselinePoseNet`)

The stages are timm's ``hrnet_w32`` (the same published configuration, and its ImageNet
weights' key names, so ``model.backbone.weights`` loads as for the ``hrnet_w32`` backbone).
As in the published pose network, the last module fuses into the 1/4 branch only: its fuse
layers towards 1/8, 1/16 and 1/32 are not built (nor timm's classification head), so no
parameter is dead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pnfs.model.backbones import HRNetW32Backbone
from pnfs.model.baseline import BaselinePoseNet


class HRNetW32Trunk(HRNetW32Backbone):
    """HRNet-W32 stem..stage4: [N, 3, H, W] -> [[N, 32, H/4, W/4]] (the fused 1/4 branch)."""

    channels = (32,)
    kept = (*HRNetW32Backbone.kept, "stage4")
    # the last module's fuse layers into branches 1..3 (multi-scale output) and the classifier
    stage4: nn.Sequential  # timm's, set by name (``kept``)
    unused_weight_prefixes = (
        "stage4.2.fuse_layers.1.", "stage4.2.fuse_layers.2.", "stage4.2.fuse_layers.3.",
        "incre_modules.", "downsamp_modules.", "final_layer.", "classifier.", "head.",
    )  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        last = self.stage4[-1]
        fuse_layers = last.fuse_layers
        assert isinstance(fuse_layers, nn.ModuleList)  # timm's HighResolutionModule
        last.fuse_layers = fuse_layers[:1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.stage4(super().forward(x))


def hrnet_w32(joint_names: Sequence[str], vector_dim: int) -> BaselinePoseNet:
    """HRNet-W32 with its 1x1 head on the 1/4 branch, randomly initialised."""
    return BaselinePoseNet(
        HRNetW32Trunk(), nn.Sequential(), HRNetW32Trunk.channels[0], joint_names, vector_dim
    )
