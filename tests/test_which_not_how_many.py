"""Selections checked by identity (issue 26): which ops pruning keeps on each edge, against
lists written out by hand from the softmax weights set in the test."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pnfs.config import load_config
from pnfs.deploy import Scale, freeze
from pnfs.model import build_model

OPS = ["zero", "skip_connect", "sep_conv_3x3", "dil_conv_3x3"]  # model.ops, alpha's column order

# softmax(alpha) of each edge (rows sum to 1), and by hand what survives each threshold:
# an op stays when its weight >= the threshold; the strongest op of an edge always stays;
# zero is never built.
ROWS = [
    [0.10, 0.50, 0.15, 0.25],
    [0.05, 0.15, 0.60, 0.20],
    [0.40, 0.10, 0.20, 0.30],  # zero is the strongest: the strongest *built* op is dil_conv
]
KEPT = {
    0.0: [{"skip_connect", "sep_conv_3x3", "dil_conv_3x3"}] * 3,
    0.18: [
        {"skip_connect", "dil_conv_3x3"},
        {"sep_conv_3x3", "dil_conv_3x3"},
        {"sep_conv_3x3", "dil_conv_3x3"},
    ],
    0.22: [{"skip_connect", "dil_conv_3x3"}, {"sep_conv_3x3"}, {"dil_conv_3x3"}],
    0.55: [{"skip_connect"}, {"sep_conv_3x3"}, {"dil_conv_3x3"}],
}


def op_name(frozen_op: nn.Module) -> str:
    """What a frozen edge op was, read from its modules (not from the code under test's lists)."""
    if isinstance(frozen_op, Scale):
        return "skip_connect"
    convs = [m for m in frozen_op.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    if [c.dilation for c in convs] == [(2, 2)]:
        return "dil_conv_3x3"
    if len(convs) == 2 and all(c.dilation == (1, 1) for c in convs):
        return "sep_conv_3x3"
    raise AssertionError(f"unknown frozen op {frozen_op}")


def model_with_rows(rows: list[list[float]]) -> nn.Module:
    """The demo model with H=2 (three edges per cell); edge e of every head's fabric gets ``rows[e]``."""
    cfg = load_config("demo", ["data.input_size=[64,64]", "model.hidden_nodes=2"])
    assert cfg.model.ops == OPS
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    for part in model.parts:
        part.fabric.alpha.data = torch.tensor([[math.log(w) for w in row] for row in rows])
    return model


def kept_ops(frozen: nn.Module) -> list[list[set[str]]]:
    """Per frozen cell of the heads' fabrics, per edge (in alpha's row order), the op names kept."""
    cells = []
    for part in frozen.parts:
        for cell in part.fabric.cells.values():
            by_edge = []
            for j, (sources, ops) in enumerate(zip(cell.inputs_of, cell.ops), start=1):
                for i in range(j):  # edges (0,1), (0,2), (1,2): alpha's row order
                    by_edge.append({op_name(op) for src, op in zip(sources, ops) if src == i})
            cells.append(by_edge)
    return cells


@pytest.mark.parametrize("threshold", sorted(KEPT))
def test_pruning_keeps_the_ops_written_out_by_hand(threshold):
    frozen = freeze(model_with_rows(ROWS), prune_below=threshold)
    cells = kept_ops(frozen)
    assert len(cells) > 1
    for by_edge in cells:
        assert by_edge == KEPT[threshold]


def test_an_op_exactly_at_the_threshold_stays_and_one_just_above_it_goes():
    model = model_with_rows(ROWS)
    # the weight pruning compares: softmax of alpha in float64, as freeze computes it
    alpha = model.parts[0].fabric.alpha
    w = float(torch.softmax(alpha.detach().double(), dim=-1)[0, OPS.index("dil_conv_3x3")])  # ~0.25
    for threshold, dil_kept in ((math.nextafter(w, 0), True), (w, True), (math.nextafter(w, 1), False)):
        first_edges = [by_edge[0] for by_edge in kept_ops(freeze(model, prune_below=threshold))]
        assert all(("dil_conv_3x3" in ops) == dil_kept for ops in first_edges), threshold
        assert all(ops >= {"skip_connect"} for ops in first_edges)
