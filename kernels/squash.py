"""Vector-in-pixel score: the length of the squashed vector, without a square root.

    vectors [N, J*d, H, W] -> scores [N, J, H, W],   score = n^2 / (1 + n^2),  n^2 = sum_t v_t^2

Channels j*d .. j*d+d-1 hold joint j's vector (paper eq. 6). The gradient is
2 v / (1 + n^2)^2 * g, exactly 0 at v = 0 (no sqrt, no epsilon). n^2 is accumulated in fp32;
loads and stores use the tensors' dtype.

The fused loss variant computes the training loss of docs/design.md §2 in the same pass,

    loss = mean_{n,j} 0.5 * w_nj * mean_{h,w} (score - target)^2,

and, when ``vectors`` needs a gradient, also dloss/dv = 2 v / (1+n^2)^2 * w_nj * (score - target)
/ (N*J*H*W), which the backward only scales by the incoming scalar gradient. The loss sum is a
per-program fp32 partial and a second deterministic pass (no atomics).

Dtypes (``pnfs.kernels._dtypes``): n^2 and the loss are fp32 whatever the vectors' dtype;
scores have ``result_dtype([vectors])`` (the autocast dtype under autocast, else the vectors'
dtype); the loss is a 0-dim fp32 tensor; targets and loss weights may have any floating dtype
(read as fp32); dloss/dvectors and dscore/dvectors have the vectors' dtype.

Any strides are read in place (NCHW, channels_last, slices); scores come back channels_last
when the vectors are channels_last, NCHW-contiguous otherwise. The launcher picks the tile per
tensor: NCHW planes (``sW == 1``, ``sH == W``; ``FLAT`` for the vectors and their gradient,
``MAP_FLAT`` for scores, incoming gradients and targets) are addressed as ``plane start + p``
with the pixels innermost, so Triton proves the loads contiguous and vectorises them; any other
layout (channels_last: channels innermost) goes through ``(p // W, p % W)``.
"""

import torch

from pnfs.kernels._compat import block_size, cdiv, flat_planes, jit, next_power_of_2, tl
from pnfs.kernels._dtypes import compute_dtype, result_dtype
from pnfs.kernels._reduce import sum_rows
from pnfs.kernels.backend import device_guard, run, traced, use_triton

# pixels per program on a GPU, from the AOT report (bench/README.md): the flat path's
# [BLOCK_D, 512] tile loads 4 pixels per thread as one 128-bit load (32-56 registers at d = 8,
# fp32); the strided path's [256, BLOCK_D] tile needs up to 114 registers (202 at 512)
BLOCK_P_COMPILED = 512
STRIDED_BLOCK_P_COMPILED = 256
NUM_WARPS = 4
BLOCK_P = block_size(compiled=BLOCK_P_COMPILED, interpreted=1024)
STRIDED_BLOCK_P = block_size(compiled=STRIDED_BLOCK_P_COMPILED, interpreted=1024)


