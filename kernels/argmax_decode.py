"""Heatmap decoding: per (n, j) the argmax over H*W, its value, and the quarter offset.

    x = argmax column + 0.25 * sign(s[y, x+1] - s[y, x-1])   when 0 < x < W-1
    y = argmax row    + 0.25 * sign(s[y+1, x] - s[y-1, x])   when 0 < y < H-1

Coordinates are in heatmap pixels (x, y); ties in the argmax go to the first index in
row-major order. On the border (x = 0 or W-1, y = 0 or H-1) that axis gets no offset.

``argmax_decode(scores)`` runs on score maps after flip averaging and part summing
(``pnfs/inference.py``), so it reads maps, never the head's vectors.

NaN policy (reference and Triton alike): a NaN counts as larger than every number, like
``torch.argmax`` — the first NaN in row-major order is the peak and its value is NaN, so a
broken map shows up in ``maxvals``. The offset compares neighbours with ``>`` and ``<``, so a
NaN neighbour gives no offset: coordinates are always finite.

Triton: one program per (n, j) scans H*W in blocks keeping a per-lane running maximum (strict
``>``, so each lane keeps its first index), then reduces the lanes (max value, lowest index
among equal values), then reads the peak and its four neighbours. fp32 compares, any input
dtype (fp32, bf16, fp16, fp64: compared in fp32) and strides, int64 offsets. Outputs: coords
[N, J, 2] float32, maxvals [N, J] float32, under autocast too.

Addressing: when each map's pixels are one contiguous row-major plane (``sW == 1``,
``sH == W``: NCHW maps, channel slices of them; ``FLAT``, chosen by the launcher) pixel p is at
``n*sN + j*sC + p``, so the scan's loads are provably contiguous and vectorised; otherwise
(channels_last, other views) at ``n*sN + j*sC + (p // W)*sH + (p % W)*sW``.
"""

import torch

from pnfs.kernels._compat import flat_planes, jit, next_power_of_2, tl
from pnfs.kernels.backend import run, traced, use_triton

BLOCK_P = 1024  # pixels per scan step of a score map (bench/README.md: the AOT report)


def block_p(hw: int) -> int:
    """Pixels per scan step: at most BLOCK_P, at least 16."""
    return min(BLOCK_P, max(16, next_power_of_2(hw)))


_NO_INDEX = 2**62  # larger than any pixel index; marks "none" in the lane reductions


