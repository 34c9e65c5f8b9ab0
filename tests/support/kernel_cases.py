"""What the kernel tests (``tests/kernels/``: one file per kernel, ``test_aot.py``, ``test_dtypes.py``) share.

* Hand-built decoding cases: each one 5x7 map (H=5, W=7) with the coordinates (x, y) and peak
  value a correct decoder must return: argmax with the first index on ties, 0.25 px toward the
  larger neighbour when the peak is not on that axis' border, and the NaN policy of
  ``pnfs.kernels.argmax_decode``.
* Interpreter helpers: tolerances, layouts, the compiled (GPU) tile sizes, and the fixture that
  selects ``PNFS_KERNELS=triton`` for every ``interpret``-marked test.
* AOT helpers: the ``pnfs.kernels.aot`` specialisations of one kernel module and the checks on
  their cubins (``aot``-marked tests).
* ``cuda_autocast_policy()``: CPU autocast with CUDA's fp32 op list, so the mixed dtypes a CUDA
  bf16 run hands the kernels reach them on the CPU (``kernels/test_dtypes.py``,
  ``test_autocast_cuda_policy.py``).

Interpreter oracle: the PyTorch reference evaluated in float64 on the very same (already
rounded) inputs and incoming gradients. Tolerances per dtype of the compared tensor:
    fp32  atol 1e-5, rtol 1e-5   (fp32 arithmetic, different summation order)
    bf16  atol 1e-2, rtol 1e-2   (one rounding of the result to 8 mantissa bits, 2^-9 relative)
    fp16  atol 1e-3, rtol 1e-3   (one rounding to 11 mantissa bits, 2^-12 relative)
Weight gradients and losses are fp32 sums of fp32 products in every case: fp32 tolerances.
The interpreter is ~2000x slower than compiled kernels, so the shapes are small.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

H, W = 5, 7
NAN = float("nan")
INF = float("inf")


@dataclass(frozen=True)
class DecodeCase:
    name: str
    values: dict[tuple[int, int], float]  # (x, y) -> value; every other pixel is ``background``
    x: float
    y: float
    peak: float
    background: float = 0.0

    def map(self) -> torch.Tensor:
        m = torch.full((H, W), self.background)
        for (x, y), v in self.values.items():
            m[y, x] = v
        return m


DECODE_CASES = [
    # tie between (2, 1) and (5, 3): the first in row-major order wins; right > left, below == above
    DecodeCase(
        "tie", {(2, 1): 1.0, (5, 3): 1.0, (3, 1): 0.5, (1, 1): 0.2, (2, 0): 0.3, (2, 2): 0.3}, 2.25, 1.0, 1.0
    ),
    DecodeCase("tie_in_one_row", {(1, 2): 2.0, (4, 2): 2.0, (2, 2): 1.0}, 1.25, 2.0, 2.0),
    DecodeCase("top_border", {(3, 0): 1.0, (4, 0): 0.1, (2, 0): 0.4, (3, 1): 0.9}, 2.75, 0.0, 1.0),
    DecodeCase("bottom_border", {(3, 4): 1.0, (4, 4): 0.6, (2, 4): 0.4, (3, 3): 0.9}, 3.25, 4.0, 1.0),
    DecodeCase("left_border", {(0, 2): 1.0, (0, 3): 0.6, (0, 1): 0.4, (1, 2): 0.9}, 0.0, 2.25, 1.0),
    DecodeCase("right_border", {(6, 2): 1.0, (6, 3): 0.1, (6, 1): 0.4, (5, 2): 0.9}, 6.0, 1.75, 1.0),
    DecodeCase("top_left_corner", {(0, 0): 1.0, (1, 0): 0.5, (0, 1): 0.5}, 0.0, 0.0, 1.0),
    DecodeCase("bottom_right_corner", {(6, 4): 1.0, (5, 4): 0.5, (6, 3): 0.5}, 6.0, 4.0, 1.0),
    DecodeCase("interior_equal_neighbours", {(3, 2): 1.0, (2, 2): 0.5, (4, 2): 0.5}, 3.0, 2.0, 1.0),
    DecodeCase("all_zero", {}, 0.0, 0.0, 0.0),
    DecodeCase("constant", {}, 0.0, 0.0, 0.25, background=0.25),
    # NaN counts as the maximum: the first NaN (row 2 before row 3) is the peak, value NaN
    DecodeCase(
        "nan_peak", {(1, 3): NAN, (4, 2): NAN, (5, 1): 9.0, (5, 2): 0.5, (4, 3): 0.2}, 4.25, 2.25, NAN
    ),
    # a NaN neighbour (of a NaN peak: any NaN is the peak) gives no offset on its axis
    DecodeCase("nan_neighbour", {(3, 2): NAN, (4, 2): NAN, (2, 2): 1.0, (3, 3): 1.0}, 3.0, 2.25, NAN),
    DecodeCase("all_nan", {}, 0.0, 0.0, NAN, background=NAN),
    DecodeCase("negative", {(4, 1): -0.5, (4, 2): -0.7, (4, 0): -0.9}, 4.0, 1.25, -0.5, background=-1.0),
    DecodeCase("minus_inf", {}, 0.0, 0.0, -INF, background=-INF),
    DecodeCase("plus_inf", {(2, 3): INF, (3, 3): 1.0}, 2.25, 3.0, INF),
]


def decode_batch(cases: list[DecodeCase] = DECODE_CASES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores [2, len(cases), H, W] (the cases, then again in reverse order) and expected coords, peaks."""
    maps = torch.stack([c.map() for c in cases])
    expected_xy = torch.tensor([[c.x, c.y] for c in cases])
    expected_peak = torch.tensor([c.peak for c in cases])
    flip = torch.arange(len(cases) - 1, -1, -1)
    return (
        torch.stack([maps, maps[flip]]),
        torch.stack([expected_xy, expected_xy[flip]]),
        torch.stack([expected_peak, expected_peak[flip]]),
    )


