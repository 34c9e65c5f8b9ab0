"""Fused weighted sum of same-shape tensors: the mixed-op sum of a cell node.

    out = act( sum_k w_k * x_k ),   act = ReLU or identity,  1 <= K <= 12

A hidden node h_j sums, over every edge i < j and every non-zero op o, the op output
weighted by |O| * softmax(alpha_(i,j))_o; the input node I sums the three scale-transformed
inputs weighted by 3 * softmax(beta) and applies ReLU (paper eq. 2-4). The weights arrive
already softmaxed and scaled, so the softmax Jacobian stays in PyTorch autograd.

Backward (g = dL/dout, m = [out > 0] with ReLU, else 1; the ReLU is recomputed from the
saved output):

    dx_k = w_k * m * g                     (one fused pass writing all K gradients)
    dw_k = sum over elements of x_k * m * g (fp32 partial per program, then a second pass
                                             summing the partials in a fixed order: no
                                             atomics, bitwise reproducible)

Layouts: any strides, NCHW and channels_last alike. When every input has the same strides
the kernel reads them in place (dense layouts as one flat range, other strides through a
4-d index). Only when the inputs' strides differ from each other are the odd ones copied
into the layout of ``torch.empty_like(inputs[0])`` (the output's layout); the incoming
gradient is likewise copied only when its layout differs from the output's.

Dtypes (``pnfs.kernels._dtypes``): the inputs may mix fp32, bf16 and fp16, as autocast hands
them over (on CUDA the up-sampled input of an input node is fp32, the others bf16). Arithmetic
is fp32; each input is loaded in its own dtype, the result is stored in
``result_dtype(inputs)`` (the autocast dtype under autocast, else the promoted dtype) and each
dx_k in input k's dtype; dw is fp32 sums returned in the weights' dtype.
"""

from collections.abc import Sequence

import torch

from pnfs.kernels._compat import block_size, cdiv, jit, same_layout, strides4, tl
from pnfs.kernels._dtypes import compute_dtype, result_dtype
from pnfs.kernels._reduce import sum_rows
from pnfs.kernels.backend import device_guard, run, traced, use_triton

MAX_INPUTS = 12
BLOCK_COMPILED = 1024  # elements per program on a GPU, dense layouts
# strided layouts: the 4-d index math of 1024 elements spills registers (bench/kernels_aot.py)
STRIDED_BLOCK_COMPILED = 512
BLOCK = block_size(compiled=BLOCK_COMPILED, interpreted=4096)
STRIDED_BLOCK = block_size(compiled=STRIDED_BLOCK_COMPILED, interpreted=4096)


def weighted_sum_reference(
    inputs: Sequence[torch.Tensor], weights: torch.Tensor, relu: bool = False
) -> torch.Tensor:
    """Eager PyTorch: the fallback and the test oracle. ``weights``: [K].

    Sums in fp32 (fp64 for fp64 inputs) whatever the inputs' dtypes and returns
    ``result_dtype(inputs)``, like the Triton path. Each weight is a 1-element tensor of the
    inputs' rank, so ``x_k * w_k`` promotes to the compute dtype in the same kernel (a 0-dim
    weight would not promote a bf16 ``x_k``).
    """
    out_dtype = result_dtype(inputs)
    w = weights.to(compute_dtype(out_dtype))
    if not inputs:
        raise ValueError("weighted_sum: no inputs")
    out = inputs[0] * w[0].reshape((1,) * inputs[0].dim())
    for k, x in enumerate(inputs[1:], start=1):
        out = out + x * w[k].reshape((1,) * x.dim())
    if relu:
        out = torch.relu(out)
    return out.to(out_dtype)


# ----------------------------------------------------------------------------- Triton kernels


@jit
def _strided_offset(idx, S1, S2, S3, st0, st1, st2, st3):
    """Row-major logical index over (S0, S1, S2, S3) -> element offset with strides st*."""
    i3 = idx % S3
    rest = idx // S3
    i2 = rest % S2
    rest = rest // S2
    i1 = rest % S1
    i0 = rest // S1
    return i0 * st0 + i1 * st1 + i2 * st2 + i3 * st3