def _decode_maps(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """maps [N, J, H, W] fp32 -> (coords [N, J, 2] (x, y) with the quarter offset, peak value [N, J])."""
    n, j, h, w = maps.shape
    flat = maps.reshape(n, j, h * w)
    index = flat.argmax(dim=-1)  # first maximal index; NaN counts as the maximum
    peak = flat.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    x = index % w
    y = index // w

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return flat.gather(-1, (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).unsqueeze(-1)).squeeze(-1)

    def sign(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # 0 when either is NaN
        return (a > b).float() - (a < b).float()

    dx = sign(at(y, x + 1), at(y, x - 1)) * ((x > 0) & (x < w - 1))
    dy = sign(at(y + 1, x), at(y - 1, x)) * ((y > 0) & (y < h - 1))
    coords = torch.stack([x.float() + 0.25 * dx, y.float() + 0.25 * dy], dim=-1)
    return coords, peak


def argmax_decode_reference(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [N, J, H, W] -> coords [N, J, 2] (x, y) float32, maxvals [N, J] float32."""
    return _decode_maps(scores.detach().float())


# ----------------------------------------------------------------------------- Triton kernels


@jit
def _pick(values, k, which):
    """values[which] of a small vector, as a scalar (NaN kept)."""
    return tl.sum(tl.where(k == which, values, 0.0), axis=0)


@jit
def _argmax_decode_kernel(
    ptr, coords_ptr, maxval_ptr, J, H, W, HW,
    sN, sC, sH, sW,
    FLAT: tl.constexpr, BLOCK_P: tl.constexpr, NO_INDEX: tl.constexpr,
):  # fmt: skip
    nj = tl.program_id(0).to(tl.int64)
    n = nj // J
    j = nj % J
    base = ptr + n * sN + j * sC
    hw = HW  # from the launcher: a Python int, passed as int64 once it passes 2^31
    lane = tl.arange(0, BLOCK_P).to(tl.int64)
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    best_index = tl.where(lane < hw, lane, NO_INDEX)  # a lane's first pixel wins an all -inf scan
    first_nan = tl.full([BLOCK_P], NO_INDEX, tl.int64)
    for start in range(0, hw, BLOCK_P):
        p = start + lane
        valid = p < hw
        if FLAT:
            offs = p
        else:
            offs = (p // W) * sH + (p % W) * sW
        v = tl.load(base + offs, mask=valid, other=0.0).to(tl.float32)
        first_nan = tl.minimum(first_nan, tl.where(valid & (v != v), p, NO_INDEX))
        take = valid & (v > best)
        best = tl.where(take, v, best)
        best_index = tl.where(take, p, best_index)
    top = tl.max(best, axis=0)
    index = tl.min(tl.where(best == top, best_index, NO_INDEX), axis=0)
    nan_index = tl.min(first_nan, axis=0)
    index = tl.where(nan_index < NO_INDEX, nan_index, index)
    x = index % W
    y = index // W
    # the peak (k=0) and its right, left, lower, upper neighbours (k=1..4)
    k = tl.arange(0, 8)
    nx = x + tl.where(k == 1, 1, 0) - tl.where(k == 2, 1, 0)
    ny = y + tl.where(k == 3, 1, 0) - tl.where(k == 4, 1, 0)
    inside = (k < 5) & (nx >= 0) & (nx < W) & (ny >= 0) & (ny < H)
    around = tl.load(base + ny * sH + nx * sW, mask=inside, other=0.0).to(tl.float32)
    peak = _pick(around, k, 0)
    right = _pick(around, k, 1)
    left = _pick(around, k, 2)
    below = _pick(around, k, 3)
    above = _pick(around, k, 4)
    dx = (right > left).to(tl.float32) - (right < left).to(tl.float32)
    dy = (below > above).to(tl.float32) - (below < above).to(tl.float32)
    dx = tl.where((x > 0) & (x < W - 1), dx, 0.0)
    dy = tl.where((y > 0) & (y < H - 1), dy, 0.0)
    tl.store(coords_ptr + nj * 2, x.to(tl.float32) + 0.25 * dx)
    tl.store(coords_ptr + nj * 2 + 1, y.to(tl.float32) + 0.25 * dy)
    tl.store(maxval_ptr + nj, peak)


# ----------------------------------------------------------------------------- launchers


def _decode(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    coords, maxvals = _empty_outputs(scores)
    n, j, h, w = scores.shape
    if n * j == 0:
        return coords, maxvals
    if h * w == 0:
        raise ValueError(f"argmax_decode: empty maps of shape {tuple(scores.shape)}")
    _argmax_decode_kernel[(n * j,)](
        scores, coords, maxvals, j, h, w, h * w, *scores.stride(),
        FLAT=flat_planes(scores), BLOCK_P=block_p(h * w), NO_INDEX=_NO_INDEX,
    )  # fmt: skip
    return coords, maxvals


def _empty_outputs(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, j = scores.shape[:2]
    return (
        scores.new_empty((n, j, 2), dtype=torch.float32),
        scores.new_empty((n, j), dtype=torch.float32),
    )


@torch.library.custom_op("pnfs::argmax_decode", mutates_args=())
def _argmax_decode_op(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _decode(scores)


@_argmax_decode_op.register_fake
def _(scores):
    return _empty_outputs(scores)


# ----------------------------------------------------------------------------- public API


def argmax_decode(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [N, J, H, W] -> (coords [N, J, 2] in heatmap pixels, maxvals [N, J]), both float32.

    Not differentiable (the inputs are detached).
    """
    if scores.dim() != 4:
        raise ValueError(
            f"argmax_decode: expected a 4-d [N, J, H, W] tensor, got shape {tuple(scores.shape)}"
        )
    if not use_triton(scores, "argmax_decode"):
        return argmax_decode_reference(scores)
    decode = _argmax_decode_op if traced() else _decode  # direct launch in eager mode
    return run(
        "argmax_decode",
        lambda: decode(scores.detach()),
        lambda: argmax_decode_reference(scores),
        scores.device,
    )