def assert_decoded(
    coords: torch.Tensor, maxvals: torch.Tensor, expected_xy: torch.Tensor, peak: torch.Tensor
):
    assert coords.dtype == torch.float32 and maxvals.dtype == torch.float32
    assert torch.isfinite(coords).all(), "coordinates must always be finite"
    torch.testing.assert_close(coords, expected_xy, rtol=0, atol=0)
    torch.testing.assert_close(maxvals, peak, rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------- interpreter helpers

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
}
FP32 = TOL[torch.float32]
GPU_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def assert_sum_close(got: torch.Tensor, want: torch.Tensor, terms_abs_sum: torch.Tensor) -> None:
    """A sum of many fp32 terms (``weighted_sum``'s dw) against its float64 reference.

    Tree and blocked summation of N terms err by at most about log2(N) * 2^-24 of the sum of
    the terms' magnitudes, not of the result: with cancellation the result can be far smaller
    than its terms (dw = 0.17 from 12,000 products of size ~0.6, 1.4e-5 off in fp32). So the
    bound is 1e-6 * sum|terms| (log2(N) * 2^-24 < 1e-6 up to N = 2^16), plus 1e-5 of the
    result; a lost tile or partial is off by a whole partial sum, orders above that.
    """
    atol = 1e-6 * terms_abs_sum.double()
    assert torch.all((got.double() - want).abs() <= atol + 1e-5 * want.abs()), (
        f"sum off by {(got.double() - want).abs().tolist()}, allowed {(atol + 1e-5 * want.abs()).tolist()}"
    )


