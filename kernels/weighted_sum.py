"""Fused weighted sum of same-shape tensors: the mixed-op sum of a cell node.

    out = act( sum_k w_k * x_k ),   act = ReLU or identity,  K <= 12

A hidden node h_j sums, over every edge i < j and every non-zero op o, the op output
weighted by |O| * softmax(alpha_(i,j))_o; the input node I sums the three scale-transformed
inputs weighted by 3 * softmax(beta) and applies ReLU. The weights arrive already softmaxed
and scaled, so the softmax Jacobian stays in PyTorch autograd.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MAX_INPUTS = 12


def weighted_sum_reference(
    inputs: Sequence[torch.Tensor], weights: torch.Tensor, relu: bool = False
) -> torch.Tensor:
    """Eager PyTorch: the fallback and the test oracle. ``weights``: [K]."""
    out = inputs[0] * weights[0]
    for k in range(1, len(inputs)):
        out = out + inputs[k] * weights[k]
    return torch.relu(out) if relu else out


def _check(inputs: Sequence[torch.Tensor], weights: torch.Tensor) -> None:
    if not 1 <= len(inputs) <= MAX_INPUTS:
        raise ValueError(f"weighted_sum takes 1..{MAX_INPUTS} inputs, got {len(inputs)}")
    if weights.shape != (len(inputs),):
        raise ValueError(f"weighted_sum: weights of shape {tuple(weights.shape)} for {len(inputs)} inputs")
    shape = inputs[0].shape
    for k, x in enumerate(inputs):
        if x.shape != shape:
            raise ValueError(f"weighted_sum: input {k} has shape {tuple(x.shape)}, input 0 {tuple(shape)}")


def weighted_sum(inputs: Sequence[torch.Tensor], weights: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """``act(sum_k weights[k] * inputs[k])`` over K same-shape tensors; ``weights``: [K]."""
    _check(inputs, weights)
    return weighted_sum_reference(inputs, weights, relu)