def _accumulation_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or in fp64 when it is fp64 (so the reference passes float64 gradcheck)."""
    return x.to(compute_dtype(x.dtype))


def squash_score_reference(vectors: torch.Tensor, d: int) -> torch.Tensor:
    """Eager PyTorch, accumulating n^2 in fp32 (fp64 for fp64), returning ``result_dtype([vectors])``."""
    n, c, h, w = vectors.shape
    if c % d:
        raise ValueError(f"squash_score: {c} channels are not a multiple of d={d}")
    n2 = _accumulation_dtype(vectors).reshape(n, c // d, d, h, w).square().sum(dim=2)
    return (n2 / (1.0 + n2)).to(result_dtype([vectors]))


def squash_mse_loss_reference(
    vectors: torch.Tensor, d: int, targets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Eager PyTorch: ``mean_{n,j} 0.5 w_nj mean_hw (score - target)^2``, a 0-dim fp32 (fp64) tensor."""
    n, c, h, w = vectors.shape
    n2 = _accumulation_dtype(vectors).reshape(n, c // d, d, h, w).square().sum(dim=2)
    per_joint = (n2 / (1.0 + n2) - targets.to(n2.dtype)).square().mean(dim=(2, 3))
    return (0.5 * weights.to(n2.dtype) * per_joint).mean()


# ----------------------------------------------------------------------------- Triton kernels


@jit
def _joint_tile(
    n, j, p, pmask, W, sN, sC, sH, sW, D: tl.constexpr, BLOCK_D: tl.constexpr, FLAT: tl.constexpr
):
    """Offsets and mask of joint j's D channels at pixels p, the contiguous dimension innermost.

    FLAT (each channel plane one row-major block, ``sW == 1``, ``sH == W``: NCHW): a
    [BLOCK_D, BLOCK_P] tile at ``n*sN + c*sC + p``, pixels innermost (contiguous, vectorised).
    Otherwise (channels_last, where channels are the contiguous dimension, or any other view):
    [BLOCK_P, BLOCK_D] at ``n*sN + c*sC + (p // W)*sH + (p % W)*sW``, channels innermost.
    """
    t = tl.arange(0, BLOCK_D)
    c = j * D + t
    if FLAT:
        offs = n * sN + c[:, None] * sC + p[None, :]
        mask = (t < D)[:, None] & pmask[None, :]
    else:
        offs = n * sN + c[None, :] * sC + ((p // W) * sH + (p % W) * sW)[:, None]
        mask = pmask[:, None] & (t < D)[None, :]
    return offs, mask


@jit
def _sum_channels(x, FLAT: tl.constexpr):
    """[BLOCK_P] sums over the channel axis of a _joint_tile-shaped tile."""
    if FLAT:
        total = tl.sum(x, axis=0)
    else:
        total = tl.sum(x, axis=1)
    return total


@jit
def _per_pixel(x, FLAT: tl.constexpr):
    """A [BLOCK_P] vector broadcastable against a _joint_tile-shaped tile."""
    if FLAT:
        tile = x[None, :]
    else:
        tile = x[:, None]
    return tile


@jit
def _map_offset(n, j, p, W, sN, sC, sH, sW, FLAT: tl.constexpr):
    """Offsets of pixels p of map (n, j): ``n*sN + j*sC + p`` when FLAT, else via (p // W, p % W)."""
    if FLAT:
        offs = n * sN + j * sC + p
    else:
        offs = n * sN + j * sC + (p // W) * sH + (p % W) * sW
    return offs


@jit
def _squash_fwd_kernel(
    v_ptr, s_ptr, J, HW, W,
    vsN, vsC, vsH, vsW, ssN, ssC, ssH, ssW,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    FLAT: tl.constexpr, MAP_FLAT: tl.constexpr,
):  # fmt: skip
    nj = tl.program_id(0).to(tl.int64)
    n = nj // J
    j = nj % J
    p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW
    offs, mask = _joint_tile(n, j, p, pmask, W, vsN, vsC, vsH, vsW, D, BLOCK_D, FLAT)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    n2 = _sum_channels(v * v, FLAT)
    score = n2 / (1.0 + n2)
    soffs = _map_offset(n, j, p, W, ssN, ssC, ssH, ssW, MAP_FLAT)
    tl.store(s_ptr + soffs, score.to(s_ptr.dtype.element_ty), mask=pmask)


@jit
def _squash_bwd_kernel(
    v_ptr, g_ptr, dv_ptr, J, HW, W,
    vsN, vsC, vsH, vsW, gsN, gsC, gsH, gsW, dsN, dsC, dsH, dsW,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    FLAT: tl.constexpr, MAP_FLAT: tl.constexpr,
):  # fmt: skip
    nj = tl.program_id(0).to(tl.int64)
    n = nj // J
    j = nj % J
    p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW
    offs, mask = _joint_tile(n, j, p, pmask, W, vsN, vsC, vsH, vsW, D, BLOCK_D, FLAT)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    den = 1.0 + _sum_channels(v * v, FLAT)
    goffs = _map_offset(n, j, p, W, gsN, gsC, gsH, gsW, MAP_FLAT)
    g = tl.load(g_ptr + goffs, mask=pmask, other=0.0).to(tl.float32)
    coef = 2.0 * g / (den * den)
    doffs, _ = _joint_tile(n, j, p, pmask, W, dsN, dsC, dsH, dsW, D, BLOCK_D, FLAT)
    tl.store(dv_ptr + doffs, (v * _per_pixel(coef, FLAT)).to(dv_ptr.dtype.element_ty), mask=mask)


@jit
def _squash_mse_kernel(
    v_ptr, t_ptr, w_ptr, partial_ptr, dv_ptr, J, HW, W, scale,
    vsN, vsC, vsH, vsW, tsN, tsC, tsH, tsW, wsN, wsJ, dsN, dsC, dsH, dsW,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    FLAT: tl.constexpr, MAP_FLAT: tl.constexpr,
):  # fmt: skip
    nj = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1).to(tl.int64)
    n = nj // J
    j = nj % J
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW
    offs, mask = _joint_tile(n, j, p, pmask, W, vsN, vsC, vsH, vsW, D, BLOCK_D, FLAT)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    den = 1.0 + _sum_channels(v * v, FLAT)
    score = (den - 1.0) / den
    toffs = _map_offset(n, j, p, W, tsN, tsC, tsH, tsW, MAP_FLAT)
    target = tl.load(t_ptr + toffs, mask=pmask, other=0.0)
    diff = tl.where(pmask, score - target.to(tl.float32), 0.0)
    weight = tl.load(w_ptr + n * wsN + j * wsJ).to(tl.float32)
    tl.store(partial_ptr + nj * tl.num_programs(1) + pb, weight * tl.sum(diff * diff, axis=0))
    if COMPUTE_GRAD:
        coef = 2.0 * scale * weight * diff / (den * den)
        doffs, _ = _joint_tile(n, j, p, pmask, W, dsN, dsC, dsH, dsW, D, BLOCK_D, FLAT)
        tl.store(dv_ptr + doffs, (v * _per_pixel(coef, FLAT)).to(dv_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _block_d(d: int) -> int:
    return max(2, next_power_of_2(d))


def _empty_scores(vectors: torch.Tensor, d: int, dtype: torch.dtype) -> torch.Tensor:
    n, c, h, w = vectors.shape
    channels_last = vectors.is_contiguous(memory_format=torch.channels_last) and not vectors.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((n, c // d, h, w), device=vectors.device, dtype=dtype, memory_format=fmt)


def _grid(vectors: torch.Tensor, d: int, flat: bool) -> tuple[tuple[int, int], int]:
    """((N*J, pixel tiles), BLOCK_P): the flat path's tile, or the strided path's."""
    n, c, h, w = vectors.shape
    block = BLOCK_P if flat else STRIDED_BLOCK_P
    return (n * (c // d), cdiv(h * w, block)), block


def _squash_forward(vectors: torch.Tensor, d: int, out_dtype: torch.dtype) -> torch.Tensor:
    scores = _empty_scores(vectors, d, out_dtype)
    if scores.numel() == 0:
        return scores
    _, j, h, w = scores.shape
    flat = flat_planes(vectors)
    grid, block = _grid(vectors, d, flat)
    _squash_fwd_kernel[grid](
        vectors, scores, j, h * w, w, *vectors.stride(), *scores.stride(),
        D=d, BLOCK_D=_block_d(d), BLOCK_P=block, FLAT=flat, MAP_FLAT=flat_planes(scores),
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return scores


def _squash_backward(grad: torch.Tensor, vectors: torch.Tensor, d: int) -> torch.Tensor:
    dv = torch.empty_like(vectors)
    if dv.numel() == 0:
        return dv
    _, c, h, w = vectors.shape
    flat = flat_planes(vectors) and flat_planes(dv)
    grid, block = _grid(vectors, d, flat)
    _squash_bwd_kernel[grid](
        vectors, grad, dv, c // d, h * w, w, *vectors.stride(), *grad.stride(), *dv.stride(),
        D=d, BLOCK_D=_block_d(d), BLOCK_P=block, FLAT=flat, MAP_FLAT=flat_planes(grad),
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return dv


def _squash_mse_forward(
    vectors: torch.Tensor, d: int, targets: torch.Tensor, weights: torch.Tensor, compute_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss 0-dim fp32, dloss/dvectors in the layout of empty_like(vectors), or empty [0])."""
    n, c, h, w = vectors.shape
    dv = torch.empty_like(vectors) if compute_grad else vectors.new_empty(0)
    if vectors.numel() == 0:
        return vectors.new_zeros((), dtype=torch.float32), dv
    flat = flat_planes(vectors) and (not compute_grad or flat_planes(dv))
    grid, block = _grid(vectors, d, flat)
    partials = torch.empty(grid, device=vectors.device, dtype=torch.float32)
    scale = 1.0 / (n * (c // d) * h * w)
    _squash_mse_kernel[grid](
        vectors, targets, weights, partials, dv if compute_grad else vectors, c // d, h * w, w, scale,
        *vectors.stride(), *targets.stride(), *weights.stride(),
        *(dv.stride() if compute_grad else vectors.stride()),
        D=d, BLOCK_D=_block_d(d), BLOCK_P=block, COMPUTE_GRAD=compute_grad,
        FLAT=flat, MAP_FLAT=flat_planes(targets), num_warps=NUM_WARPS,
    )  # fmt: skip
    loss = sum_rows(partials.reshape(1, -1), 0.5 * scale).reshape(())
    return loss, dv


# ----------------------------------------------------------------------------- autograd


def _squash_grad(ctx, grad: torch.Tensor, backward) -> torch.Tensor:
    """``backward`` is :func:`_squash_backward` (eager) or its custom op (traced)."""
    (vectors,) = ctx.saved_tensors
    with device_guard(vectors.device):
        return backward(grad, vectors, ctx.d)


def _mse_grad(ctx, grad_loss: torch.Tensor) -> torch.Tensor:
    (dv,) = ctx.saved_tensors
    return dv * grad_loss.to(dv.dtype)


class _SquashFunction(torch.autograd.Function):
    """Eager mode: direct launches, without the custom op's dispatch (backend.traced)."""

    @staticmethod
    def forward(ctx, vectors: torch.Tensor, d: int, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.d = d
        ctx.save_for_backward(vectors)
        return _squash_forward(vectors, d, out_dtype)

    @staticmethod
    def backward(ctx, grad):
        return _squash_grad(ctx, grad, _squash_backward), None, None


class _SquashMseFunction(torch.autograd.Function):
    """Eager mode: the loss and, when needed, dloss/dvectors in one launch; the backward scales it."""

    @staticmethod
    def forward(ctx, vectors, d: int, targets, weights, compute_grad: bool) -> torch.Tensor:
        loss, dv = _squash_mse_forward(vectors, d, targets, weights, compute_grad)
        ctx.save_for_backward(dv)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return _mse_grad(ctx, grad_loss), None, None, None, None


@torch.library.custom_op("pnfs::squash_score", mutates_args=())
def _squash_op(vectors: torch.Tensor, d: int, out_dtype: torch.dtype) -> torch.Tensor:
    return _squash_forward(vectors, d, out_dtype)


@_squash_op.register_fake
def _(vectors, d, out_dtype):
    return _empty_scores(vectors, d, out_dtype)


@torch.library.custom_op("pnfs::squash_score_backward", mutates_args=())
def _squash_backward_op(grad: torch.Tensor, vectors: torch.Tensor, d: int) -> torch.Tensor:
    return _squash_backward(grad, vectors, d)


@_squash_backward_op.register_fake
def _(grad, vectors, d):
    return torch.empty_like(vectors)


def _squash_op_setup(ctx, inputs, output):
    vectors, d, _ = inputs
    ctx.d = d
    ctx.save_for_backward(vectors)


def _squash_op_backward(ctx, grad):
    return _squash_grad(ctx, grad, _squash_backward_op), None, None


torch.library.register_autograd("pnfs::squash_score", _squash_op_backward, setup_context=_squash_op_setup)


@torch.library.custom_op("pnfs::squash_mse_loss", mutates_args=())
def _squash_mse_op(
    vectors: torch.Tensor, d: int, targets: torch.Tensor, weights: torch.Tensor, compute_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _squash_mse_forward(vectors, d, targets, weights, compute_grad)


@_squash_mse_op.register_fake
def _(vectors, d, targets, weights, compute_grad):
    dv = torch.empty_like(vectors) if compute_grad else vectors.new_empty(0)
    return vectors.new_empty((), dtype=torch.float32), dv


def _mse_op_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _mse_op_backward(ctx, grad_loss, grad_dv):
    return _mse_grad(ctx, grad_loss), None, None, None, None


torch.library.register_autograd("pnfs::squash_mse_loss", _mse_op_backward, setup_context=_mse_op_setup)


# ----------------------------------------------------------------------------- public API


def _check(vectors: torch.Tensor, d: int) -> None:
    if vectors.dim() != 4:
        raise ValueError(f"squash: vectors must be [N, J*d, H, W], got shape {tuple(vectors.shape)}")
    if d < 1 or vectors.shape[1] % d:
        raise ValueError(f"squash: {vectors.shape[1]} channels are not a multiple of d={d}")


def squash_score(vectors: torch.Tensor, d: int) -> torch.Tensor:
    """[N, J*d, H, W] -> [N, J, H, W] scores n^2/(1+n^2) in [0, 1), n^2 summed in fp32.

    The scores have ``result_dtype([vectors])``: the autocast dtype under autocast for the
    vectors' device, else the vectors' dtype. Their gradient has the vectors' dtype.
    """
    _check(vectors, d)
    out_dtype = result_dtype([vectors])
    if not use_triton(vectors, "squash_score", out_dtype):
        return squash_score_reference(vectors, d)
    if traced():
        kernel = lambda: _squash_op(vectors, d, out_dtype)
    else:
        kernel = lambda: _SquashFunction.apply(vectors, d, out_dtype)
    return run("squash_score", kernel, lambda: squash_score_reference(vectors, d), vectors.device)


def squash_mse_loss(
    vectors: torch.Tensor, d: int, targets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Training loss straight from the vectors: ``mean_{n,j} 0.5 w mean_hw (score - target)^2``.

    vectors [N, J*d, H, W], targets [N, J, H, W], weights [N, J] -> 0-dim fp32 loss (fp64 on the
    reference path for fp64 vectors), under autocast too; any floating dtypes, mixed. Targets and
    weights are data: they take no gradient. dloss/dvectors has the vectors' dtype.
    """
    _check(vectors, d)
    n, c, h, w = vectors.shape
    if targets.shape != (n, c // d, h, w):
        raise ValueError(f"squash_mse_loss: targets {tuple(targets.shape)}, expected {(n, c // d, h, w)}")
    if weights.shape != (n, c // d):
        raise ValueError(f"squash_mse_loss: weights {tuple(weights.shape)}, expected {(n, c // d)}")
    if not use_triton(vectors, "squash_mse_loss"):
        return squash_mse_loss_reference(vectors, d, targets, weights)
    if targets.requires_grad or weights.requires_grad:
        raise ValueError("squash_mse_loss: targets and weights must not require grad (they are data)")
    compute_grad = torch.is_grad_enabled() and vectors.requires_grad
    if traced():
        kernel = lambda: _squash_mse_op(vectors, d, targets, weights, compute_grad)[0]
    else:
        kernel = lambda: _SquashMseFunction.apply(vectors, d, targets, weights, compute_grad)
    return run(
        "squash_mse_loss",
        kernel,
        lambda: squash_mse_loss_reference(vectors, d, targets, weights),
        vectors.device,
    )
