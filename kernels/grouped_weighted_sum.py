"""Weighted sum with one weight vector per channel block: the mixed-op sum of P batched cells.

    out[:, p*c:(p+1)*c] = act( sum_k w[p, k] * x_k[:, p*c:(p+1)*c] ),   act = ReLU or identity

The P part fabrics of a batched PoseNFS (:mod:`pnfs.model.batched`) lay their nodes side by
side on the channel axis, part p on channels p*c .. p*c+c-1; each part has its own alpha and
betas, so a node's K weights differ per part: ``weights`` is [P, K] (already softmaxed and
scaled, as for :func:`pnfs.kernels.weighted_sum`). For P = 1 this is ``weighted_sum``.

The same elementwise products and the same left-to-right additions as
:func:`pnfs.kernels.weighted_sum_reference` run on each block, so a block's result is bit for bit
the per-part reference's; one launch per product and sum serves all P parts. Gradients come
from autograd (the weights' Jacobian sums each block's ``x_k * g``).
"""

from collections.abc import Sequence

import torch


def grouped_weighted_sum(
    inputs: Sequence[torch.Tensor], weights: torch.Tensor, relu: bool = False
) -> torch.Tensor:
    """``inputs``: K tensors [N, P*c, H, W] of one shape; ``weights``: [P, K] -> [N, P*c, H, W]."""
    parts, k = weights.shape
    if len(inputs) != k:
        raise ValueError(
            f"grouped_weighted_sum: {len(inputs)} inputs but weights of shape {list(weights.shape)}"
        )
    channels = inputs[0].shape[1]
    if channels % parts:
        raise ValueError(f"grouped_weighted_sum: {channels} channels do not split into {parts} parts")
    # [P, K] -> K per-channel weights [1, P*c, 1, 1] in the inputs' dtype (a 0-d weight takes it too)
    per_channel = weights.to(inputs[0].dtype).t().repeat_interleave(channels // parts, dim=1)
    w = per_channel.view(k, 1, channels, 1, 1).unbind(0)
    out = inputs[0] * w[0]
    for x, wk in zip(inputs[1:], w[1:]):
        out = out + x * wk
    return torch.relu(out) if relu else out
