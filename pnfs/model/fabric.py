"""Neural fabrics: layers of cells over the scales 1/4 .. 1/32 (paper §III-C, Fig. 4).

A :class:`Fabric` is a list of layers, each a list of scales; a node at scale 1/s has C*s
channels. Cell (s, l) reads the previous layer's outputs at s/2, s and 2s (see
:class:`pnfs.model.cell.Cell` for the transforms and the missing-neighbour rule). One alpha
[H(H+1)/2, |O|] is shared by all cells of the fabric; every cell has its own beta (paper §III-F a).

* Part subnetwork (:func:`part_fabric`): the last 3 layers of a 6-layer fabric whose first
  layer is the backbone pyramid: layer 1 at 1/4, 1/8, 1/16; layer 2 at 1/4, 1/8; layer 3 at
  1/4 (the part representation). 6 cells.
* Fabric backbone (:func:`backbone_fabric`): the first m layers of a fabric whose layer l
  (0-based) holds min(l+2, 4) cells from 1/4 downwards (m=4: 2+3+4+4 = 13 cells); the first
  layer reads the stem output (1/4) on all its inputs; the last layer is the pyramid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pnfs.model.cell import BETA_ORDER, Cell, edge_list

SCALES = (4, 8, 16, 32)


def cell_name(layer: int, scale: int) -> str:
    """``l1_s4``: layer (1-based) and scale denominator."""
    return f"l{layer}_s{scale}"


class Fabric(nn.Module):
    """Cells on ``layers`` (a list of scale lists) fed by inputs at ``input_scales``.

    ``forward(inputs: dict[scale, Tensor [N, C*s, H/s, W/s]]) -> dict[scale, Tensor]``: the
    outputs of the last layer, by scale.
    """

    def __init__(
        self,
        layers: Sequence[Sequence[int]],
        input_scales: Sequence[int],
        channels: int,
        hidden_nodes: int,
        ops: Sequence[str],
    ) -> None:
        super().__init__()
        self.layers = [list(scales) for scales in layers]
        self.ops = list(ops)
        self.hidden_nodes = hidden_nodes
        self.alpha = nn.Parameter(torch.zeros(len(edge_list(hidden_nodes)), len(ops)))
        self.cells = nn.ModuleDict()
        previous = set(input_scales)
        for layer, scales in enumerate(self.layers, start=1):
            for s in scales:
                self.cells[cell_name(layer, s)] = Cell(
                    channels * s,
                    hidden_nodes,
                    ops,
                    has_finer=s // 2 in previous,
                    has_same=s in previous,
                    has_coarser=s * 2 in previous,
                )
            previous = set(scales)

    def forward(self, inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        nodes = inputs
        for layer, scales in enumerate(self.layers, start=1):
            nodes = {
                s: self.cells[cell_name(layer, s)](
                    nodes.get(s // 2), nodes.get(s), nodes.get(s * 2), self.alpha
                )
                for s in scales
            }
        return nodes

    def architecture(self) -> dict:
        """softmax(alpha) rows [edge][op] and softmax(beta) per cell (finer, same, coarser)."""
        return {
            "ops": list(self.ops),
            "edges": [f"h{i}->h{j}" for i, j in edge_list(self.hidden_nodes)],
            "alpha": torch.softmax(self.alpha.detach().float(), dim=-1).tolist(),
            "beta_order": list(BETA_ORDER),
            "beta": {
                name: torch.softmax(cell.beta.detach().float(), dim=0).tolist()
                for name, cell in self.cells.items()
                if isinstance(cell, Cell) and cell.beta is not None
            },
        }


def part_fabric(channels: int, hidden_nodes: int, ops: Sequence[str]) -> Fabric:
    """The 6-cell part subnetwork on the 4-scale pyramid; its 1/4 output is the part representation."""
    return Fabric([[4, 8, 16], [4, 8], [4]], SCALES, channels, hidden_nodes, ops)


def backbone_layers(num_layers: int) -> list[list[int]]:
    """Scales of the first m layers of the backbone fabric: layer l holds min(l+2, 4) cells."""
    return [list(SCALES[: min(layer + 2, len(SCALES))]) for layer in range(num_layers)]


def backbone_fabric(channels: int, num_layers: int, hidden_nodes: int, ops: Sequence[str]) -> Fabric:
    """First m layers of a fabric fed by the stem output at 1/4 (4F channels)."""
    return Fabric(backbone_layers(num_layers), [4], channels, hidden_nodes, ops)