def dw_terms_abs_sum(xs: list[torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """[k]: sum |x_k * g| over every element, the magnitude dw_k = sum x_k * g is summed from."""
    return torch.stack([(x.double() * g.double()).abs().sum() for x in xs])


@pytest.fixture(autouse=True)
def triton_for_interpreter_cases(request, monkeypatch):
    """``interpret``-marked tests run the Triton kernels (``PNFS_KERNELS=triton``)."""
    if request.node.get_closest_marker("interpret"):
        monkeypatch.setenv("PNFS_KERNELS", "triton")


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
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


def in_drawn_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``in_layout``, plus "sliced": a channel and row window of a larger tensor."""
    if layout == "sliced":
        n, c, h, w = x.shape
        big = torch.zeros(n, c + 3, h + 2, w, dtype=x.dtype)
        big[:, 2 : 2 + c, 1 : 1 + h] = x
        return big[:, 2 : 2 + c, 1 : 1 + h]
    return in_layout(x, layout)


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().requires_grad_()


DRAWN_DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
DRAWN_LAYOUTS = st.sampled_from(["nchw", "channels_last", "strided", "sliced"])
DRAWN = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# The interpreter normally runs large tiles (fewer programs, a faster interpreter). Tests that
# take ``gpu_tiles()`` run the tile sizes the compiled GPU path uses (``*_COMPILED``), at shapes
# spanning several tiles with a ragged last one, so the multi-tile indexing a GPU runs is run here.
# 1200 and 3072 px: squash's flat tiles of 512 -> 3 (ragged) and 6; its strided tiles of 256 -> 5
# (ragged) and 12; argmax_decode's scan steps of 1024 -> 2 (ragged) and 3.
MULTI_TILE_PIXELS = [(40, 30), (64, 48)]

_SQUASH = importlib.import_module("pnfs.kernels.squash")
_WEIGHTED_SUM = importlib.import_module("pnfs.kernels.weighted_sum")


@contextlib.contextmanager
def gpu_tiles():
    """The compiled path's block sizes, for the duration of the block (hypothesis-safe)."""
    with (
        mock.patch.object(_SQUASH, "BLOCK_P", _SQUASH.BLOCK_P_COMPILED),
        mock.patch.object(_SQUASH, "STRIDED_BLOCK_P", _SQUASH.STRIDED_BLOCK_P_COMPILED),
        mock.patch.object(_WEIGHTED_SUM, "BLOCK", _WEIGHTED_SUM.BLOCK_COMPILED),
        mock.patch.object(_WEIGHTED_SUM, "STRIDED_BLOCK", _WEIGHTED_SUM.STRIDED_BLOCK_COMPILED),
    ):
        yield


# ----------------------------------------------------------------------------- AOT helpers


def _aot():
    from pnfs.kernels import aot

    return aot


def _aot_skip() -> list:
    missing = _aot().toolchain_missing()
    return [
        pytest.mark.skipif(bool(missing), reason=str(missing)),
        pytest.mark.skipif(
            os.environ.get("TRITON_INTERPRET") == "1",
            reason="compiles for a GPU: not in the interpreter pass",
        ),
    ]


def aot_cases(module: str, dense_only: bool = False) -> list:
    """(spec, device) params of ``pnfs.kernels.aot.SPECIALISATIONS`` of one kernel module, for
    sm_90 and sm_80; skipped without triton/ptxas and in the interpreter pass."""
    aot = _aot()
    return [
        pytest.param(spec, device, id=f"{spec.label}-{device.name}", marks=_aot_skip())
        for spec in aot.SPECIALISATIONS
        if spec.module == module and (spec.dense or not dense_only)
        for device in aot.DEVICES
    ]


def assert_compiles_without_spills_within_shared_memory(spec, device) -> None:
    compiled = _aot().compile_spec(spec, device.arch)
    assert compiled.local == 0 and compiled.stack == 0, (
        f"{spec.label}: spills to local memory on {device.name}"
    )
    assert 0 < compiled.registers <= 255
    assert compiled.shared <= device.smem_per_block, f"{spec.label}: {compiled.shared} B of shared memory"
    assert compiled.occupancy(device) > 0, f"{spec.label} cannot be resident on {device.name}"


def assert_no_atomic_operations(spec, device) -> None:
    """The weight-gradient and loss reductions are per-program partials plus a fixed-order second pass."""
    compiled = _aot().compile_spec(spec, device.arch)
    assert compiled.atomics() == []
    assert "atomic" not in compiled.ttgir


def assert_vectorised_global_loads(spec, device) -> None:
    compiled = _aot().compile_spec(spec, device.arch)
    assert max(compiled.load_widths()) >= 2, f"{spec.label}: scalar loads only on {device.name}"


# --------------------------------------------------------------- CUDA's autocast policy on the CPU

# CUDA autocast runs these aten ops in fp32 where CPU autocast leaves them in the input dtype
# (torch's aten/src/ATen/autocast_mode.cpp: the CUDA ``fp32`` list, then ``fp32_set_opt_dtype``,
# whose ops return fp32 unless given a dtype). Bilinear up-sampling is the one that crashed
# the first bf16 run on an H200 (docs/design.md §3); ``pow`` also catches ``Tensor.square``.
CUDA_FP32_OPS = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "tan", "pow", "softplus", "layer_norm", "native_layer_norm",
    "group_norm", "frobenius_norm", "nuclear_norm", "cosine_similarity", "poisson_nll_loss",
    "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss",
    "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d",
    "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d",
    "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d",
    "upsample_bicubic2d", "_upsample_bicubic2d_aa",
)  # fmt: skip
CUDA_FP32_UNLESS_DTYPE_OPS = (
    "prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm", "linalg_matrix_norm", "sum",
)  # fmt: skip
_LOWER = (torch.float16, torch.bfloat16)


def _in_fp32(op, unless_dtype: bool):
    """An AutocastCPU kernel for ``op``: floating inputs to fp32, then ``op`` with autocast off."""

    def kernel(*args, **kwargs):
        if unless_dtype and kwargs.get("dtype") is not None:
            with torch.autocast("cpu", enabled=False):
                return op(*args, **kwargs)

        def to_fp32(value):
            return value.float() if isinstance(value, torch.Tensor) and value.dtype in _LOWER else value

        args, kwargs = torch.utils._pytree.tree_map(to_fp32, (args, kwargs))
        with torch.autocast("cpu", enabled=False):
            return op(*args, **kwargs)

    return kernel


@contextlib.contextmanager
def cuda_autocast_policy():
    """Inside: CPU autocast follows CUDA's fp32 policy for :data:`CUDA_FP32_OPS` and
    :data:`CUDA_FP32_UNLESS_DTYPE_OPS` (each op overload that takes a tensor and has no CPU
    autocast rule of its own gets an ``AutocastCPU`` kernel; ops CPU autocast already runs in
    fp32 keep theirs). Both autocasts cast convolutions and matmuls to bf16, so under
    ``torch.autocast("cpu", torch.bfloat16)`` the model sees the dtypes a CUDA run gives it:
    e.g. an ``Upsample`` returns fp32 next to bf16 convolution outputs. Registered at the
    dispatcher, so composite ops that call these (``square`` -> ``pow``) follow as on CUDA."""
    library = torch.library.Library("aten", "IMPL")
    try:
        for names, unless_dtype in ((CUDA_FP32_OPS, False), (CUDA_FP32_UNLESS_DTYPE_OPS, True)):
            for name in names:
                packet = getattr(torch.ops.aten, name, None)
                for overload in packet.overloads() if packet is not None else ():
                    op = getattr(packet, overload)
                    if not any(isinstance(a.type, torch.TensorType) for a in op._schema.arguments):
                        continue
                    qualified = name if overload == "default" else f"{name}.{overload}"
                    if torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{qualified}", "AutocastCPU"):
                        continue
                    library.impl(qualified, _in_fp32(op, unless_dtype), "AutocastCPU")
        yield
    finally:
        library._destroy()
