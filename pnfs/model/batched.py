"""The P part subnetworks of a PoseNFS run as one batched fabric (docs/design.md §2, "Batched parts").

Every part has the same structure (adapters, 6-cell part fabric, head); only the weights, the
alphas, the betas and the head's joint count differ. :class:`BatchedParts` lays the P parts side
by side on the channel axis -- part p of a node at scale 1/s holds channels p*C*s .. (p+1)*C*s-1
of a [N, P*C*s, H/s, W/s] tensor -- so that each conv, BN and weighted sum runs once for all parts:

* adapters: one 1x1 conv c_in -> P*C*s (the pyramid is the same for every part); a level whose
  channels already match is repeated P times;
* cell transforms and op convs: grouped convs, ``groups = P`` (the depthwise ones stay per channel);
  BNs over P*c channels (per-channel statistics, so P BNs exactly);
* the nodes' mixed sums: :func:`pnfs.kernels.grouped_weighted_sum` with part p's weights on its block
  (alpha [P, E, |O|] per fabric, beta [P, 3] per cell);
* output node: the grouped 1x1 conv over each part's concat(h_1..h_H);
* head: ReLU, then the parts' 1x1 convs as one block-diagonal conv ([sum_p J_p*d, P*4C]).

Nothing about the math changes, only the layout: the state dict holds the per-part model's keys
and tensors (``parts.{p}.…``), converted on save and on load (:class:`BatchedParts`), so
checkpoints, parameter counts and the exported architecture are those of the per-part model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pnfs.kernels.grouped_weighted_sum import grouped_weighted_sum
from pnfs.kernels.weighted_sum import MAX_INPUTS
from pnfs.model.cell import BETA_ORDER, Downsample, Upsample, edge_list
from pnfs.model.fabric import SCALES, cell_name
from pnfs.model.ops import ZERO, build_op
from pnfs.model.part import PartNetwork

PART_LAYERS = ([4, 8, 16], [4, 8], [4])  # the part fabric's layers (pnfs.model.fabric.part_fabric)


def _mixed_sum(terms: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_k w[p, k] x_k per part block, in chunks of ``MAX_INPUTS`` like the per-part cell."""
    chunks = [
        grouped_weighted_sum(terms[k : k + MAX_INPUTS], weights[:, k : k + MAX_INPUTS])
        for k in range(0, len(terms), MAX_INPUTS)
    ]
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


