"""The second, deterministic pass of the kernels' reductions: row sums of fp32 partials."""

import torch

from pnfs.kernels._compat import jit, tl

BLOCK = 1024


@jit
def _sum_rows_kernel(partial_ptr, out_ptr, ncols, scale, BLOCK: tl.constexpr):
    """out[r] = scale * sum_c partial[r, c]; one program per row, always in the same order."""
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, ncols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + row * ncols + cols, mask=cols < ncols, other=0.0)
    tl.store(out_ptr + row, tl.sum(acc, axis=0) * scale)


def sum_rows(partials: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """[R, C] fp32 contiguous partials -> [R] fp32 sums times ``scale``, without atomics."""
    rows, cols = partials.shape
    out = torch.empty(rows, device=partials.device, dtype=torch.float32)
    _sum_rows_kernel[(rows,)](partials, out, cols, scale, BLOCK=BLOCK)
    return out
