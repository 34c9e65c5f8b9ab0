"""One part subnetwork of a PoseNFS: pyramid adapters, the 6-cell part fabric, the vector head
(docs/design.md §2, "Parts")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pnfs.kernels import squash_score
from pnfs.model.fabric import SCALES, part_fabric
from pnfs.model.head import VectorHead


def _adapter(c_in: int, c_out: int) -> nn.Module:
    """Pyramid level -> C*s channels: a bias-free 1x1 conv, or nothing when they already match."""
    return nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1, bias=False)


class PartNetwork(nn.Module):
    """One part: pyramid adapters, the 6-cell part fabric and its vector head."""

    def __init__(
        self,
        pyramid_channels: Sequence[int],
        channels: int,
        hidden_nodes: int,
        ops: Sequence[str],
        num_joints: int,
        vector_dim: int,
    ) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(_adapter(c, channels * s) for c, s in zip(pyramid_channels, SCALES))
        self.fabric = part_fabric(channels, hidden_nodes, ops)
        self.head = VectorHead(channels * SCALES[0], num_joints, vector_dim)

    def vectors(self, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        """pyramid levels [N, c_s, H/s, W/s] -> vectors [N, J_p*d, H/4, W/4]."""
        inputs = {s: adapt(x) for s, adapt, x in zip(SCALES, self.adapters, pyramid)}
        return self.head.vectors(self.fabric(inputs)[SCALES[0]])

    def forward(self, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        """pyramid levels [N, c_s, H/s, W/s] -> scores [N, J_p, H/4, W/4]."""
        return squash_score(self.vectors(pyramid), self.head.vector_dim)
