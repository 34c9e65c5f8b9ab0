"""One cell of a neural fabric (paper §III-B, Fig. 3; docs/design.md §2).

Cell (s, l) at scale 1/s with c = C*s channels receives the previous layer's outputs at
the next finer scale O_{s/2}, the same scale O_s and the next coarser scale O_{2s}:

    T_finer   = BN(conv3x3 stride 2 (c/2 -> c))          (finer -> this; channels doubled)
    T_same    = identity
    T_coarser = bilinear x2 (align_corners=True) of BN(conv1x1 (2c -> c))   (channels halved)

The paper writes the down-sampling as Conv-BN-ReLU; docs/design.md §2 (the authors' build) has no
ReLU there -- the ReLU of the input node follows the mix -- and we follow the authors' build.

Missing neighbours ("we copy one of candidate inputs", paper footnote 2): each of the three
slots (finer, same, coarser) reads an input and applies the transform that input's scale
needs. A slot whose input is missing reads a copy of the same-scale input (fabric borders:
1/4 has no finer, 1/32 no coarser neighbour); in a cell at a scale the previous layer lacks
(the Fabric backbone's new deepest scale in layers 1..3), every slot reads a copy of the
finer input, each through its *own* stride-2 conv + BN. Own convs keep beta a real choice
(with one shared transform softmax(beta) would sum to 1 and beta would get no gradient) and
they reproduce the paper's Fabric backbone sizes (F=10, m=4: 6.8M in its counting).
A cell whose three slots all read the same tensor unchanged (the first Fabric-backbone layer
at 1/4 reads only the stem) has nothing to choose: it has no beta and I = ReLU(3 * O).

    I   = h_0 = ReLU(3 * sum_i softmax(beta)_i * T_i(O_i))           i in (finer, same, coarser)
    h_j = sum_{i<j} |O| * sum_{o != zero} softmax(alpha_(i,j))_o * o(h_i),   j = 1..H
    O   = conv1x1 with bias (concat(h_1..h_H): H*c -> c)                no BN / ReLU

These are the paper's eq. (2) (input node), eq. (1) (hidden nodes) and the output node of
eq. (3). The factors 3 and |O| and the ReLU after the mix are docs/design.md §2 facts of the authors'
build: the factors make the uniform initialisation (alpha = beta = 0) a plain sum.
``zero`` keeps its column in the softmax but is never computed. Each node is one call of
:func:`pnfs.kernels.weighted_sum`. Edges are ordered (0,1), (0,2), (1,2), (0,3), ... i.e.
row ``e`` of alpha is edge ``edge_list(H)[e]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pnfs.kernels import weighted_sum
from pnfs.kernels.weighted_sum import MAX_INPUTS
from pnfs.model.ops import ZERO, build_op

BETA_ORDER = ("finer", "same", "coarser")


def edge_list(hidden_nodes: int) -> list[tuple[int, int]]:
    """Edges (i, j), i < j, of a cell with H hidden nodes, in alpha's row order."""
    return [(i, j) for j in range(1, hidden_nodes + 1) for i in range(j)]


class Downsample(nn.Sequential):
    """finer -> this scale: conv3x3 stride 2 (c_in -> c_out) + BN: [N, c_in, 2h, 2w] -> [N, c_out, h, w]
    (``groups`` independent channel blocks: the parts of a batched fabric)."""

    def __init__(self, c_in: int, c_out: int, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, groups=groups, bias=False), nn.BatchNorm2d(c_out)
        )


class Upsample(nn.Module):
    """coarser -> this scale: conv1x1 (c_in -> c_out) + BN, then bilinear x2, align_corners=True:
    [N, c_in, h, w] -> [N, c_out, 2h, 2w] (``groups`` as in :class:`Downsample`)."""

    def __init__(self, c_in: int, c_out: int, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.bn(self.conv(x)), scale_factor=2.0, mode="bilinear", align_corners=True)