@jit
def _load_f32(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@jit
def _weighted_sum_fwd_kernel(
    out_ptr, w_ptr,
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11,
    numel, S1, S2, S3,
    xs0, xs1, xs2, xs3,
    os0, os1, os2, os3,
    K: tl.constexpr, RELU: tl.constexpr, DENSE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    if DENSE:
        xo = idx
        oo = idx
    else:
        xo = _strided_offset(idx, S1, S2, S3, xs0, xs1, xs2, xs3)
        oo = _strided_offset(idx, S1, S2, S3, os0, os1, os2, os3)
    acc = _load_f32(x0, xo, mask) * tl.load(w_ptr)
    if K > 1:
        acc += _load_f32(x1, xo, mask) * tl.load(w_ptr + 1)
    if K > 2:
        acc += _load_f32(x2, xo, mask) * tl.load(w_ptr + 2)
    if K > 3:
        acc += _load_f32(x3, xo, mask) * tl.load(w_ptr + 3)
    if K > 4:
        acc += _load_f32(x4, xo, mask) * tl.load(w_ptr + 4)
    if K > 5:
        acc += _load_f32(x5, xo, mask) * tl.load(w_ptr + 5)
    if K > 6:
        acc += _load_f32(x6, xo, mask) * tl.load(w_ptr + 6)
    if K > 7:
        acc += _load_f32(x7, xo, mask) * tl.load(w_ptr + 7)
    if K > 8:
        acc += _load_f32(x8, xo, mask) * tl.load(w_ptr + 8)
    if K > 9:
        acc += _load_f32(x9, xo, mask) * tl.load(w_ptr + 9)
    if K > 10:
        acc += _load_f32(x10, xo, mask) * tl.load(w_ptr + 10)
    if K > 11:
        acc += _load_f32(x11, xo, mask) * tl.load(w_ptr + 11)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # keeps NaN, like torch.relu
    tl.store(out_ptr + oo, acc.to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _grad_input(dx, x, w_ptr, k, partial_ptr, pid, nprog, g, go, xo, mask, NEED_DW: tl.constexpr):
    """dx_k = w_k * g at the output layout; with NEED_DW one fp32 partial of sum x_k * g."""
    tl.store(dx + go, (g * tl.load(w_ptr + k)).to(dx.dtype.element_ty), mask=mask)
    if NEED_DW:
        tl.store(partial_ptr + k * nprog + pid, tl.sum(_load_f32(x, xo, mask) * g, axis=0))


@jit
def _weighted_sum_bwd_kernel(
    g_ptr, out_ptr, w_ptr, partial_ptr,
    dx0, dx1, dx2, dx3, dx4, dx5, dx6, dx7, dx8, dx9, dx10, dx11,
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11,
    numel, S1, S2, S3,
    xs0, xs1, xs2, xs3,
    gs0, gs1, gs2, gs3,
    K: tl.constexpr, RELU: tl.constexpr, NEED_DW: tl.constexpr, DENSE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    if DENSE:
        xo = idx
        go = idx
    else:
        xo = _strided_offset(idx, S1, S2, S3, xs0, xs1, xs2, xs3)
        go = _strided_offset(idx, S1, S2, S3, gs0, gs1, gs2, gs3)
    g = _load_f32(g_ptr, go, mask)
    if RELU:
        g = tl.where(_load_f32(out_ptr, go, mask) <= 0.0, 0.0, g)  # torch's threshold_backward
    _grad_input(dx0, x0, w_ptr, 0, partial_ptr, pid, nprog, g, go, xo, mask, NEED_DW)
    if K > 1:
        _grad_input(dx1, x1, w_ptr, 1, partial_ptr, pid, nprog, g, go, xo, mask, NEED_DW)
    if K > 2:
        _grad_input(dx2, x2, w_ptr, 2, partial_ptr, pid, nprog, g, go, xo, mask, NEED_DW)
    if K > 3:
        _grad_input(dx3, x3, w_ptr, 3, partial_ptr, pid, nprog, g, go, xo, mask, NEED_DW)
    if K > 4:
        _grad_input(dx4, x4, w_ptr, 4, partial_ptr, pid, nprog, g, go, xo, mask, NEED_DW)
    if K > 5:
        _grad_input(dx5, x5, w_ptr, 5, partial_ptr, pid, nprog, g, go, xo, mask, NEED_DW)
    if K > 6:
        _grad_input(dx6, x6, w_ptr, 6, partial_ptr, pid, nprog, g, go, xo, mask, NEED_DW)
    if K > 7:
        _grad_input(dx7, x7, w_ptr, 7, partial_ptr, pid, nprog, g, go, xo, mask, NEED_DW)
    if K > 8:
        _grad_input(dx8, x8, w_ptr, 8, partial_ptr, pid, nprog, g, go, xo, mask, NEED_DW)
    if K > 9:
        _grad_input(dx9, x9, w_ptr, 9, partial_ptr, pid, nprog, g, go, xo, mask, NEED_DW)
    if K > 10:
        _grad_input(dx10, x10, w_ptr, 10, partial_ptr, pid, nprog, g, go, xo, mask, NEED_DW)
    if K > 11:
        _grad_input(dx11, x11, w_ptr, 11, partial_ptr, pid, nprog, g, go, xo, mask, NEED_DW)


# ----------------------------------------------------------------------------- launchers


def _pad_pointers(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The 12 pointer arguments: the K tensors, then the first one repeated (never read)."""
    return list(tensors) + [tensors[0]] * (MAX_INPUTS - len(tensors))


def _read_layout(inputs: Sequence[torch.Tensor], like: torch.Tensor) -> tuple[list[torch.Tensor], bool]:
    """Inputs the kernel can read with one stride set, and whether that equals ``like``'s layout.

    Inputs sharing strides are used in place; otherwise the ones whose layout differs from
    ``like`` (a dense tensor) are copied into it, each keeping its dtype.
    """
    x0 = inputs[0]
    if all(same_layout(x, x0) for x in inputs) and (same_layout(x0, like) or x0.dim() <= 4):
        return list(inputs), same_layout(x0, like)
    return [
        x if same_layout(x, like) else torch.empty_like(like, dtype=x.dtype).copy_(x) for x in inputs
    ], True


def _weighted_sum_forward(
    inputs: list[torch.Tensor], weights: torch.Tensor, relu: bool, out_dtype: torch.dtype
) -> torch.Tensor:
    out = torch.empty_like(inputs[0], dtype=out_dtype)
    numel = out.numel()
    if numel == 0:
        return out
    xs, dense = _read_layout(inputs, out)
    sizes, xstrides = strides4(xs[0]) if not dense else ((1, 1, 1, numel), (0, 0, 0, 1))
    ostrides = strides4(out)[1] if not dense else (0, 0, 0, 1)
    w32 = weights.detach().to(device=out.device, dtype=torch.float32).contiguous()
    block = BLOCK if dense else STRIDED_BLOCK
    _weighted_sum_fwd_kernel[(cdiv(numel, block),)](
        out, w32, *_pad_pointers(xs), numel, sizes[1], sizes[2], sizes[3], *xstrides, *ostrides,
        K=len(xs), RELU=relu, DENSE=dense, BLOCK=block,
    )  # fmt: skip
    return out


def _weighted_sum_backward(
    grad: torch.Tensor,
    inputs: list[torch.Tensor],
    weights: torch.Tensor,
    out: torch.Tensor | None,
    relu: bool,
    need_dw: bool,
) -> list[torch.Tensor]:
    """[dx_0 .. dx_{K-1}, dw]; dx_k in ``inputs[k]``'s dtype and ``inputs[0]``'s layout.

    ``inputs[1:]`` are only read when ``need_dw`` (otherwise only their dtypes matter: they may
    be empty); ``out`` only with ReLU.
    """
    k = len(inputs)
    dxs = [torch.empty_like(inputs[0], dtype=x.dtype) for x in inputs]
    numel = dxs[0].numel()
    dw32 = torch.zeros(k, device=grad.device, dtype=torch.float32)
    if numel == 0:
        return [*dxs, dw32.to(weights.dtype)]
    g = grad if same_layout(grad, dxs[0]) else torch.empty_like(dxs[0], dtype=grad.dtype).copy_(grad)
    xs, dense = _read_layout(inputs, dxs[0]) if need_dw else ([inputs[0]] * k, True)
    sizes, xstrides = strides4(xs[0]) if not dense else ((1, 1, 1, numel), (0, 0, 0, 1))
    gstrides = strides4(g)[1] if not dense else (0, 0, 0, 1)
    block = BLOCK if dense else STRIDED_BLOCK
    nprog = cdiv(numel, block)
    partials = torch.empty((k, nprog) if need_dw else (1,), device=grad.device, dtype=torch.float32)
    w32 = weights.detach().to(device=grad.device, dtype=torch.float32).contiguous()
    _weighted_sum_bwd_kernel[(nprog,)](
        g, out if relu else g, w32, partials, *_pad_pointers(dxs), *_pad_pointers(xs),
        numel, sizes[1], sizes[2], sizes[3], *xstrides, *gstrides,
        K=k, RELU=relu, NEED_DW=need_dw, DENSE=dense, BLOCK=block,
    )  # fmt: skip
    if need_dw:
        dw32 = sum_rows(partials)
    return [*dxs, dw32.to(weights.dtype)]


# ----------------------------------------------------------------------------- autograd


def _save(ctx, inputs: Sequence[torch.Tensor], weights: torch.Tensor, relu: bool, out: torch.Tensor) -> None:
    """Saves what the backward reads: the weights, ``out`` with ReLU, ``inputs[0]`` (the layout) and
    the other inputs when dw is needed, else empty tensors standing for their dtypes."""
    ctx.relu = relu
    ctx.need_dw = weights.requires_grad
    rest = [x if ctx.need_dw else x.new_empty(0) for x in inputs[1:]]
    ctx.save_for_backward(weights, out if relu else None, inputs[0], *rest)


def _grads(ctx, grad: torch.Tensor, backward) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """``backward`` is :func:`_weighted_sum_backward` (eager) or its custom op (traced)."""
    weights, out, *inputs = ctx.saved_tensors
    with device_guard(grad.device):
        *dxs, dw = backward(grad, inputs, weights, out, ctx.relu, ctx.need_dw)
    return dxs, (dw if ctx.need_dw else None)


class _WeightedSumFunction(torch.autograd.Function):
    """Eager mode: direct launches, without the custom op's dispatch (backend.traced)."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, relu: bool, out_dtype: torch.dtype, *inputs: torch.Tensor):
        out = _weighted_sum_forward(list(inputs), weights, relu, out_dtype)
        _save(ctx, inputs, weights, relu, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        dxs, dw = _grads(ctx, grad, _weighted_sum_backward)
        return dw, None, None, *dxs


@torch.library.custom_op("pnfs::weighted_sum", mutates_args=())
def _weighted_sum_op(
    inputs: list[torch.Tensor], weights: torch.Tensor, relu: bool, out_dtype: torch.dtype
) -> torch.Tensor:
    return _weighted_sum_forward(inputs, weights, relu, out_dtype)


@_weighted_sum_op.register_fake
def _(inputs, weights, relu, out_dtype):
    return torch.empty_like(inputs[0], dtype=out_dtype)


@torch.library.custom_op("pnfs::weighted_sum_backward", mutates_args=())
def _backward_op(
    grad: torch.Tensor,
    inputs: list[torch.Tensor],
    weights: torch.Tensor,
    out: torch.Tensor | None,
    relu: bool,
    need_dw: bool,
) -> list[torch.Tensor]:
    return _weighted_sum_backward(grad, inputs, weights, out, relu, need_dw)


@_backward_op.register_fake
def _(grad, inputs, weights, out, relu, need_dw):
    return [torch.empty_like(inputs[0], dtype=x.dtype) for x in inputs] + [torch.empty_like(weights)]


def _op_setup_context(ctx, inputs, output):
    xs, weights, relu, _ = inputs
    _save(ctx, xs, weights, relu, output)


def _op_backward(ctx, grad):
    dxs, dw = _grads(ctx, grad, _backward_op)
    return dxs, dw, None, None


torch.library.register_autograd("pnfs::weighted_sum", _op_backward, setup_context=_op_setup_context)


# ----------------------------------------------------------------------------- public API


def _check(inputs: Sequence[torch.Tensor], weights: torch.Tensor) -> None:
    if not 1 <= len(inputs) <= MAX_INPUTS:
        raise ValueError(f"weighted_sum takes 1..{MAX_INPUTS} inputs, got {len(inputs)}")
    if weights.shape != (len(inputs),):
        raise ValueError(f"weighted_sum: weights of shape {tuple(weights.shape)} for {len(inputs)} inputs")
    x0 = inputs[0]
    for k, x in enumerate(inputs):
        if x.shape != x0.shape:
            raise ValueError(f"weighted_sum: input {k} has shape {tuple(x.shape)}, input 0 {tuple(x0.shape)}")
        if x.device != x0.device:
            raise ValueError(f"weighted_sum: input {k} is on {x.device}, input 0 on {x0.device}")
        if not x.is_floating_point():
            raise ValueError(f"weighted_sum: input {k} is {x.dtype}; expected a floating-point tensor")


def weighted_sum(inputs: Sequence[torch.Tensor], weights: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """``act(sum_k weights[k] * inputs[k])`` over K <= 12 same-shape tensors; ``weights``: [K].

    The inputs may mix floating dtypes (autocast's bf16 next to fp32): the sum is fp32 and the
    result has ``result_dtype(inputs)`` (the autocast dtype under autocast for the inputs'
    device, else the promoted dtype of the inputs; ``pnfs.kernels._dtypes``) and the layout
    of ``torch.empty_like(inputs[0])``. Each input's gradient has that input's dtype.
    """
    _check(inputs, weights)
    out_dtype = result_dtype(inputs)
    if not use_triton(inputs[0], "weighted_sum", out_dtype):
        return weighted_sum_reference(inputs, weights, relu)
    if traced():
        kernel = lambda: _weighted_sum_op(list(inputs), weights, relu, out_dtype)
    else:
        kernel = lambda: _WeightedSumFunction.apply(weights, relu, out_dtype, *inputs)
    return run(
        "weighted_sum", kernel, lambda: weighted_sum_reference(inputs, weights, relu), inputs[0].device
    )
