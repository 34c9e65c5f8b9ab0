"""Every kernel entry under the dtypes autocast hands it (docs/design.md §3, ``pnfs.kernels._dtypes``).

On CUDA, autocast returns fp32 from ops on its fp32 list (bilinear up-sampling) next to bf16
convolution outputs, so a kernel sees mixed dtypes: the input node's weighted sum gets two bf16
inputs and one fp32 (the up-sampled coarser one), in channels_last when the model trains in it.
Each entry, on the reference path and on Triton (``interpret``), with and without autocast:

* the result has ``result_dtype``: the autocast dtype under autocast, else the promoted dtype
  (the loss and the decoded coordinates are fp32 always);
* it matches the PyTorch reference evaluated in float64 on the same values, within the tolerance
  of the result's dtype (``kernel_cases.TOL``);
* each input's gradient has that input's dtype and matches the float64 gradient.

Then the two ways a Triton kernel is called agree bitwise, forward and backward: the eager
``torch.autograd.Function`` with direct launches and the ``torch.library`` custom op that tracers
(``torch.compile``, export) see.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from pnfs.kernels import (
    argmax_decode,
    argmax_decode_reference,
    squash_mse_loss,
    squash_mse_loss_reference,
    squash_score,
    squash_score_reference,
    weighted_sum,
    weighted_sum_reference,
)
from tests.support.kernel_cases import (
    FP32,
    MULTI_TILE_PIXELS,
    TOL,
    assert_sum_close,
    dw_terms_abs_sum,
    gpu_tiles,
    in_layout,
    leaf,
    triton_for_interpreter_cases,  # noqa: F401  (autouse fixture)
)

BF16, FP16, F32 = torch.bfloat16, torch.float16, torch.float32
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpret)]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("PNFS_KERNELS", request.param)
    return request.param


def autocast(enabled: bool):
    return torch.autocast("cpu", dtype=BF16) if enabled else contextlib.nullcontext()


def _tiles(multi_tile: bool):
    return gpu_tiles() if multi_tile else contextlib.nullcontext()


# ------------------------------------------------------------------------------ weighted_sum

WEIGHTED_SUM_CASES = {
    # name: (shape, input dtypes, input layouts, relu); channels_last is the training layout
    "input_node": ((2, 8, 9, 7), (BF16, BF16, F32), ("channels_last",), True),
    "input_node_nchw": ((2, 8, 9, 7), (BF16, BF16, F32), ("nchw",), True),
    "hidden_node": ((2, 6, 5, 3), (F32, BF16, BF16, F32, BF16), ("channels_last",), False),
    "three_dtypes": ((1, 3, 7, 5), (FP16, BF16, F32), ("nchw",), False),
    "dtypes_and_layouts": ((2, 6, 7, 9), (BF16, F32, BF16), ("channels_last", "nchw"), True),
    "multi_tile": ((2, 5, *MULTI_TILE_PIXELS[0]), (BF16, BF16, F32), ("channels_last",), True),
}


@pytest.mark.parametrize("use_autocast", [True, False], ids=["autocast", "no_autocast"])
@pytest.mark.parametrize("case", WEIGHTED_SUM_CASES)
def test_weighted_sum_takes_mixed_dtypes(backend, case, use_autocast):
    shape, dtypes, layouts, relu = WEIGHTED_SUM_CASES[case]
    gen = torch.Generator().manual_seed(len(dtypes))
    xs = [
        leaf(in_layout(torch.randn(shape, generator=gen).to(dtype), layouts[k % len(layouts)]))
        for k, dtype in enumerate(dtypes)
    ]
    w = leaf(torch.rand(len(xs), generator=gen) + 0.2)
    promoted = dtypes[0]
    for dtype in dtypes[1:]:
        promoted = torch.promote_types(promoted, dtype)
    expected = BF16 if use_autocast else promoted
    with _tiles(case == "multi_tile"), autocast(use_autocast):
        out = weighted_sum(xs, w, relu)
    assert out.dtype == expected and out.shape == shape
    g = torch.randn(shape, generator=gen).to(expected)
    with _tiles(case == "multi_tile"):
        grads = torch.autograd.grad(out, [*xs, w], g)

    xs64, w64 = [leaf(x.double()) for x in xs], leaf(w.double())
    ref = weighted_sum_reference(xs64, w64, relu)
    ref_grads = torch.autograd.grad(ref, [*xs64, w64], g.double())
    torch.testing.assert_close(out.double(), ref, **TOL[expected])
    for x, got, want in zip(xs, grads[:-1], ref_grads[:-1]):
        assert got.dtype == x.dtype
        torch.testing.assert_close(got.double(), want, **TOL[x.dtype])
    assert grads[-1].dtype == w.dtype
    assert_sum_close(grads[-1], ref_grads[-1], dw_terms_abs_sum(xs, g))


# ------------------------------------------------------------------------------ squash


SQUASH_CASES = {
    # name: (shape [N, J*d, H, W], d, vectors dtype, layout)
    "bf16_channels_last": ((2, 3 * 4, 5, 7), 4, BF16, "channels_last"),
    "fp32_under_bf16": ((2, 2 * 8, 5, 3), 8, F32, "nchw"),
    "fp16": ((1, 3 * 2, 3, 5), 2, FP16, "channels_last"),
    "multi_tile": ((1, 2 * 4, *MULTI_TILE_PIXELS[0]), 4, BF16, "channels_last"),
}


@pytest.mark.parametrize("use_autocast", [True, False], ids=["autocast", "no_autocast"])
@pytest.mark.parametrize("case", SQUASH_CASES)
def test_squash_score_returns_the_autocast_dtype(backend, case, use_autocast):
    shape, d, dtype, layout = SQUASH_CASES[case]
    gen = torch.Generator().manual_seed(d)
    v = leaf(in_layout(torch.randn(shape, generator=gen).to(dtype), layout))
    expected = BF16 if use_autocast else dtype
    with _tiles(case == "multi_tile"), autocast(use_autocast):
        scores = squash_score(v, d)
    assert scores.dtype == expected
    g = torch.randn(scores.shape, generator=gen).to(expected)
    with _tiles(case == "multi_tile"):
        (dv,) = torch.autograd.grad(scores, v, g)
    v64 = leaf(v.double())
    ref = squash_score_reference(v64, d)
    (ref_dv,) = torch.autograd.grad(ref, v64, g.double())
    torch.testing.assert_close(scores.double(), ref, **TOL[expected])
    assert dv.dtype == dtype
    torch.testing.assert_close(dv.double(), ref_dv, **TOL[dtype])


LOSS_CASES = {
    # name: (shape, d, vectors dtype, vectors layout, targets dtype, targets layout, weights dtype)
    # the default training layout: channels_last vectors, NCHW targets (FLAT=0, MAP_FLAT=1)
    "training_layout": ((2, 3 * 4, 5, 7), 4, BF16, "channels_last", F32, "nchw", F32),
    "bf16_targets": ((2, 2 * 8, 3, 5), 8, F32, "nchw", BF16, "nchw", FP16),
    "all_bf16": ((1, 3 * 2, 7, 3), 2, BF16, "nchw", BF16, "channels_last", BF16),
    "multi_tile": ((1, 2 * 4, *MULTI_TILE_PIXELS[1]), 4, BF16, "channels_last", F32, "nchw", F32),
}


@pytest.mark.parametrize("use_autocast", [True, False], ids=["autocast", "no_autocast"])
@pytest.mark.parametrize("case", LOSS_CASES)
def test_squash_mse_loss_is_fp32_from_mixed_dtypes(backend, case, use_autocast):
    shape, d, vdtype, vlayout, tdtype, tlayout, wdtype = LOSS_CASES[case]
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(c)
    v = leaf(in_layout(torch.randn(shape, generator=gen).to(vdtype), vlayout))
    t = in_layout(torch.rand(n, c // d, h, w, generator=gen).to(tdtype), tlayout)
    wt = (torch.rand(n, c // d, generator=gen) > 0.3).to(wdtype)
    with _tiles(case == "multi_tile"), autocast(use_autocast):
        loss = squash_mse_loss(v, d, t, wt)
    assert loss.dtype == F32 and loss.dim() == 0
    with _tiles(case == "multi_tile"):
        (dv,) = torch.autograd.grad(loss * 3.0, v)
    v64 = leaf(v.double())
    ref = squash_mse_loss_reference(v64, d, t.double(), wt.double())
    (ref_dv,) = torch.autograd.grad(ref * 3.0, v64)
    torch.testing.assert_close(loss.double(), ref, **FP32)
    assert dv.dtype == vdtype
    torch.testing.assert_close(
        dv.double(), ref_dv, atol=TOL[vdtype]["atol"] * ref_dv.abs().max().item(), rtol=0
    )


# ------------------------------------------------------------------------------ argmax_decode


@pytest.mark.parametrize("use_autocast", [True, False], ids=["autocast", "no_autocast"])
@pytest.mark.parametrize("dtype, layout", [(BF16, "nchw"), (BF16, "channels_last"), (FP16, "strided")])
def test_argmax_decode_of_bf16_scores_is_fp32(backend, dtype, layout, use_autocast):
    """Decoding reads the maps in their dtype and compares in fp32: the same peaks and offsets as
    decoding the same (already rounded) values in float64."""
    gen = torch.Generator().manual_seed(5)
    scores = in_layout(torch.rand(2, 3, *MULTI_TILE_PIXELS[0], generator=gen).to(dtype), layout)
    with gpu_tiles(), autocast(use_autocast):
        coords, maxvals = argmax_decode(scores)
    want_coords, want_maxvals = argmax_decode_reference(scores.double())
    assert coords.dtype == F32 and maxvals.dtype == F32
    torch.testing.assert_close(coords, want_coords, rtol=0, atol=0)
    torch.testing.assert_close(maxvals, want_maxvals, rtol=0, atol=0)


# ------------------------------------------- Triton: the eager Function and the custom op agree


def _grads(out: torch.Tensor, leaves: list[torch.Tensor], seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad(out, leaves, g)


def _assert_bitwise(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.interpret
@pytest.mark.parametrize("need_dw", [True, False])
def test_weighted_sum_function_and_custom_op_agree(need_dw):
    xs = [leaf(in_layout(torch.randn(2, 8, 9, 7).to(dt), "channels_last")) for dt in (BF16, BF16, F32)]
    w = torch.tensor([0.7, 1.1, 1.2], requires_grad=need_dw)
    eager = weighted_sum(xs, w, relu=True)  # eager: the autograd.Function
    assert type(eager.grad_fn).__name__.startswith("_WeightedSumFunction")
    op = torch.ops.pnfs.weighted_sum(xs, w, True, torch.float32)
    assert "pnfs" not in type(eager.grad_fn).__name__ and op.grad_fn is not None
    leaves = [*xs, w] if need_dw else xs
    _assert_bitwise([eager], [op])
    _assert_bitwise(_grads(eager, leaves, 0), _grads(op, leaves, 0))


@pytest.mark.interpret
@pytest.mark.parametrize("dtype, out_dtype", [(F32, F32), (BF16, BF16), (F32, BF16)])
def test_squash_score_function_and_custom_op_agree(dtype, out_dtype):
    v = leaf(in_layout(torch.randn(2, 3 * 4, 5, 7).to(dtype), "channels_last"))
    with autocast(out_dtype != dtype):
        eager = squash_score(v, 4)
    assert type(eager.grad_fn).__name__.startswith("_SquashFunction")
    op = torch.ops.pnfs.squash_score(v, 4, out_dtype)
    _assert_bitwise([eager], [op])
    _assert_bitwise(_grads(eager, [v], 1), _grads(op, [v], 1))


@pytest.mark.interpret
def test_squash_mse_loss_function_and_custom_op_agree():
    v = leaf(in_layout(torch.randn(2, 3 * 4, 5, 7).to(BF16), "channels_last"))
    t, wt = torch.rand(2, 3, 5, 7), torch.ones(2, 3)
    eager = squash_mse_loss(v, 4, t, wt)
    assert type(eager.grad_fn).__name__.startswith("_SquashMseFunction")
    op, _ = torch.ops.pnfs.squash_mse_loss(v, 4, t, wt, True)
    _assert_bitwise([eager], [op])
    _assert_bitwise(torch.autograd.grad(eager, v), torch.autograd.grad(op, v))


@pytest.mark.interpret
def test_argmax_decode_direct_launch_and_custom_op_agree():
    scores = torch.rand(2, 3, 9, 7).to(BF16)
    _assert_bitwise(argmax_decode(scores), torch.ops.pnfs.argmax_decode(scores))


@pytest.mark.interpret
def test_tracers_get_the_custom_ops():
    """Under torch.compile (and make_fx, export) the kernels are custom-op nodes, not Functions
    launching Triton on fake tensors."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(xs, w, v):
        return squash_score(weighted_sum(xs, w, relu=True), 4).sum() + squash_mse_loss(
            v, 4, torch.zeros(2, 2, 3, 5), torch.ones(2, 2)
        )

    xs = [torch.randn(2, 8, 3, 5) for _ in range(3)]
    graph = make_fx(f)(xs, torch.ones(3), torch.randn(2, 8, 3, 5))
    targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert {
        "pnfs.weighted_sum.default",
        "pnfs.squash_score.default",
        "pnfs.squash_mse_loss.default",
    } <= targets


@pytest.mark.parametrize("use_autocast", [True, False], ids=["autocast", "no_autocast"])
def test_compiled_kernels_follow_the_dtype_policy(backend, use_autocast):
    """``torch.compile`` (fullgraph, as ``train.compile`` runs it) traces the dtype policy: under
    autocast the compiled step returns what the eager one returns, forward and backward."""

    def step(xs, w, v):
        return weighted_sum(xs, w, relu=True), squash_score(v, 4)

    gen = torch.Generator().manual_seed(9)
    xs = [leaf(torch.randn(2, 8, 5, 3, generator=gen).to(dt)) for dt in (BF16, BF16, F32)]
    w, v = leaf(torch.rand(3, generator=gen)), leaf(torch.randn(2, 8, 5, 3, generator=gen))
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with autocast(use_autocast):
        got, want = compiled(xs, w, v), step(xs, w, v)
    expected = BF16 if use_autocast else F32
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == expected
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    leaves = [*xs, w, v]
    _assert_bitwise(
        torch.autograd.grad([a.float().sum() for a in got], leaves),
        torch.autograd.grad([b.float().sum() for b in want], leaves),
    )
