"""Table VI's fixed baselines: a trunk to one [N, c, H/4, W/4] map and one 1x1 head for all K joints.

    images [N, 3, H, W] -> trunk -> features [N, c, H/4, W/4] -> 1x1 conv -> [N, K*d, H/4, W/4]

* d = 1 (``model.vector_dim: 1``): the published model. ``forward`` returns the raw heatmaps
  [N, K, H/4, W/4], trained by the MSE to the Gaussian targets (:func:`pnfs.loss.pose_loss` on
  the scores), as SimpleBaseline and HRNet train them.
* d > 1: the paper's vector-in-pixel head (§III-D, eq. 4): the 1x1 conv predicts a d-vector per
  joint and pixel, ``forward`` returns the squashed scores n^2 / (1 + n^2) in [0, 1) and
  ``forward(images, vectors=True)`` the vectors [N, K*d, H/4, W/4] (joint j in channels
  j*d .. j*d+d-1) for the fused squash-MSE loss, exactly as :class:`pnfs.model.PoseNFS` does.

The model offers what the engine asks of a PoseNFS: ``backbone`` (the pretrained trunk that
``model.backbone.weights`` loads into), ``vector_dim``, ``vector_joints``, ``joint_names``,
``arch_parameters()`` (none: there is nothing to search) and ``weight_parameters()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pnfs.kernels import squash_score
from pnfs.model.backbones import Backbone
from pnfs.model.head import VectorHead


class BaselinePoseNet(nn.Module):
    """``backbone`` (images -> a list whose last entry is [N, c_b, H/s, W/s]), ``neck``
    ([N, c_b, H/s, W/s] -> [N, c, H/4, W/4]; an empty ``nn.Sequential`` where s = 4 already)
    and a 1x1 head of K*d channels."""

    def __init__(
        self,
        backbone: Backbone,
        neck: nn.Module,
        features: int,
        joint_names: Sequence[str],
        vector_dim: int,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.joint_names = list(joint_names)
        self.num_joints = len(self.joint_names)
        self.vector_dim = vector_dim
        # the published head: the trunk's features end in a ReLU, so VectorHead's ReLU changes
        # nothing and its 1x1 conv with bias is SimpleBaseline's / HRNet's final layer
        self.head = VectorHead(features, self.num_joints, vector_dim)
        # the loss's fused path needs d-vectors; d = 1 is a plain heatmap, trained on the scores
        self.vector_joints = list(range(self.num_joints)) if vector_dim > 1 else None

    def forward(self, images: torch.Tensor, vectors: bool = False) -> torch.Tensor:
        """images [N, 3, H, W] -> heatmaps (d = 1) or scores in [0, 1) (d > 1) [N, K, H/4, W/4];
        ``vectors`` (d > 1 only): the head's vectors [N, K*d, H/4, W/4]."""
        if vectors and self.vector_joints is None:
            raise ValueError("BaselinePoseNet: vectors=True needs model.vector_dim > 1 (d=1 is a heatmap)")
        out = self.head.vectors(self.neck(self.backbone(images)[-1]))
        if vectors or self.vector_dim == 1:
            return out
        return squash_score(out, self.vector_dim)

    def arch_parameters(self) -> list[nn.Parameter]:
        """None: a baseline has no alpha or beta."""
        return []

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter."""
        return list(self.parameters())
