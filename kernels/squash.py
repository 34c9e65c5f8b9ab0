"""Vector-in-pixel score: the length of the squashed vector, without a square root.

    vectors [N, J*d, H, W] -> scores [N, J, H, W],   score = n^2 / (1 + n^2),  n^2 = sum_t v_t^2

Channels j*d .. j*d+d-1 hold joint j's vector (paper eq. 6). The gradient is
2 v / (1 + n^2)^2 * g, exactly 0 at v = 0 (no sqrt, no epsilon).
"""

from __future__ import annotations

import torch


def squash_score_reference(vectors: torch.Tensor, d: int) -> torch.Tensor:
    """Eager PyTorch, accumulating n^2 in fp32, returning the input dtype."""
    n, c, h, w = vectors.shape
    if c % d:
        raise ValueError(f"squash_score: {c} channels are not a multiple of d={d}")
    n2 = vectors.float().reshape(n, c // d, d, h, w).square().sum(dim=2)
    return (n2 / (1.0 + n2)).to(vectors.dtype)


def squash_score(vectors: torch.Tensor, d: int) -> torch.Tensor:
    """[N, J*d, H, W] -> [N, J, H, W] scores in [0, 1)."""
    return squash_score_reference(vectors, d)
