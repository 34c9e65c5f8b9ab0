"""Vector-in-pixel head (paper §III-D, eq. 4; docs/design.md §2).

A part representation [N, 4C, H/4, W/4] -> ReLU -> conv1x1 with bias -> vectors
[N, J_p*d, H/4, W/4]; channels j*d .. j*d+d-1 are joint j's vector v. The score
|v_s| = n^2 / (1 + n^2), n^2 = sum_t v_t^2, comes from :func:`pnfs.kernels.squash_score`.
d = 1 is the scalar-heatmap baseline.
"""

from __future__ import annotations

import torch
from torch import nn

from pnfs.kernels import squash_score


class VectorHead(nn.Module):
    """Part representation [N, in, h, w] -> J joints' d-vectors -> scores [N, J, h, w] in [0, 1)."""

    def __init__(self, in_channels: int, num_joints: int, vector_dim: int) -> None:
        super().__init__()
        self.vector_dim = vector_dim
        self.relu = nn.ReLU(inplace=False)
        self.conv = nn.Conv2d(in_channels, num_joints * vector_dim, 1, bias=True)

    def vectors(self, x: torch.Tensor) -> torch.Tensor:
        """[N, in, h, w] -> [N, J*d, h, w]."""
        return self.conv(self.relu(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, in, h, w] -> scores [N, J, h, w] in [0, 1)."""
        return squash_score(self.vectors(x), self.vector_dim)
