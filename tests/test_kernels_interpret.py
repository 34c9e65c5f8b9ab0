"""The Triton kernels themselves, run on CPU through ``TRITON_INTERPRET=1``, against the references.

Run in their own process (``make test-interpret``):
    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 .venv/bin/python -m pytest -m interpret tests/test_kernels*.py

Oracle: the PyTorch reference evaluated in float64 on the very same (already rounded) inputs and
incoming gradients. Tolerances per dtype of the compared tensor:
    fp32  atol 1e-5, rtol 1e-5   (fp32 arithmetic, different summation order)
    bf16  atol 1e-2, rtol 1e-2   (one rounding of the result to 8 mantissa bits, 2^-9 relative)
    fp16  atol 1e-3, rtol 1e-3   (one rounding to 11 mantissa bits, 2^-12 relative)
Weight gradients and losses are fp32 sums of fp32 products in every case: fp32 tolerances.
The interpreter is ~2000x slower than compiled kernels, so the shapes are small.
"""

from __future__ import annotations

import contextlib
import importlib
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_cases import assert_decoded, decode_batch, vector_batch

from pnfs.kernels import (
    FVCORE_HANDLES,
    argmax_decode,
    argmax_decode_reference,
    argmax_decode_vectors,
    argmax_decode_vectors_reference,
    fvcore_handles,
    squash_mse_loss,
    squash_mse_loss_reference,
    squash_score,
    squash_score_reference,
    weighted_sum,
    weighted_sum_reference,
)

