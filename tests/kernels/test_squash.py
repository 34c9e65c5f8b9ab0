"""``squash_score`` and the fused ``squash_mse_loss``: reference, Triton under the interpreter,
compiled ahead of time, and on a GPU.

Markers: ``interpret`` (Triton on CPU, ``TRITON_INTERPRET=1``: ``make test-interpret``), ``aot``
(compiled for sm_80/sm_90 here, no GPU: ``kernels/aot.py``), ``gpu`` (needs CUDA); the
rest runs in the normal pass. Oracle and tolerances: ``support/kernel_cases.py``.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pnfs.kernels import (
    squash_mse_loss,
    squash_mse_loss_reference,
    squash_score,
    squash_score_reference,
)
from tests.support.kernel_cases import (
    DRAWN,
    DRAWN_DTYPES,
    DRAWN_LAYOUTS,
    FP32,
    GPU_TOL,
    MULTI_TILE_PIXELS,
    TOL,
    aot_cases,
    assert_compiles_without_spills_within_shared_memory,
    assert_no_atomic_operations,
    assert_vectorised_global_loads,
    gpu_tiles,
    in_drawn_layout,
    in_layout,
    leaf,
    triton_for_interpreter_cases,  # noqa: F401  (autouse fixture)
)

_SQUASH = importlib.import_module("pnfs.kernels.squash")
_REDUCE = importlib.import_module("pnfs.kernels._reduce")

# -------------------------------------------------------------------- reference


@pytest.mark.parametrize("d", [1, 3, 8])
def test_squash_score_reference_passes_gradcheck(d):
    v = torch.randn(2, 2 * d, 3, 4, dtype=torch.float64)
    v[0, :d, 1, 2] = 0.0  # the gradient at v = 0 is part of the check
    v.requires_grad_()
    assert torch.autograd.gradcheck(lambda v: squash_score_reference(v, d), (v,))


def test_squash_mse_loss_reference_passes_gradcheck():
    v = torch.randn(2, 3 * 4, 3, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.rand(2, 3, 3, 5, dtype=torch.float64)
    weights = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: squash_mse_loss_reference(v, 4, targets, weights), (v,))


def test_squash_gradient_is_exactly_zero_at_zero_vectors():
    v = torch.zeros(1, 2 * 8, 3, 3, requires_grad=True)
    squash_score_reference(v, 8).sum().backward()
    assert torch.equal(v.grad, torch.zeros_like(v))
    assert torch.equal(squash_score_reference(v.detach(), 8), torch.zeros(1, 2, 3, 3))


def test_squash_mse_loss_is_the_training_loss_on_squashed_scores():
    from pnfs.loss import pose_loss

    v = torch.randn(3, 17 * 4, 6, 5)
    targets = torch.rand(3, 17, 6, 5)
    weights = (torch.rand(3, 17) > 0.3).float()
    expected = pose_loss(squash_score_reference(v, 4), targets, weights)
    torch.testing.assert_close(squash_mse_loss_reference(v, 4, targets, weights), expected)


# ------------------------------------------------- Triton under the interpreter


SQUASH_CASES = [
    # (shape, d, dtype, layout)
    ((2, 17 * 8, 16, 12), 8, torch.float32, "nchw"),  # realistic: COCO J=17, d=8
    ((2, 16 * 8, 16, 12), 8, torch.float32, "channels_last"),  # MPII J=16
    ((1, 1, 7, 5), 1, torch.float32, "nchw"),  # d = 1 (scalar baseline), J = 1, N = 1
    ((3, 4 * 3, 9, 11), 3, torch.float32, "strided"),
    ((2, 3 * 8, 9, 7), 8, torch.bfloat16, "channels_last"),
    ((2, 3 * 8, 9, 7), 8, torch.float16, "nchw"),
]


@pytest.mark.interpret
@pytest.mark.parametrize("shape, d, dtype, layout", SQUASH_CASES)
def test_squash_score_matches_reference(shape, d, dtype, layout):
    v = torch.randn(shape)
    v[0, :d, 1, 2] = 0.0  # one exactly-zero vector
    v = leaf(in_layout(v.to(dtype), layout))
    scores = squash_score(v, d)
    n, c, h, w = shape
    assert scores.shape == (n, c // d, h, w) and scores.dtype == dtype
    g = torch.randn(scores.shape).to(dtype)
    (dv,) = torch.autograd.grad(scores, v, g)
    v64 = leaf(v.double())
    ref = squash_score_reference(v64, d)
    (ref_dv,) = torch.autograd.grad(ref, v64, g.double())
    torch.testing.assert_close(scores.double(), ref, **TOL[dtype])
    torch.testing.assert_close(dv.double(), ref_dv, **TOL[dtype])
    assert torch.equal(dv[0, :d, 1, 2], torch.zeros(d, dtype=dtype))


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_squash_at_zero_has_zero_gradient_and_no_nan(dtype):
    v = leaf(torch.zeros(2, 3 * 4, 5, 3, dtype=dtype))
    scores = squash_score(v, 4)
    (dv,) = torch.autograd.grad(scores, v, torch.ones_like(scores))
    assert torch.equal(scores, torch.zeros_like(scores))
    assert torch.equal(dv, torch.zeros_like(v))  # exactly 0, no NaN
    loss = squash_mse_loss(v, 4, torch.rand(2, 3, 5, 3), torch.ones(2, 3))
    (dv,) = torch.autograd.grad(loss, v)
    assert torch.equal(dv, torch.zeros_like(v))


LOSS_CASES = [
    ((2, 17 * 8, 16, 12), 8, torch.float32, "nchw"),
    ((2, 16 * 8, 16, 12), 8, torch.float32, "channels_last"),
    ((1, 1, 7, 5), 1, torch.float32, "nchw"),
    ((3, 4 * 3, 9, 11), 3, torch.float32, "strided"),
    ((2, 3 * 8, 9, 7), 8, torch.bfloat16, "channels_last"),
    ((2, 3 * 8, 9, 7), 8, torch.float16, "nchw"),
]


@pytest.mark.interpret
@pytest.mark.parametrize("shape, d, dtype, layout", LOSS_CASES)
def test_squash_mse_loss_matches_reference(shape, d, dtype, layout):
    n, c, h, w = shape
    v = leaf(in_layout((torch.randn(shape) * 0.7).to(dtype), layout))
    targets = torch.rand(n, c // d, h, w)
    weights = (torch.rand(n, c // d) > 0.3).float()
    weights.view(-1)[0] = 1.0  # one labelled joint at least: with none, dv = 0 compares nothing
    loss = squash_mse_loss(v, d, targets, weights)
    assert loss.shape == () and loss.dtype == torch.float32
    (dv,) = torch.autograd.grad(loss * 3.0, v)  # the incoming gradient scales the stored one
    v64 = leaf(v.double())
    ref = squash_mse_loss_reference(v64, d, targets, weights)
    (ref_dv,) = torch.autograd.grad(ref * 3.0, v64)
    torch.testing.assert_close(loss.double(), ref, **FP32)
    scale = ref_dv.abs().max().item()  # gradients are O(1 / (N J H W)): compare relative to their size
    torch.testing.assert_close(dv.double() / scale, ref_dv / scale, **TOL[dtype])
    with torch.no_grad():  # no gradient wanted: the loss alone
        torch.testing.assert_close(squash_mse_loss(v, d, targets, weights), loss, rtol=0, atol=0)


@pytest.mark.interpret
def test_squash_mse_loss_with_bf16_targets_and_half_weights():
    v = leaf(torch.randn(2, 2 * 4, 5, 6))
    targets = torch.rand(2, 2, 5, 6).bfloat16()
    weights = torch.tensor([[1.0, 0.0], [0.5, 1.0]]).half()
    loss = squash_mse_loss(v, 4, targets, weights)
    torch.testing.assert_close(
        loss.double(), squash_mse_loss_reference(v.double(), 4, targets, weights), **FP32
    )


@pytest.mark.interpret
def test_squash_mse_loss_refuses_targets_that_need_grad():
    v = leaf(torch.randn(1, 4, 2, 2))
    with pytest.raises(ValueError, match="must not require grad"):
        squash_mse_loss(v, 2, torch.rand(1, 2, 2, 2, requires_grad=True), torch.ones(1, 2))


def _check_squash(v: torch.Tensor, d: int) -> None:
    v = leaf(v)
    scores = squash_score(v, d)
    g = torch.randn(scores.shape).to(v.dtype)
    (dv,) = torch.autograd.grad(scores, v, g)
    v64 = leaf(v.double())
    ref = squash_score_reference(v64, d)
    (ref_dv,) = torch.autograd.grad(ref, v64, g.double())
    torch.testing.assert_close(scores.double(), ref, **TOL[v.dtype])
    torch.testing.assert_close(dv.double(), ref_dv, **TOL[v.dtype])


def _check_loss(v: torch.Tensor, d: int) -> None:
    n, c, h, w = v.shape
    v = leaf(v)
    targets = torch.rand(n, c // d, h, w)
    weights = (torch.rand(n, c // d) > 0.3).float()
    weights.view(-1)[0] = 1.0  # one labelled joint at least: with none, dv = 0 compares nothing
    loss = squash_mse_loss(v, d, targets, weights)
    (dv,) = torch.autograd.grad(loss, v)
    v64 = leaf(v.double())
    ref = squash_mse_loss_reference(v64, d, targets, weights)
    (ref_dv,) = torch.autograd.grad(ref, v64)
    torch.testing.assert_close(loss.double(), ref, **FP32)
    scale = max(ref_dv.abs().max().item(), 1e-30)
    torch.testing.assert_close(dv.double() / scale, ref_dv / scale, **TOL[v.dtype])


@pytest.mark.interpret
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("hw", MULTI_TILE_PIXELS)
def test_squash_at_gpu_tiles_over_many_tiles(hw, layout):
    with gpu_tiles():
        v = in_layout(torch.randn(2, 3 * 4, *hw), layout)
        v[1, -4:, -1, -1] = 3.0  # the very last pixel of the last tile of the last (n, j)
        _check_squash(v, 4)


@pytest.mark.interpret
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("hw", MULTI_TILE_PIXELS)
def test_squash_mse_loss_at_gpu_tiles_over_many_tiles(hw, layout):
    with gpu_tiles():
        _check_loss(in_layout(torch.randn(2, 3 * 4, *hw) * 0.7, layout), 4)


@pytest.mark.interpret
def test_squash_mse_loss_with_more_than_one_block_of_partials_per_row():
    """2 x 96 joints x 6 tiles of 512 px = 1152 partials: the second pass needs two blocks of 1024."""
    with gpu_tiles():
        n, j, d, (h, w) = 2, 96, 2, MULTI_TILE_PIXELS[1]
        assert n * j * -(-(h * w) // _SQUASH.BLOCK_P) > _REDUCE.BLOCK
        _check_loss(torch.randn(n, j * d, h, w) * 0.7, d)


@pytest.mark.interpret
@DRAWN
@given(
    n=st.integers(1, 2), j=st.integers(1, 3), d=st.sampled_from([1, 2, 3, 8]),
    h=st.integers(1, 40), w=st.integers(1, 33), dtype=DRAWN_DTYPES, layout=DRAWN_LAYOUTS,
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_squash_and_loss_on_drawn_shapes(n, j, d, h, w, dtype, layout, seed):
    torch.manual_seed(seed)
    with gpu_tiles():
        v = in_drawn_layout(torch.randn(n, j * d, h, w).to(dtype), layout)
        _check_squash(v, d)
        _check_loss(v, d)


# ------------------------------------------------- ahead of time (sm_80, sm_90)


@pytest.mark.aot
@pytest.mark.parametrize("spec, device", aot_cases("squash"))
def test_aot_compiles_without_spills_within_shared_memory(spec, device):
    assert_compiles_without_spills_within_shared_memory(spec, device)


@pytest.mark.aot
@pytest.mark.parametrize("spec, device", aot_cases("squash"))
def test_aot_has_no_atomic_operations(spec, device):
    assert_no_atomic_operations(spec, device)


@pytest.mark.aot
@pytest.mark.parametrize("spec, device", aot_cases("squash", dense_only=True))
def test_aot_dense_paths_vectorise_their_global_loads(spec, device):
    assert_vectorised_global_loads(spec, device)


# --------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_squash_and_loss_on_gpu_match_reference(monkeypatch, dtype):
    monkeypatch.setenv("PNFS_KERNELS", "triton")
    v = torch.randn(32, 17 * 8, 96, 72, device="cuda").to(dtype).requires_grad_()
    s = squash_score(v, 8)
    g = torch.randn_like(s)
    (dv,) = torch.autograd.grad(s, v, g)
    v64 = v.detach().double().requires_grad_()
    ref = squash_score_reference(v64, 8)
    (ref_dv,) = torch.autograd.grad(ref, v64, g.double())
    torch.testing.assert_close(s.double(), ref, **GPU_TOL[dtype])
    torch.testing.assert_close(dv.double(), ref_dv, **GPU_TOL[dtype])
    t = torch.rand(32, 17, 96, 72, device="cuda")
    wt = (torch.rand(32, 17, device="cuda") > 0.2).float()
    loss = squash_mse_loss(v, 8, t, wt)
    (dv,) = torch.autograd.grad(loss, v)
    ref_loss = squash_mse_loss_reference(v64, 8, t, wt)
    (ref_dv,) = torch.autograd.grad(ref_loss, v64)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dv.double(), ref_dv, rtol=GPU_TOL[dtype]["rtol"], atol=1e-9)
