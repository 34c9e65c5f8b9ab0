"""The cell, its ops and the fabrics, checked against the formulas of docs/design.md §2."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pnfs.model.cell as cell_module
from pnfs.config import ALL_OPS, SUBNETWORK_OPS
from pnfs.model.cell import Cell, Downsample, Upsample, edge_list
from pnfs.model.fabric import backbone_fabric, cell_name, part_fabric
from pnfs.model.ops import DilConv, PoolBN, SepConv, build_op

C = 8  # node channels of the test cell (scale 1/s with C*s = 8)


def _inputs(n: int = 2, h: int = 8, w: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.randn(n, C // 2, 2 * h, 2 * w),
        torch.randn(n, C, h, w),
        torch.randn(n, 2 * C, h // 2, w // 2),
    )


@pytest.mark.parametrize("name", [op for op in ALL_OPS if op != "zero"])
def test_every_op_keeps_shape(name):
    x = torch.randn(2, C, 7, 5)
    assert build_op(name, C)(x).shape == x.shape


def test_op_structure_follows_design():
    sep = [type(m) for m in SepConv(C)]
    block = [nn.Conv2d, nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert sep == block * 2
    assert [type(m) for m in DilConv(C)] == block
    assert DilConv(C)[0].dilation == (2, 2) and DilConv(C)[0].groups == C
    assert all(not bn.affine for m in (SepConv(C), DilConv(C)) for bn in m if isinstance(bn, nn.BatchNorm2d))
    avg = build_op("avg_pool_3x3", C)
    assert isinstance(avg, PoolBN) and avg[0].count_include_pad is False and not avg[1].affine
    assert isinstance(build_op("max_pool_3x3", C)[0], nn.MaxPool2d)
    assert isinstance(build_op("skip_connect", C), nn.Identity)


def test_unknown_op_is_rejected():
    with pytest.raises(ValueError, match="conv_7x7"):
        build_op("conv_7x7", C)


def test_zero_is_never_built():
    cell = Cell(C, 2, SUBNETWORK_OPS, True, True, True)
    assert all(len(ops) == len(SUBNETWORK_OPS) - 1 for ops in cell.edge_ops)
    assert cell.op_columns == [1, 2, 3]


def test_uniform_cell_is_the_plain_sum_of_ops_and_inputs():
    """alpha = beta = 0: I = ReLU(T_f + O_s + T_c); h_j = sum_{i<j} (h_i + sep(h_i) + dil(h_i))."""
    cell = Cell(C, 2, SUBNETWORK_OPS, True, True, True).eval()
    alpha = torch.zeros(3, len(SUBNETWORK_OPS))
    finer, same, coarser = _inputs()
    with torch.no_grad():
        out = cell(finer, same, coarser, alpha)
        node0 = torch.relu(cell.transforms["finer"](finer) + same + cell.transforms["coarser"](coarser))

        def edge(e: int, x: torch.Tensor) -> torch.Tensor:
            skip, sep, dil = cell.edge_ops[e]
            return skip(x) + sep(x) + dil(x)

        node1 = edge(0, node0)  # edge h0->h1
        node2 = edge(1, node0) + edge(2, node1)  # edges h0->h2, h1->h2
        expected = cell.output(torch.cat([node1, node2], dim=1))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_cell_follows_the_weighted_formula():
    """I = ReLU(3 sum softmax(beta)_i T_i); h_1 = |O| sum_o softmax(alpha)_o o(I), zero adds nothing."""
    cell = Cell(C, 1, SUBNETWORK_OPS, True, True, True).eval()
    with torch.no_grad():
        cell.beta.copy_(torch.tensor([0.3, -1.0, 2.0]))
    alpha = torch.tensor([[1.5, -0.2, 0.4, 0.9]])
    finer, same, coarser = _inputs()
    with torch.no_grad():
        b = torch.softmax(cell.beta, 0)
        node0 = torch.relu(
            3
            * (
                b[0] * cell.transforms["finer"](finer)
                + b[1] * same
                + b[2] * cell.transforms["coarser"](coarser)
            )
        )
        a = 4 * torch.softmax(alpha[0], 0)
        skip, sep, dil = cell.edge_ops[0]
        node1 = a[1] * skip(node0) + a[2] * sep(node0) + a[3] * dil(node0)
        torch.testing.assert_close(
            cell(finer, same, coarser, alpha), cell.output(node1), rtol=1e-5, atol=1e-5
        )


def test_each_node_is_one_weighted_sum_call(monkeypatch):
    calls = []
    original = cell_module.weighted_sum

    def counting(inputs, weights, relu=False):
        calls.append((len(inputs), relu))
        return original(inputs, weights, relu=relu)

    monkeypatch.setattr(cell_module, "weighted_sum", counting)
    cell = Cell(C, 3, SUBNETWORK_OPS, True, True, True)
    cell(*_inputs(), torch.zeros(6, 4))
    # input node (3 inputs, ReLU), then h1, h2, h3 with 1, 2, 3 edges of 3 non-zero ops
    assert calls == [(3, True), (3, False), (6, False), (9, False)]


def test_many_terms_are_summed_in_chunks():
    """H=3 over six ops gives 15 terms into h3 (3 edges x 5 non-zero ops), more than one kernel
    call takes; its value is the n_terms=15 case below."""
    nonzero = [op for op in ALL_OPS if op != "zero"]
    assert 3 * len(nonzero) == 15 > cell_module.MAX_INPUTS
    cell = Cell(C, 3, ALL_OPS, True, True, True).eval()
    assert cell(*_inputs(), torch.zeros(6, len(ALL_OPS))).shape == (2, C, 8, 6)


@pytest.mark.parametrize("n_terms", [1, 12, 13, 15, 24, 25])
def test_weighted_sum_of_any_number_of_terms_is_the_plain_sum(n_terms):
    """Up to MAX_INPUTS (12) terms, H=3's 15, and just past each chunk boundary: the chunked
    sum equals the unchunked float64 sum, no term lost or doubled."""
    terms = [torch.randn(2, C, 8, 6) for _ in range(n_terms)]
    weights = torch.randn(n_terms)
    expected = sum(w * t for w, t in zip(weights.double(), (t.double() for t in terms)))
    torch.testing.assert_close(
        cell_module._weighted_sum(terms, weights).double(), expected, rtol=1e-5, atol=1e-5
    )


def test_a_cell_without_same_or_finer_input_is_refused():
    with pytest.raises(ValueError, match="a cell needs a same-scale or a finer input"):
        Cell(C, 2, ALL_OPS, has_finer=False, has_same=False, has_coarser=True)


def test_transforms_follow_design():
    cell = Cell(C, 1, SUBNETWORK_OPS, True, True, True)
    down, up = cell.transforms["finer"], cell.transforms["coarser"]
    assert isinstance(down, Downsample) and down[0].stride == (2, 2) and down[0].kernel_size == (3, 3)
    assert (down[0].in_channels, down[0].out_channels) == (C // 2, C)
    assert isinstance(up, Upsample) and up.conv.kernel_size == (1, 1)
    assert (up.conv.in_channels, up.conv.out_channels) == (2 * C, C)
    assert isinstance(cell.transforms["same"], nn.Identity)
    x = torch.randn(1, 2 * C, 3, 4)
    up.eval()
    expected = nn.functional.interpolate(
        up.bn(up.conv(x)), scale_factor=2, mode="bilinear", align_corners=True
    )
    torch.testing.assert_close(up(x), expected)


def test_missing_neighbours_read_the_same_scale_input():
    """Border cell at 1/4 (no finer input): the finer slot reads the same-scale input."""
    cell = Cell(C, 1, SUBNETWORK_OPS, False, True, True).eval()
    assert cell.sources == {"finer": "same", "same": "same", "coarser": "coarser"}
    _, same, coarser = _inputs()
    with torch.no_grad():
        expected = torch.relu(same + same + cell.transforms["coarser"](coarser))
        torch.testing.assert_close(cell.input_node(None, same, coarser), expected)


def test_new_scale_cell_reads_the_finer_input_through_three_own_convs():
    cell = Cell(C, 1, ALL_OPS, True, False, False)
    assert cell.sources == {"finer": "finer", "same": "finer", "coarser": "finer"}
    downs = [cell.transforms[s] for s in ("finer", "same", "coarser")]
    assert all(isinstance(d, Downsample) for d in downs) and len({id(d) for d in downs}) == 3
    finer = torch.randn(2, C // 2, 8, 8)
    cell(finer, None, None, torch.zeros(1, len(ALL_OPS))).sum().backward()
    assert cell.beta.grad is not None and cell.beta.grad.abs().sum() > 0


def test_single_input_cell_has_no_beta():
    """The first backbone layer at 1/4 reads only the stem: nothing to mix, so no dead beta."""
    cell = Cell(C, 1, ALL_OPS, False, True, False)
    assert cell.beta is None
    same = torch.randn(2, C, 4, 4)
    torch.testing.assert_close(cell.input_node(None, same, None), torch.relu(3 * same))


@pytest.mark.parametrize("hidden_nodes", [1, 2, 3])
def test_edge_order(hidden_nodes):
    edges = edge_list(hidden_nodes)
    assert len(edges) == hidden_nodes * (hidden_nodes + 1) // 2
    assert edges[:3] == [(0, 1), (0, 2), (1, 2)][: len(edges)]


def test_part_fabric_geometry():
    fabric = part_fabric(4, 2, SUBNETWORK_OPS)
    assert list(fabric.cells) == ["l1_s4", "l1_s8", "l1_s16", "l2_s4", "l2_s8", "l3_s4"]
    assert fabric.alpha.shape == (3, 4)
    assert all(cell.beta.shape == (3,) for cell in fabric.cells.values())
    pyramid = {s: torch.randn(2, 4 * s, 64 // s, 32 // s) for s in (4, 8, 16, 32)}
    out = fabric(pyramid)
    assert list(out) == [4] and out[4].shape == (2, 16, 16, 8)


@pytest.mark.parametrize(("layers", "cells"), [(3, 9), (4, 13), (5, 17)])
def test_backbone_fabric_geometry(layers, cells):
    fabric = backbone_fabric(2, layers, 1, ALL_OPS)
    assert len(fabric.cells) == cells
    assert fabric.alpha.shape == (1, 6)
    assert fabric.cells[cell_name(1, 4)].beta is None
    assert sum(c.beta is not None for c in fabric.cells.values()) == cells - 1
    out = fabric({4: torch.randn(2, 8, 16, 16)})
    assert {s: tuple(x.shape) for s, x in out.items()} == {
        4: (2, 8, 16, 16), 8: (2, 16, 8, 8), 16: (2, 32, 4, 4), 32: (2, 64, 2, 2),
    }  # fmt: skip