pytestmark = pytest.mark.interpret

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
}
FP32 = TOL[torch.float32]


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("PNFS_KERNELS", "triton")


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` [N, C, H, W] as NCHW, channels_last, or a non-contiguous view with the same values."""
    if layout == "nchw":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other element of a twice-wider tensor: shared non-dense strides
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    raise ValueError(layout)


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().requires_grad_()


# ----------------------------------------------------------------------------- weighted_sum

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


@pytest.mark.parametrize("shape, k, relu, dtype, layouts", WEIGHTED_SUM_CASES)
def test_weighted_sum_matches_reference(shape, k, relu, dtype, layouts):
    xs = [torch.randn(shape).to(dtype) for _ in range(k)]
    if len(shape) == 4:
        xs = [_layout(x, layouts[i % len(layouts)]) for i, x in enumerate(xs)]
    xs = [_leaf(x) for x in xs]
    w = _leaf(torch.randn(k))
    out = weighted_sum(xs, w, relu)
    assert out.dtype == dtype and out.shape == shape
    g = torch.randn(shape).to(dtype)
    grads = torch.autograd.grad(out, [*xs, w], g)

    xs64 = [_leaf(x.double()) for x in xs]
    w64 = _leaf(w.double())
    ref = weighted_sum_reference(xs64, w64, relu)
    ref_grads = torch.autograd.grad(ref, [*xs64, w64], g.double())
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    for got, want in zip(grads[:-1], ref_grads[:-1]):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **TOL[dtype])
    torch.testing.assert_close(grads[-1].double(), ref_grads[-1], **FP32)


def test_weighted_sum_keeps_channels_last():
    xs = [_layout(torch.randn(2, 4, 3, 5), "channels_last") for _ in range(3)]
    assert weighted_sum(xs, torch.ones(3)).is_contiguous(memory_format=torch.channels_last)


def test_weighted_sum_relu_keeps_nan_like_torch():
    x = torch.tensor([[-1.0, float("nan"), 2.0]])
    torch.testing.assert_close(weighted_sum([x], torch.ones(1), relu=True), torch.relu(x), equal_nan=True)


def test_weighted_sum_takes_an_expanded_gradient_and_inputs_without_grad():
    xs = [torch.randn(2, 3, 5, 7) for _ in range(3)]  # inputs that need no gradient
    w = _leaf(torch.randn(3))
    out = weighted_sum(xs, w, relu=True)
    (dw,) = torch.autograd.grad(out.sum(), w)  # the gradient of sum() is an expanded, stride-0 tensor
    w64 = _leaf(w.double())
    (ref,) = torch.autograd.grad(weighted_sum_reference([x.double() for x in xs], w64, True).sum(), w64)
    torch.testing.assert_close(dw.double(), ref, **FP32)


def test_weighted_sum_gradient_of_inputs_only():
    xs = [_leaf(torch.randn(2, 3, 5, 7)) for _ in range(2)]
    w = torch.tensor([0.5, -2.0])  # fixed weights: no dw pass
    g = torch.randn(2, 3, 5, 7)
    grads = torch.autograd.grad(weighted_sum(xs, w), xs, g)
    torch.testing.assert_close(grads[0], 0.5 * g, rtol=0, atol=0)
    torch.testing.assert_close(grads[1], -2.0 * g, rtol=0, atol=0)


# ----------------------------------------------------------------------------- squash and the fused loss

SQUASH_CASES = [
    # (shape, d, dtype, layout)
    ((2, 17 * 8, 16, 12), 8, torch.float32, "nchw"),  # realistic: COCO J=17, d=8
    ((2, 16 * 8, 16, 12), 8, torch.float32, "channels_last"),  # MPII J=16
    ((1, 1, 7, 5), 1, torch.float32, "nchw"),  # d = 1 (scalar baseline), J = 1, N = 1
    ((3, 4 * 3, 9, 11), 3, torch.float32, "strided"),
    ((2, 3 * 8, 9, 7), 8, torch.bfloat16, "channels_last"),
    ((2, 3 * 8, 9, 7), 8, torch.float16, "nchw"),
]


@pytest.mark.parametrize("shape, d, dtype, layout", SQUASH_CASES)
def test_squash_score_matches_reference(shape, d, dtype, layout):
    v = torch.randn(shape)
    v[0, :d, 1, 2] = 0.0  # one exactly-zero vector
    v = _leaf(_layout(v.to(dtype), layout))
    scores = squash_score(v, d)
    n, c, h, w = shape
    assert scores.shape == (n, c // d, h, w) and scores.dtype == dtype
    g = torch.randn(scores.shape).to(dtype)
    (dv,) = torch.autograd.grad(scores, v, g)
    v64 = _leaf(v.double())
    ref = squash_score_reference(v64, d)
    (ref_dv,) = torch.autograd.grad(ref, v64, g.double())
    torch.testing.assert_close(scores.double(), ref, **TOL[dtype])
    torch.testing.assert_close(dv.double(), ref_dv, **TOL[dtype])
    assert torch.equal(dv[0, :d, 1, 2], torch.zeros(d, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_squash_at_zero_has_zero_gradient_and_no_nan(dtype):
    v = _leaf(torch.zeros(2, 3 * 4, 5, 3, dtype=dtype))
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


@pytest.mark.parametrize("shape, d, dtype, layout", LOSS_CASES)
def test_squash_mse_loss_matches_reference(shape, d, dtype, layout):
    n, c, h, w = shape
    v = _leaf(_layout((torch.randn(shape) * 0.7).to(dtype), layout))
    targets = torch.rand(n, c // d, h, w)
    weights = (torch.rand(n, c // d) > 0.3).float()
    loss = squash_mse_loss(v, d, targets, weights)
    assert loss.shape == () and loss.dtype == torch.float32
    (dv,) = torch.autograd.grad(loss * 3.0, v)  # the incoming gradient scales the stored one
    v64 = _leaf(v.double())
    ref = squash_mse_loss_reference(v64, d, targets, weights)
    (ref_dv,) = torch.autograd.grad(ref * 3.0, v64)
    torch.testing.assert_close(loss.double(), ref, **FP32)
    scale = ref_dv.abs().max().item()  # gradients are O(1 / (N J H W)): compare relative to their size
    torch.testing.assert_close(dv.double() / scale, ref_dv / scale, **TOL[dtype])
    with torch.no_grad():  # no gradient wanted: the loss alone
        torch.testing.assert_close(squash_mse_loss(v, d, targets, weights), loss, rtol=0, atol=0)


def test_squash_mse_loss_with_bf16_targets_and_half_weights():
    v = _leaf(torch.randn(2, 2 * 4, 5, 6))
    targets = torch.rand(2, 2, 5, 6).bfloat16()
    weights = torch.tensor([[1.0, 0.0], [0.5, 1.0]]).half()
    loss = squash_mse_loss(v, 4, targets, weights)
    torch.testing.assert_close(
        loss.double(), squash_mse_loss_reference(v.double(), 4, targets, weights), **FP32
    )


def test_squash_mse_loss_refuses_targets_that_need_grad():
    v = _leaf(torch.randn(1, 4, 2, 2))
    with pytest.raises(ValueError, match="must not require grad"):
        squash_mse_loss(v, 2, torch.rand(1, 2, 2, 2, requires_grad=True), torch.ones(1, 2))


# ----------------------------------------------------------------------------- argmax decoding


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_argmax_decode_hand_built_maps(layout):
    """Ties, peaks on each border and corner, all-zero and constant maps, NaN, +-inf."""
    maps, expected_xy, peak = decode_batch()
    assert_decoded(*argmax_decode(_layout(maps, layout)), expected_xy, peak)


def test_argmax_decode_vectors_hand_built_maps():
    vectors, expected_xy, peak = vector_batch(d=3)
    assert_decoded(*argmax_decode_vectors(vectors, 3), expected_xy, peak)
    assert_decoded(*argmax_decode_vectors(_layout(vectors, "channels_last"), 3), expected_xy, peak)


def test_argmax_decode_tie_between_pixels_of_the_same_lane_in_different_blocks():
    """The kernel scans 1024 pixels per step; a tie 1024 pixels later must not win."""
    scores = torch.zeros(1, 2, 40, 30)
    scores.view(1, 2, -1)[0, 0, [5, 5 + 1024]] = 1.0
    scores.view(1, 2, -1)[0, 1, [100, 100 + 1024, 3]] = torch.tensor([2.0, 2.0, 1.0])
    coords, maxvals = argmax_decode(scores)
    torch.testing.assert_close(coords, torch.tensor([[[5.0, 0.0], [10.0, 3.0]]]), rtol=0, atol=0)
    torch.testing.assert_close(maxvals, torch.tensor([[1.0, 2.0]]), rtol=0, atol=0)


@pytest.mark.parametrize(
    "shape, dtype, layout",
    [
        ((2, 17, 24, 18), torch.float32, "nchw"),  # realistic small (96x72 input / 4)
        ((1, 1, 13, 11), torch.float32, "nchw"),
        ((3, 16, 33, 35), torch.float32, "channels_last"),  # more than one block of pixels
        ((2, 5, 9, 7), torch.bfloat16, "nchw"),  # rounding makes ties: first index must win
        ((2, 3, 40, 30), torch.bfloat16, "nchw"),  # ties more than one block (1024 px) apart
        ((2, 5, 9, 7), torch.float16, "strided"),
    ],
)
def test_argmax_decode_matches_reference_on_random_maps(shape, dtype, layout):
    scores = _layout(torch.rand(shape).to(dtype), layout)
    coords, maxvals = argmax_decode(scores)
    ref_coords, ref_maxvals = argmax_decode_reference(scores)
    torch.testing.assert_close(coords, ref_coords, rtol=0, atol=0)
    torch.testing.assert_close(maxvals, ref_maxvals, rtol=0, atol=0)


@pytest.mark.parametrize(
    "shape, d, dtype, layout",
    [
        ((2, 17 * 8, 24, 18), 8, torch.float32, "nchw"),
        ((2, 3 * 8, 9, 7), 8, torch.float32, "channels_last"),
        ((1, 1, 7, 5), 1, torch.float32, "nchw"),
        ((2, 4 * 2, 9, 7), 2, torch.bfloat16, "strided"),
    ],
)
def test_argmax_decode_vectors_matches_reference(shape, d, dtype, layout):
    vectors = _layout(torch.randn(shape).to(dtype), layout)
    coords, maxvals = argmax_decode_vectors(vectors, d)
    ref_coords, ref_maxvals = argmax_decode_vectors_reference(vectors, d)
    torch.testing.assert_close(coords, ref_coords, rtol=0, atol=0)
    torch.testing.assert_close(maxvals, ref_maxvals, **FP32)


# ----------------------------------------------------------------------------- torch.library, compile, fvcore


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) kernels and autograd registration, checked by torch itself."""
    xs = [torch.randn(2, 3, 4, 5, requires_grad=True) for _ in range(3)]
    w = torch.randn(3, requires_grad=True)
    torch.library.opcheck(torch.ops.pnfs.weighted_sum.default, (xs, w, True))
    v = torch.randn(2, 2 * 4, 3, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.pnfs.squash_score.default, (v, 4))
    t, wt = torch.rand(2, 2, 3, 5), torch.ones(2, 2)
    torch.library.opcheck(torch.ops.pnfs.squash_mse_loss.default, (v, 4, t, wt, True))
    torch.library.opcheck(torch.ops.pnfs.argmax_decode.default, (t,))
    torch.library.opcheck(torch.ops.pnfs.argmax_decode_vectors.default, (v.detach(), 4))


def test_compile_fullgraph_through_the_kernels():
    def step(xs, w, v, t, wt):
        y = weighted_sum(xs, w, relu=True)
        s = squash_score(v * y.mean(), 2)
        loss = squash_mse_loss(v, 2, t, wt)
        return s.sum() + loss + argmax_decode(s)[1].sum() + argmax_decode_vectors(v, 2)[1].sum()

    xs = [torch.randn(2, 4, 5, 5, requires_grad=True) for _ in range(3)]
    w = torch.randn(3, requires_grad=True)
    v, t, wt = torch.randn(2, 4, 5, 5, requires_grad=True), torch.rand(2, 2, 5, 5), torch.ones(2, 2)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(xs, w, v, t, wt), [*xs, w, v])
    want = torch.autograd.grad(step(xs, w, v, t, wt), [*xs, w, v])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _KernelModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 1, bias=False)
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        y = self.conv(x)
        return squash_score(weighted_sum([y, y * 2, y + 1], self.w, relu=True), 2)


def test_fvcore_counts_the_custom_ops_like_their_reference(monkeypatch):
    from fvcore.nn import FlopCountAnalysis

    model, image = _KernelModel(), torch.randn(1, 3, 4, 4)

    def count(backend: str, handles: dict) -> FlopCountAnalysis:
        monkeypatch.setenv("PNFS_KERNELS", backend)
        analysis = FlopCountAnalysis(model, image).unsupported_ops_warnings(False).set_op_handle(**handles)
        analysis.total()
        return analysis

    on_torch = count("torch", FVCORE_HANDLES)
    on_triton = count("triton", FVCORE_HANDLES)
    assert on_triton.total() == on_torch.total() == 8 * 3 * 16  # the 1x1 convolution only
    assert not [op for op in on_triton.unsupported_ops() if op.startswith("pnfs::")]
    elementwise = count("triton", fvcore_handles(elementwise=True))
    # + 3 * numel(out) for the weighted sum, + numel(vectors) for n^2
    assert elementwise.total() == 8 * 3 * 16 + 3 * 8 * 16 + 8 * 16


# ----------------------------------------------------------------------------- the GPU's tiles, many tiles
#
# The cases above run the interpreter's large tiles (fewer programs, a faster interpreter). The
# tests below run the tile sizes the compiled GPU path uses (``*_COMPILED``), at shapes spanning
# several tiles in every grid dimension with a ragged last tile, so the multi-tile indexing a GPU
# runs is run here too.

_SQUASH = importlib.import_module("pnfs.kernels.squash")
_WEIGHTED_SUM = importlib.import_module("pnfs.kernels.weighted_sum")
_REDUCE = importlib.import_module("pnfs.kernels._reduce")


@contextlib.contextmanager
def gpu_tiles():
    """The compiled path's block sizes, for the duration of the block (hypothesis-safe)."""
    with (
        mock.patch.object(_SQUASH, "BLOCK_P", _SQUASH.BLOCK_P_COMPILED),
        mock.patch.object(_WEIGHTED_SUM, "BLOCK", _WEIGHTED_SUM.BLOCK_COMPILED),
        mock.patch.object(_WEIGHTED_SUM, "STRIDED_BLOCK", _WEIGHTED_SUM.STRIDED_BLOCK_COMPILED),
    ):
        yield


MULTI_TILE_PIXELS = [(40, 30), (64, 48)]  # 1200 and 3072 px: 5 and 12 tiles of 256, ragged / full+ragged W


def _check_squash(v: torch.Tensor, d: int) -> None:
    v = _leaf(v)
    scores = squash_score(v, d)
    g = torch.randn(scores.shape).to(v.dtype)
    (dv,) = torch.autograd.grad(scores, v, g)
    v64 = _leaf(v.double())
    ref = squash_score_reference(v64, d)
    (ref_dv,) = torch.autograd.grad(ref, v64, g.double())
    torch.testing.assert_close(scores.double(), ref, **TOL[v.dtype])
    torch.testing.assert_close(dv.double(), ref_dv, **TOL[v.dtype])


def _check_loss(v: torch.Tensor, d: int) -> None:
    n, c, h, w = v.shape
    v = _leaf(v)
    targets = torch.rand(n, c // d, h, w)
    weights = (torch.rand(n, c // d) > 0.3).float()
    loss = squash_mse_loss(v, d, targets, weights)
    (dv,) = torch.autograd.grad(loss, v)
    v64 = _leaf(v.double())
    ref = squash_mse_loss_reference(v64, d, targets, weights)
    (ref_dv,) = torch.autograd.grad(ref, v64)
    torch.testing.assert_close(loss.double(), ref, **FP32)
    scale = max(ref_dv.abs().max().item(), 1e-30)
    torch.testing.assert_close(dv.double() / scale, ref_dv / scale, **TOL[v.dtype])


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("hw", MULTI_TILE_PIXELS)
def test_squash_at_gpu_tiles_over_many_tiles(hw, layout):
    with gpu_tiles():
        v = _layout(torch.randn(2, 3 * 4, *hw), layout)
        v[1, -4:, -1, -1] = 3.0  # the very last pixel of the last tile of the last (n, j)
        _check_squash(v, 4)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("hw", MULTI_TILE_PIXELS)
def test_squash_mse_loss_at_gpu_tiles_over_many_tiles(hw, layout):
    with gpu_tiles():
        _check_loss(_layout(torch.randn(2, 3 * 4, *hw) * 0.7, layout), 4)


def test_squash_mse_loss_with_more_than_one_block_of_partials_per_row():
    """2 x 48 joints x 12 tiles of 256 px = 1152 partials: the second pass needs two blocks of 1024."""
    with gpu_tiles():
        n, j, d, (h, w) = 2, 48, 2, MULTI_TILE_PIXELS[1]
        assert n * j * -(-(h * w) // _SQUASH.BLOCK_P) > _REDUCE.BLOCK
        _check_loss(torch.randn(n, j * d, h, w) * 0.7, d)


@pytest.mark.parametrize("cols", [1, 1023, 1025, 4100])
def test_sum_rows_over_thousands_of_columns(cols):
    partials = torch.randn(3, cols)
    got = _REDUCE.sum_rows(partials, 0.5)
    torch.testing.assert_close(got.double(), 0.5 * partials.double().sum(dim=1), **FP32)


@pytest.mark.parametrize("hw", MULTI_TILE_PIXELS)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_argmax_decode_over_many_blocks_with_the_peak_anywhere(hw, where):
    h, w = hw
    scores = torch.rand(2, 3, h, w) * 0.5
    y, x = {"first": (0, 1), "middle": (h // 2, w // 2), "last": (h - 1, w - 2)}[where]
    scores[1, 2, y, x] = 1.0  # in the last block of 1024 px for "last"
    scores[1, 2, y, x + 1] = 0.9
    for row in (y - 1, y + 1):  # equal upper and lower neighbours: no y offset
        if 0 <= row < h:
            scores[1, 2, row, x] = 0.3
    coords, maxvals = argmax_decode(scores)
    ref_coords, ref_maxvals = argmax_decode_reference(scores)
    torch.testing.assert_close(coords, ref_coords, rtol=0, atol=0)
    torch.testing.assert_close(maxvals, ref_maxvals, rtol=0, atol=0)
    assert coords[1, 2].tolist() == [x + 0.25, float(y)]


@pytest.mark.parametrize("hw", MULTI_TILE_PIXELS)
def test_argmax_decode_vectors_over_many_blocks(hw):
    vectors = torch.randn(2, 3 * 2, *hw)
    vectors[0, 4:, -1, -3] = 9.0
    coords, maxvals = argmax_decode_vectors(vectors, 2)
    ref_coords, ref_maxvals = argmax_decode_vectors_reference(vectors, 2)
    torch.testing.assert_close(coords, ref_coords, rtol=0, atol=0)
    torch.testing.assert_close(maxvals, ref_maxvals, **FP32)
    assert coords[0, 2].tolist()[1] == hw[0] - 1


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("relu", [False, True])
def test_weighted_sum_at_gpu_tiles_over_more_than_two_tiles(layout, relu):
    """2 x 5 x 40 x 30 = 12000 elements: 12 tiles of 1024 (24 of 512 strided), the last ragged."""
    with gpu_tiles():
        shape = (2, 5, 40, 30)
        xs = [_leaf(_layout(torch.randn(shape), layout)) for _ in range(3)]
        w = _leaf(torch.randn(3))
        out = weighted_sum(xs, w, relu)
        g = torch.randn(shape)
        grads = torch.autograd.grad(out, [*xs, w], g)
        xs64 = [_leaf(x.double()) for x in xs]
        w64 = _leaf(w.double())
        ref = weighted_sum_reference(xs64, w64, relu)
        ref_grads = torch.autograd.grad(ref, [*xs64, w64], g.double())
        torch.testing.assert_close(out.double(), ref, **FP32)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got.double(), want, **FP32)


# ----------------------------------------------------------------------------- drawn shapes, layouts, dtypes

_DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
_LAYOUTS = st.sampled_from(["nchw", "channels_last", "strided", "sliced"])
_DRAWN = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _drawn_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "sliced":  # a channel and row window of a larger tensor
        n, c, h, w = x.shape
        big = torch.zeros(n, c + 3, h + 2, w, dtype=x.dtype)
        big[:, 2 : 2 + c, 1 : 1 + h] = x
        return big[:, 2 : 2 + c, 1 : 1 + h]
    return _layout(x, layout)


@_DRAWN
@given(
    n=st.integers(1, 2), j=st.integers(1, 3), d=st.sampled_from([1, 2, 3, 8]),
    h=st.integers(1, 40), w=st.integers(1, 33), dtype=_DTYPES, layout=_LAYOUTS, seed=st.integers(0, 2**16),
)  # fmt: skip
def test_squash_and_loss_on_drawn_shapes(n, j, d, h, w, dtype, layout, seed):
    torch.manual_seed(seed)
    with gpu_tiles():
        v = _drawn_layout(torch.randn(n, j * d, h, w).to(dtype), layout)
        _check_squash(v, d)
        _check_loss(v, d)


@_DRAWN
@given(
    n=st.integers(1, 2), j=st.integers(1, 3), h=st.integers(1, 40), w=st.integers(1, 40),
    dtype=_DTYPES, layout=_LAYOUTS, seed=st.integers(0, 2**16),
)  # fmt: skip
def test_argmax_decode_on_drawn_shapes(n, j, h, w, dtype, layout, seed):
    torch.manual_seed(seed)
    scores = _drawn_layout(torch.rand(n, j, h, w).to(dtype), layout)
    coords, maxvals = argmax_decode(scores)
    ref_coords, ref_maxvals = argmax_decode_reference(scores)
    torch.testing.assert_close(coords, ref_coords, rtol=0, atol=0)
    torch.testing.assert_close(maxvals, ref_maxvals, rtol=0, atol=0)


@_DRAWN
@given(
    k=st.integers(1, 12), relu=st.booleans(), n=st.integers(1, 2), c=st.integers(1, 6),
    h=st.integers(1, 24), w=st.integers(1, 24), dtype=_DTYPES, layout=_LAYOUTS, seed=st.integers(0, 2**16),
)  # fmt: skip
def test_weighted_sum_on_drawn_shapes(k, relu, n, c, h, w, dtype, layout, seed):
    torch.manual_seed(seed)
    with gpu_tiles():
        shape = (n, c, h, w)
        xs = [_leaf(_drawn_layout(torch.randn(shape).to(dtype), layout)) for _ in range(k)]
        wts = _leaf(torch.randn(k))
        out = weighted_sum(xs, wts, relu)
        g = torch.randn(shape).to(dtype)
        grads = torch.autograd.grad(out, [*xs, wts], g)
        xs64 = [_leaf(x.double()) for x in xs]
        w64 = _leaf(wts.double())
        ref = weighted_sum_reference(xs64, w64, relu)
        ref_grads = torch.autograd.grad(ref, [*xs64, w64], g.double())
        # k bf16 products summed in fp32 then rounded once: the tolerance grows with the magnitude
        torch.testing.assert_close(out.double(), ref, **TOL[dtype])
        for got, want in zip(grads[:-1], ref_grads[:-1]):
            torch.testing.assert_close(got.double(), want, **TOL[dtype])
        torch.testing.assert_close(grads[-1].double(), ref_grads[-1], atol=1e-4, rtol=1e-5)