class BatchedCell(nn.Module):
    """P cells (:class:`pnfs.model.cell.Cell`) of one fabric position on P*c channels.

    ``forward(finer, same, coarser, edge_weights)``: inputs [N, P*c/2, 2h, 2w], [N, P*c, h, w],
    [N, 2*P*c, h/2, w/2] (None where absent), edge_weights [P, H(H+1)/2, |O| - 1] (|O| softmax(alpha)
    less the ``zero`` column, computed once per fabric); returns [N, P*c, h, w]. ``beta`` [P, 3].
    Submodule names are the Cell's.
    """

    def __init__(
        self,
        parts: int,
        channels: int,
        hidden_nodes: int,
        ops: Sequence[str],
        has_finer: bool,
        has_same: bool,
        has_coarser: bool,
    ) -> None:
        super().__init__()
        if not has_same:
            raise ValueError("a part-fabric cell has a same-scale input")
        self.parts = parts
        self.sources = {
            "finer": "finer" if has_finer else "same",
            "same": "same",
            "coarser": "coarser" if has_coarser else "same",
        }
        c = parts * channels
        transform: dict[str, Callable[[], nn.Module]] = {
            "finer": lambda: Downsample(c // 2, c, groups=parts),
            "same": nn.Identity,
            "coarser": lambda: Upsample(c * 2, c, groups=parts),
        }
        self.transforms = nn.ModuleDict({slot: transform[self.sources[slot]]() for slot in BETA_ORDER})
        self.beta = nn.Parameter(torch.zeros(parts, len(BETA_ORDER)))
        self.hidden_nodes = hidden_nodes
        self.edges = edge_list(hidden_nodes)
        self.edge_ops = nn.ModuleList(
            nn.ModuleList(build_op(name, c, groups=parts) for name in ops if name != ZERO) for _ in self.edges
        )
        self.output = nn.Conv2d(hidden_nodes * c, c, 1, groups=parts, bias=True)

    def forward(
        self,
        finer: torch.Tensor | None,
        same: torch.Tensor | None,
        coarser: torch.Tensor | None,
        edge_weights: torch.Tensor,
    ) -> torch.Tensor:
        given = {"finer": finer, "same": same, "coarser": coarser}
        inputs = [self.transforms[slot](given[self.sources[slot]]) for slot in BETA_ORDER]
        nodes = [grouped_weighted_sum(inputs, 3.0 * torch.softmax(self.beta, dim=1), relu=True)]
        for j in range(1, self.hidden_nodes + 1):
            terms, term_weights = [], []
            for e, (i, jj) in enumerate(self.edges):
                if jj == j:
                    edge_ops = self.edge_ops[e]
                    assert isinstance(edge_ops, nn.ModuleList)  # built so in __init__
                    terms += [op(nodes[i]) for op in edge_ops]
                    term_weights.append(edge_weights[:, e])
            nodes.append(_mixed_sum(terms, torch.cat(term_weights, dim=1)))
        if self.hidden_nodes == 1:
            return self.output(nodes[1])
        # each part's group of the output conv reads its own concat(h_1..h_H): part-major channels
        hidden = torch.cat([h.unflatten(1, (self.parts, -1)) for h in nodes[1:]], dim=2)
        return self.output(hidden.flatten(1, 2))


class BatchedFabric(nn.Module):
    """The P part fabrics (:func:`pnfs.model.fabric.part_fabric`) as one: alpha [P, E, |O|],
    cells :class:`BatchedCell` by the same names; ``forward`` as :class:`pnfs.model.fabric.Fabric`."""

    def __init__(self, parts: int, channels: int, hidden_nodes: int, ops: Sequence[str]) -> None:
        super().__init__()
        self.layers = [list(scales) for scales in PART_LAYERS]
        self.ops = list(ops)
        self.hidden_nodes = hidden_nodes
        self.alpha = nn.Parameter(torch.zeros(parts, len(edge_list(hidden_nodes)), len(ops)))
        kept = [k for k, name in enumerate(ops) if name != ZERO]
        contiguous = kept == list(range(kept[0], kept[-1] + 1))
        self.op_columns = slice(kept[0], kept[-1] + 1) if contiguous else kept  # zero dropped
        self.cells = nn.ModuleDict()
        previous = set(SCALES)
        for layer, scales in enumerate(self.layers, start=1):
            for s in scales:
                self.cells[cell_name(layer, s)] = BatchedCell(
                    parts,
                    channels * s,
                    hidden_nodes,
                    ops,
                    has_finer=s // 2 in previous,
                    has_same=s in previous,
                    has_coarser=s * 2 in previous,
                )
            previous = set(scales)

    def forward(self, inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        edge_weights = (len(self.ops) * torch.softmax(self.alpha, dim=-1))[:, :, self.op_columns]
        nodes = inputs
        for layer, scales in enumerate(self.layers, start=1):
            nodes = {
                s: self.cells[cell_name(layer, s)](
                    nodes.get(s // 2), nodes.get(s), nodes.get(s * 2), edge_weights
                )
                for s in scales
            }
        return nodes

    def architecture(self, part: int) -> dict:
        """Part ``part``'s entry, as :meth:`pnfs.model.fabric.Fabric.architecture` gives it."""
        return {
            "ops": list(self.ops),
            "edges": [f"h{i}->h{j}" for i, j in edge_list(self.hidden_nodes)],
            "alpha": torch.softmax(self.alpha[part].detach().float(), dim=-1).tolist(),
            "beta_order": list(BETA_ORDER),
            "beta": {
                name: torch.softmax(cell.beta[part].detach().float(), dim=0).tolist()
                for name, cell in self.cells.items()
                if isinstance(cell, BatchedCell)  # every cell is (built so in __init__)
            },
        }


class Replicate(nn.Module):
    """A pyramid level that needs no adapter, copied for each of P parts: [N, c, h, w] -> [N, P*c, h, w]."""

    def __init__(self, parts: int) -> None:
        super().__init__()
        self.parts = parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(1, self.parts, 1, 1)


class BlockDiagonalConv(nn.Conv2d):
    """The parts' head convs as one: [N, P*c_in, h, w] -> [N, sum_p J_p*d, h, w], part p's output
    channels reading only its input block. ``weight`` [sum_p J_p*d, c_in, 1, 1] and ``bias`` are the
    parts' conv weights stacked in part order (a 1x1 ``Conv2d(c_in, sum_p J_p*d)``, so the paper's
    counting in :mod:`pnfs.summary` sees the per-part heads' parameters and multiply-adds). With equal
    J_p it runs as a grouped conv, otherwise over the block-diagonal [sum_p J_p*d, P*c_in]."""

    mask: torch.Tensor  # buffer [sum_p J_p*d, P*c_in, 1, 1]

    def __init__(self, in_channels: int, out_channels: Sequence[int]) -> None:
        super().__init__(in_channels, sum(out_channels), 1, bias=True)
        self.parts = len(out_channels)
        blocks = [torch.ones(o, in_channels) for o in out_channels]
        self.register_buffer("mask", torch.block_diag(*blocks)[:, :, None, None], persistent=False)
        self.grouped = len(set(out_channels)) == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grouped:
            return F.conv2d(x, self.weight, self.bias, groups=self.parts)
        return F.conv2d(x, self.weight.repeat(1, self.parts, 1, 1) * self.mask, self.bias)


class BatchedHead(nn.Module):
    """The parts' vector heads (:class:`pnfs.model.head.VectorHead`): [N, P*4C, h, w] -> ReLU ->
    :class:`BlockDiagonalConv` -> vectors [N, sum_p J_p*d, h, w], the parts' vectors in part order."""

    def __init__(self, in_channels: int, joints: Sequence[int], vector_dim: int) -> None:
        super().__init__()
        self.vector_dim = vector_dim
        self.relu = nn.ReLU(inplace=False)
        self.conv = BlockDiagonalConv(in_channels, [j * vector_dim for j in joints])

    def vectors(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.relu(x))


class Piece(NamedTuple):
    """How one per-part state tensor sits in its batched tensor: ``stacked`` (a new leading part
    axis: alpha, beta), ``shared`` (one value for all parts: BN's ``num_batches_tracked``) or
    concatenated along dim 0 in blocks of ``sizes`` (conv weights, biases, BN statistics)."""

    stacked: bool
    shared: bool
    sizes: tuple[int, ...]


class BatchedParts(nn.Module):
    """The P :class:`pnfs.model.part.PartNetwork` of a PoseNFS as one network.

    ``vectors(pyramid)``: pyramid levels [N, c_s, H/s, W/s] -> [N, sum_p J_p*d, H/4, W/4], equal to
    the per-part networks' vectors concatenated in part order.

    State dict: written with the per-part keys (``{p}.adapters.0.weight`` under this module's
    prefix) and tensors, and read from them, so that a per-part model and a batched one load each
    other's checkpoints.
    """

    def __init__(
        self,
        pyramid_channels: Sequence[int],
        channels: int,
        hidden_nodes: int,
        ops: Sequence[str],
        part_joint_counts: Sequence[int],
        vector_dim: int,
    ) -> None:
        super().__init__()
        # the per-part networks first, drawing their initial weights as a per-part PoseNFS does
        templates = [
            PartNetwork(pyramid_channels, channels, hidden_nodes, ops, j, vector_dim).state_dict()
            for j in part_joint_counts
        ]
        parts = len(part_joint_counts)
        self.num_parts = parts
        with torch.random.fork_rng(devices=[]):  # the batched layout's own draws leave the RNG as it was
            self.adapters = nn.ModuleList(
                Replicate(parts) if c == channels * s else nn.Conv2d(c, parts * channels * s, 1, bias=False)
                for c, s in zip(pyramid_channels, SCALES)
            )
            self.fabric = BatchedFabric(parts, channels, hidden_nodes, ops)
            self.head = BatchedHead(channels * SCALES[0], part_joint_counts, vector_dim)
        batched = self.state_dict()
        self.part_keys = list(templates[0])
        self.part_shapes = [{k: t.shape for k, t in template.items()} for template in templates]
        self.pieces = {
            key: Piece(
                stacked=batched[key].dim() == templates[0][key].dim() + 1,
                shared=templates[0][key].dim() == 0,
                sizes=tuple(t[key].shape[0] if t[key].dim() else 1 for t in templates),
            )
            for key in self.part_keys
        }
        self._register_state_dict_hook(BatchedParts._to_part_keys)
        self._register_load_state_dict_pre_hook(BatchedParts._from_part_keys, with_module=True)
        self.load_state_dict(
            {f"{p}.{k}": t for p, template in enumerate(templates) for k, t in template.items()}
        )

    def __iter__(self):
        raise TypeError(
            "the parts of this PoseNFS are batched (model.batched_parts); for one part at a time "
            "take model.with_part_layout(False)"
        )

    def vectors(self, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        inputs = {s: adapt(x) for s, adapt, x in zip(SCALES, self.adapters, pyramid)}
        return self.head.vectors(self.fabric(inputs)[SCALES[0]])

    def _split(self, key: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        piece = self.pieces[key]
        if piece.stacked:
            parts = list(tensor.unbind(0))
        elif piece.shared:
            parts = [tensor] * self.num_parts
        else:
            parts = list(tensor.split(list(piece.sizes), dim=0))
        return [p.clone() for p in parts]

    def _join(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        piece = self.pieces[key]
        if piece.stacked:
            return torch.stack(tensors)
        if piece.shared:
            return tensors[0]
        return torch.cat(tensors)

    @staticmethod
    def _to_part_keys(module: BatchedParts, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        """state_dict hook: batched tensors -> per-part keys, in the per-part model's key order."""
        split = {key: module._split(key, state_dict.pop(prefix + key)) for key in module.part_keys}
        for p in range(module.num_parts):
            for key in module.part_keys:
                state_dict[f"{prefix}{p}.{key}"] = split[key][p]

    @staticmethod
    def _from_part_keys(
        module: BatchedParts,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        """load_state_dict pre-hook: per-part keys -> batched tensors. A part's key that is missing
        is left to load_state_dict to report; a part's tensor of the wrong shape is reported under
        its per-part key, as load_state_dict reports a size mismatch (and load_state_dict raises)."""
        for key in module.part_keys:
            names = [f"{prefix}{p}.{key}" for p in range(module.num_parts)]
            if not all(name in state_dict for name in names):
                continue
            tensors = [state_dict.pop(name) for name in names]
            wrong = [
                (name, t.shape, shapes[key])
                for name, t, shapes in zip(names, tensors, module.part_shapes)
                if t.shape != shapes[key]
            ]
            if wrong:
                name, got, expected = wrong[0]
                error_msgs.append(
                    f"size mismatch for {name}: copying a param with shape {got} from checkpoint, "
                    f"the shape in current model is {expected}."
                )
                owner, _, attr = key.rpartition(".")
                state_dict[prefix + key] = getattr(module.get_submodule(owner), attr).detach()  # not missing
                continue
            state_dict[prefix + key] = module._join(key, tensors)
