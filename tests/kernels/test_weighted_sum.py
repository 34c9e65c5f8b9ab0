"""``weighted_sum``: reference, Triton under the interpreter, compiled ahead of time, and on a GPU.

Markers: ``interpret`` (Triton on CPU, ``TRITON_INTERPRET=1``: ``make test-interpret``), ``aot``
(compiled for sm_80/sm_90 here, no GPU: ``kernels/aot.py``), ``gpu`` (needs CUDA); the
rest runs in the normal pass. Oracle and tolerances: ``support/kernel_cases.py``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pnfs.kernels import squash_mse_loss, weighted_sum, weighted_sum_reference
from tests.support.kernel_cases import (
    DRAWN,
    DRAWN_DTYPES,
    DRAWN_LAYOUTS,
    FP32,
    GPU_TOL,
    TOL,
    aot_cases,
    assert_compiles_without_spills_within_shared_memory,
    assert_no_atomic_operations,
    assert_sum_close,
    assert_vectorised_global_loads,
    dw_terms_abs_sum,
    gpu_tiles,
    in_drawn_layout,
    in_layout,
    leaf,
    triton_for_interpreter_cases,  # noqa: F401  (autouse fixture)
)

# -------------------------------------------------------------------- reference


@pytest.mark.parametrize("k, relu", [(1, False), (3, True), (12, False)])
def test_weighted_sum_reference_passes_gradcheck(k, relu):
    # offset away from 0 so the ReLU kink is not inside gradcheck's finite differences
    xs = [(torch.rand(2, 3, 4, 5, dtype=torch.float64) + 0.1).requires_grad_() for _ in range(k)]
    w = (torch.rand(k, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda w, *xs: weighted_sum_reference(xs, w, relu), (w, *xs))


# ------------------------------------------------- Triton under the interpreter


WEIGHTED_SUM_CASES = [
    # (shape, K, relu, dtype, layouts of the inputs)
    ((2, 40, 16, 12), 4, False, torch.float32, ["nchw"]),  # realistic: a hidden node at 1/4 (C=10)
    ((2, 40, 16, 12), 3, True, torch.float32, ["channels_last"]),  # realistic: input node, ReLU
    ((1, 3, 7, 5), 12, True, torch.float32, ["nchw"]),  # K = 12, H and W not powers of two
    ((3, 1, 9, 11), 1, False, torch.float32, ["nchw"]),  # K = 1, C = 1
    ((1, 1, 5, 3), 2, True, torch.float32, ["channels_last"]),  # N = 1, C = 1
    ((2, 6, 7, 9), 3, True, torch.float32, ["strided"]),  # non-contiguous views, read in place
    ((2, 6, 7, 9), 3, False, torch.float32, ["nchw", "channels_last", "strided"]),  # mixed: copies
    ((2, 5, 9), 2, True, torch.float32, ["nchw"]),  # 3-d tensors
    ((2, 8, 9, 7), 5, True, torch.bfloat16, ["channels_last"]),
    ((2, 8, 9, 7), 5, False, torch.float16, ["nchw"]),
    ((2, 8, 9, 7), 4, True, torch.bfloat16, ["strided", "nchw"]),
]


@pytest.mark.interpret
@pytest.mark.parametrize("shape, k, relu, dtype, layouts", WEIGHTED_SUM_CASES)
def test_weighted_sum_matches_reference(shape, k, relu, dtype, layouts):
    xs = [torch.randn(shape).to(dtype) for _ in range(k)]
    if len(shape) == 4:
        xs = [in_layout(x, layouts[i % len(layouts)]) for i, x in enumerate(xs)]
    xs = [leaf(x) for x in xs]
    w = leaf(torch.randn(k))
    out = weighted_sum(xs, w, relu)
    assert out.dtype == dtype and out.shape == shape
    g = torch.randn(shape).to(dtype)
    grads = torch.autograd.grad(out, [*xs, w], g)

    xs64 = [leaf(x.double()) for x in xs]
    w64 = leaf(w.double())
    ref = weighted_sum_reference(xs64, w64, relu)
    ref_grads = torch.autograd.grad(ref, [*xs64, w64], g.double())
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    for got, want in zip(grads[:-1], ref_grads[:-1]):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **TOL[dtype])
    assert_sum_close(grads[-1], ref_grads[-1], dw_terms_abs_sum(xs, g))


@pytest.mark.interpret
def test_weighted_sum_keeps_channels_last():
    xs = [in_layout(torch.randn(2, 4, 3, 5), "channels_last") for _ in range(3)]
    assert weighted_sum(xs, torch.ones(3)).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.interpret
def test_weighted_sum_relu_keeps_nan_like_torch():
    x = torch.tensor([[-1.0, float("nan"), 2.0]])
    torch.testing.assert_close(weighted_sum([x], torch.ones(1), relu=True), torch.relu(x), equal_nan=True)


@pytest.mark.interpret
def test_weighted_sum_takes_an_expanded_gradient_and_inputs_without_grad():
    xs = [torch.randn(2, 3, 5, 7) for _ in range(3)]  # inputs that need no gradient
    w = leaf(torch.randn(3))
    out = weighted_sum(xs, w, relu=True)
    (dw,) = torch.autograd.grad(out.sum(), w)  # the gradient of sum() is an expanded, stride-0 tensor
    w64 = leaf(w.double())
    (ref,) = torch.autograd.grad(weighted_sum_reference([x.double() for x in xs], w64, True).sum(), w64)
    assert_sum_close(dw, ref, dw_terms_abs_sum(xs, torch.ones(2, 3, 5, 7)))


@pytest.mark.interpret
def test_weighted_sum_gradient_of_inputs_only():
    xs = [leaf(torch.randn(2, 3, 5, 7)) for _ in range(2)]
    w = torch.tensor([0.5, -2.0])  # fixed weights: no dw pass
    g = torch.randn(2, 3, 5, 7)
    grads = torch.autograd.grad(weighted_sum(xs, w), xs, g)
    torch.testing.assert_close(grads[0], 0.5 * g, rtol=0, atol=0)
    torch.testing.assert_close(grads[1], -2.0 * g, rtol=0, atol=0)


@pytest.mark.interpret
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("relu", [False, True])
def test_weighted_sum_at_gpu_tiles_over_more_than_two_tiles(layout, relu):
    """2 x 5 x 40 x 30 = 12000 elements: 12 tiles of 1024 (24 of 512 strided), the last ragged."""
    with gpu_tiles():
        shape = (2, 5, 40, 30)
        xs = [leaf(in_layout(torch.randn(shape), layout)) for _ in range(3)]
        w = leaf(torch.randn(3))
        out = weighted_sum(xs, w, relu)
        g = torch.randn(shape)
        grads = torch.autograd.grad(out, [*xs, w], g)
        xs64 = [leaf(x.double()) for x in xs]
        w64 = leaf(w.double())
        ref = weighted_sum_reference(xs64, w64, relu)
        ref_grads = torch.autograd.grad(ref, [*xs64, w64], g.double())
        torch.testing.assert_close(out.double(), ref, **FP32)
        for got, want in zip(grads[:-1], ref_grads[:-1]):
            torch.testing.assert_close(got.double(), want, **FP32)
        assert_sum_close(grads[-1], ref_grads[-1], dw_terms_abs_sum(xs, g))


@pytest.mark.interpret
@DRAWN
@given(
    k=st.integers(1, 12), relu=st.booleans(), n=st.integers(1, 2), c=st.integers(1, 6),
    h=st.integers(1, 24), w=st.integers(1, 24), dtype=DRAWN_DTYPES, layout=DRAWN_LAYOUTS,
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_weighted_sum_on_drawn_shapes(k, relu, n, c, h, w, dtype, layout, seed):
    torch.manual_seed(seed)
    with gpu_tiles():
        shape = (n, c, h, w)
        xs = [leaf(in_drawn_layout(torch.randn(shape).to(dtype), layout)) for _ in range(k)]
        wts = leaf(torch.randn(k))
        out = weighted_sum(xs, wts, relu)
        g = torch.randn(shape).to(dtype)
        grads = torch.autograd.grad(out, [*xs, wts], g)
        xs64 = [leaf(x.double()) for x in xs]
        w64 = leaf(wts.double())
        ref = weighted_sum_reference(xs64, w64, relu)
        ref_grads = torch.autograd.grad(ref, [*xs64, w64], g.double())
        # k bf16 products summed in fp32 then rounded once: the tolerance grows with the magnitude
        torch.testing.assert_close(out.double(), ref, **TOL[dtype])
        for got, want in zip(grads[:-1], ref_grads[:-1]):
            torch.testing.assert_close(got.double(), want, **TOL[dtype])
        assert_sum_close(grads[-1], ref_grads[-1], dw_terms_abs_sum(xs, g))


# ------------------------------------------------- ahead of time (sm_80, sm_90)


@pytest.mark.aot
@pytest.mark.parametrize("spec, device", aot_cases("weighted_sum"))
def test_aot_compiles_without_spills_within_shared_memory(spec, device):
    assert_compiles_without_spills_within_shared_memory(spec, device)


@pytest.mark.aot
@pytest.mark.parametrize("spec, device", aot_cases("weighted_sum"))
def test_aot_has_no_atomic_operations(spec, device):
    assert_no_atomic_operations(spec, device)


@pytest.mark.aot
@pytest.mark.parametrize("spec, device", aot_cases("weighted_sum", dense_only=True))
def test_aot_dense_paths_vectorise_their_global_loads(spec, device):
    assert_vectorised_global_loads(spec, device)


# --------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k, relu, channels_last", [(3, True, True), (8, False, False), (12, False, True)])
def test_weighted_sum_on_gpu_matches_reference(monkeypatch, dtype, k, relu, channels_last):
    monkeypatch.setenv("PNFS_KERNELS", "triton")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [
        torch.randn(32, 40, 64, 48, device="cuda").to(dtype, memory_format=fmt).requires_grad_()
        for _ in range(k)
    ]
    w = torch.randn(k, device="cuda", requires_grad=True)
    out = weighted_sum(xs, w, relu)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [*xs, w], g)
    xs64 = [x.detach().double().requires_grad_() for x in xs]
    w64 = w.detach().double().requires_grad_()
    ref = weighted_sum_reference(xs64, w64, relu)
    ref_grads = torch.autograd.grad(ref, [*xs64, w64], g.double())
    torch.testing.assert_close(out.double(), ref, **GPU_TOL[dtype])
    for got, want in zip(grads[:-1], ref_grads[:-1]):
        torch.testing.assert_close(got.double(), want, **GPU_TOL[dtype])
    torch.testing.assert_close(grads[-1].double(), ref_grads[-1], rtol=1e-4, atol=1e-3)
    again = torch.autograd.grad(weighted_sum(xs, w, relu), [w], g)[0]
    assert torch.equal(again, grads[-1]), "dw must be bitwise reproducible"


@pytest.mark.gpu
def test_weighted_sum_weight_gradient_is_bitwise_reproducible_on_gpu(monkeypatch):
    """Programs run concurrently on a GPU: the two-pass dw reduction must give the same bits every run
    (the interpreter runs programs one after another, so only CUDA can show this)."""
    monkeypatch.setenv("PNFS_KERNELS", "triton")
    xs = [torch.randn(4, 40, 64, 48, device="cuda", requires_grad=True) for _ in range(3)]
    w = torch.rand(3, device="cuda", requires_grad=True)
    g = torch.randn(4, 40, 64, 48, device="cuda")
    runs = [torch.autograd.grad(weighted_sum(xs, w, relu=True), w, g)[0] for _ in range(5)]
    loss = [
        squash_mse_loss(xs[0][:, :34], 2, xs[1][:, :17].detach().sigmoid(), w.new_ones(4, 17))
        for _ in range(5)
    ]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert all(torch.equal(loss[0], x) for x in loss[1:])
