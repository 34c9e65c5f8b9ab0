"""SimpleBaseline-ResNet-50 (Xiao et al., ECCV 2018; the paper's Table VI row [55]).

    images [N, 3, H, W] -> ResNet-50 stem + layer1..4 -> [N, 2048, H/32, W/32]
      -> 3 x (ConvTranspose2d 4x4, stride 2, padding 1, 256 ch, no bias + BN + ReLU)
      -> [N, 256, H/4, W/4] -> 1x1 head (:class:`pnfs.model.baseline.BaselinePoseNet`)

The trunk is :class:`pnfs.model.backbones.ResNet50Backbone` (torchvision key names), so
``model.backbone.weights`` (imagenet | none | a .pth) loads into it as into every backbone.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pnfs.model.backbones import ResNet50Backbone
from pnfs.model.baseline import BaselinePoseNet

DECONV_CHANNELS = 256
DECONV_LAYERS = 3


def deconv_neck(
    in_channels: int, channels: int = DECONV_CHANNELS, layers: int = DECONV_LAYERS
) -> nn.Sequential:
    """[N, in, h, w] -> [N, channels, h * 2^layers, w * 2^layers]: 4x4 stride-2 deconvolutions
    (padding 1: exactly x2 per layer), each followed by BN and ReLU."""
    blocks: list[nn.Module] = []
    for k in range(layers):
        blocks += [
            nn.ConvTranspose2d(
                in_channels if k == 0 else channels, channels, 4, stride=2, padding=1, bias=False
            ),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*blocks)


def simple_baseline_resnet50(joint_names: Sequence[str], vector_dim: int) -> BaselinePoseNet:
    """SimpleBaseline on a randomly initialised ResNet-50 (weights load when training starts)."""
    backbone = ResNet50Backbone()
    return BaselinePoseNet(
        backbone, deconv_neck(backbone.channels[-1]), DECONV_CHANNELS, joint_names, vector_dim
    )
