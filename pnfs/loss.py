"""The training loss: weighted MSE between predicted and target score maps (paper §III-D;
docs/design.md §2).

    loss = mean_{n,j} 0.5 * w_nj * mean_{h,w} (score_njhw - target_njhw)^2

Two ways to the same number. When every joint is predicted by exactly one part (every preset
but P=8) the loss is computed straight from the head's vectors by the fused squash-MSE kernel
(:func:`pnfs.kernels.squash_mse_loss`: score = n^2/(1+n^2) and the loss in one pass, fp32
accumulation); otherwise (P=8: a shared joint sums several parts' scores) from the scores.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pnfs.data.targets import gaussian_targets
from pnfs.kernels import squash_mse_loss

if TYPE_CHECKING:  # for annotations only: the models sit above the loss
    from pnfs.model import BaselinePoseNet, PoseNFS


@dataclass(frozen=True)
class JointVectors:
    """The head's vectors [N, K*d, h, w] with one d-vector per joint (channels j*d .. j*d+d-1)."""

    vectors: torch.Tensor
    d: int


def pose_loss(
    prediction: torch.Tensor | JointVectors, targets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """prediction: scores [N, K, h, w] or :class:`JointVectors`; targets [N, K, h, w]; weights
    [N, K] (1 labelled inside the crop, else 0) -> 0-dim fp32 loss."""
    if isinstance(prediction, JointVectors):
        return squash_mse_loss(prediction.vectors, prediction.d, targets, weights)
    scores = prediction
    if scores.shape != targets.shape:
        raise ValueError(f"pose_loss: scores {tuple(scores.shape)} vs targets {tuple(targets.shape)}")
    if weights.shape != scores.shape[:2]:
        raise ValueError(f"pose_loss: weights {tuple(weights.shape)} vs scores {tuple(scores.shape)}")
    per_joint = (scores.float() - targets.float()).square().mean(dim=(2, 3))
    return (0.5 * weights.float() * per_joint).mean()


@dataclass(frozen=True)
class LossSetup:
    """How :func:`batch_loss` turns a batch into the loss.

    ``vector_joints`` [sum_p J_p] (on ``device``): the joint of each head vector in the order
    of ``PoseNFS.forward(images, vectors=True)``; None takes the score path.
    """

    device: torch.device
    sigma: float
    vector_dim: int
    vector_joints: torch.Tensor | None = None
    autocast: torch.dtype | None = None
    channels_last: bool = False


def loss_setup(
    model: PoseNFS | BaselinePoseNet,
    sigma: float,
    device: torch.device,
    autocast: torch.dtype | None,
    channels_last: bool,
) -> LossSetup:
    """The fused path wherever the bare PoseNFS ``model`` maps its vectors one-to-one onto joints."""
    joints = model.vector_joints
    return LossSetup(
        device=device,
        sigma=sigma,
        vector_dim=model.vector_dim,
        vector_joints=None if joints is None else torch.tensor(joints, device=device),
        autocast=autocast,
        channels_last=channels_last,
    )


def batch_loss(
    model: nn.Module, batch: Any, setup: LossSetup, loss_fn: Callable[..., torch.Tensor] = pose_loss
) -> torch.Tensor:
    """``loss_fn(model(image), gaussian_targets(keypoints), weights)`` of one PoseBatch, on the device.

    ``model`` may be the bare PoseNFS or a wrapper (DDP, DeepSpeed, torch.compile) around it. On
    the fused path the keypoints are put in the vectors' joint order, which leaves the mean over
    (n, j) unchanged. ``loss_fn`` is :func:`pose_loss` or a stand-in with its signature.
    """
    images = batch.image.to(setup.device, non_blocking=True)
    if setup.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    keypoints = batch.keypoints.to(setup.device, non_blocking=True)
    fused = setup.vector_joints is not None
    ctx = torch.autocast(setup.device.type, dtype=setup.autocast) if setup.autocast else nullcontext()
    with ctx:
        output = model(images, vectors=True) if fused else model(images)
    if fused:
        keypoints = keypoints.index_select(1, setup.vector_joints)
        prediction: torch.Tensor | JointVectors = JointVectors(output, setup.vector_dim)
    else:
        prediction = output.float()
    targets, weights = gaussian_targets(keypoints, tuple(output.shape[-2:]), setup.sigma)
    return loss_fn(prediction, targets, weights)
