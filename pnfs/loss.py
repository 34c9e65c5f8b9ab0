"""Weighted MSE between predicted and target score maps (paper §III-D; DESIGN §2).

loss = mean_{n,j} 0.5 * w_nj * mean_{h,w} (score_njhw - target_njhw)^2
"""

from __future__ import annotations

import torch


def pose_loss(scores: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """scores, targets [N, K, h, w]; weights [N, K] (1 labelled inside the crop, else 0) -> scalar."""
    if scores.shape != targets.shape:
        raise ValueError(f"pose_loss: scores {tuple(scores.shape)} vs targets {tuple(targets.shape)}")
    if weights.shape != scores.shape[:2]:
        raise ValueError(f"pose_loss: weights {tuple(weights.shape)} vs scores {tuple(scores.shape)}")
    per_joint = (scores.float() - targets.float()).square().mean(dim=(2, 3))
    return (0.5 * weights.float() * per_joint).mean()