def _weighted_sum(terms: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_k w_k x_k in one kernel call; more terms than the kernel takes (large H with many
    ops) go in chunks of ``MAX_INPUTS``. A hidden node has no ReLU (the input node's is fused
    into its own ``weighted_sum`` call)."""
    if len(terms) <= MAX_INPUTS:
        return weighted_sum(terms, weights)
    chunks = [
        weighted_sum(terms[k : k + MAX_INPUTS], weights[k : k + MAX_INPUTS])
        for k in range(0, len(terms), MAX_INPUTS)
    ]
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


class Cell(nn.Module):
    """A cell with ``hidden_nodes`` hidden nodes over ``ops`` on ``channels`` channels.

    Args:
        channels: c, the node channels at this scale.
        hidden_nodes: H.
        ops: the candidate op names O (``zero`` allowed); alpha has ``len(ops)`` columns.
        has_finer, has_same, has_coarser: which neighbours the previous layer has
            (finer: c/2 channels at twice the size; coarser: 2c channels at half the size).

    ``forward(finer, same, coarser, alpha)``: inputs [N, c/2, 2h, 2w], [N, c, h, w],
    [N, 2c, h/2, w/2] (None where absent), alpha [H(H+1)/2, |O|] owned by the fabric;
    returns [N, c, h, w]. ``beta`` [3] (finer, same, coarser slots) is the cell's own
    parameter (None when all slots read the same tensor, see the module docstring).
    """

    def __init__(
        self,
        channels: int,
        hidden_nodes: int,
        ops: Sequence[str],
        has_finer: bool,
        has_same: bool,
        has_coarser: bool,
    ) -> None:
        super().__init__()
        if not (has_same or has_finer):
            raise ValueError("a cell needs a same-scale or a finer input")
        same_source = "same" if has_same else "finer"
        self.sources = {
            "finer": "finer" if has_finer else same_source,
            "same": same_source,
            "coarser": "coarser" if has_coarser else same_source,
        }
        transform: dict[str, Callable[[], nn.Module]] = {
            "finer": lambda: Downsample(channels // 2, channels),
            "same": nn.Identity,
            "coarser": lambda: Upsample(channels * 2, channels),
        }
        self.transforms = nn.ModuleDict({slot: transform[self.sources[slot]]() for slot in BETA_ORDER})
        single_input = all(src == "same" for src in self.sources.values())
        self.beta = None if single_input else nn.Parameter(torch.zeros(len(BETA_ORDER)))
        self.hidden_nodes = hidden_nodes
        self.num_ops = len(ops)
        self.op_columns = [k for k, name in enumerate(ops) if name != ZERO]
        self.edges = edge_list(hidden_nodes)
        self.edge_ops = nn.ModuleList(
            nn.ModuleList(build_op(ops[k], channels) for k in self.op_columns) for _ in self.edges
        )
        self.output = nn.Conv2d(hidden_nodes * channels, channels, 1, bias=True)

    def input_node(
        self, finer: torch.Tensor | None, same: torch.Tensor | None, coarser: torch.Tensor | None
    ) -> torch.Tensor:
        """I = ReLU(3 * sum_i softmax(beta)_i T_i(O_i)) over the (finer, same, coarser) slots."""
        given = {"finer": finer, "same": same, "coarser": coarser}
        if self.beta is None:
            if same is None:
                raise ValueError("Cell.input_node: this cell reads only 'same', which is None")
            return torch.relu(3.0 * same)
        inputs = [self.transforms[slot](given[self.sources[slot]]) for slot in BETA_ORDER]
        return weighted_sum(inputs, 3.0 * torch.softmax(self.beta, dim=0), relu=True)

    def forward(
        self,
        finer: torch.Tensor | None,
        same: torch.Tensor | None,
        coarser: torch.Tensor | None,
        alpha: torch.Tensor,
    ) -> torch.Tensor:
        nodes = [self.input_node(finer, same, coarser)]
        weights = (self.num_ops * torch.softmax(alpha, dim=-1))[:, self.op_columns]  # zero dropped
        for j in range(1, self.hidden_nodes + 1):
            terms, term_weights = [], []
            for e, (i, jj) in enumerate(self.edges):
                if jj == j:
                    edge_ops = self.edge_ops[e]
                    assert isinstance(edge_ops, nn.ModuleList)  # built so in __init__
                    terms += [op(nodes[i]) for op in edge_ops]
                    term_weights.append(weights[e])
            nodes.append(_weighted_sum(terms, torch.cat(term_weights)))
        return self.output(torch.cat(nodes[1:], dim=1))
