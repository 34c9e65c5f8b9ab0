"""Optional dependencies of the kernels, imported once so that ``pnfs.kernels`` always imports.

* ``triton`` may be missing (CPU-only installs): the kernels' ``@jit`` then yields a function that
  raises a clear ``RuntimeError`` when launched; the backend never launches it (see ``backend.py``).
"""

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # triton absent or broken: the reference path still works
    triton = None
    tl = None
    HAS_TRITON = False


def _missing_triton(fn):
    def launch_without_triton(*args, **kwargs):
        raise RuntimeError(f"{fn.__name__}: triton is not installed; use PNFS_KERNELS=torch")

    launch_without_triton.__name__ = fn.__name__
    return launch_without_triton


jit = triton.jit if HAS_TRITON else _missing_triton


# Under TRITON_INTERPRET=1 (read by triton at import) every kernel op is one numpy call per
# program: larger blocks mean fewer programs and a much faster interpreter, same semantics.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_size(compiled: int, interpreted: int) -> int:
    """The block size of a kernel: ``compiled`` on a GPU, ``interpreted`` under the interpreter."""
    return interpreted if INTERPRETED else compiled


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def flat_planes(x: torch.Tensor) -> bool:
    """Whether each [H, W] plane of ``x`` (ndim >= 2) is one contiguous row-major block
    (``sW == 1`` and ``sH == W``, ignoring dims of size 1), so pixel p of a plane is at
    ``plane start + p``: the kernels' fast path, whose loads Triton can prove contiguous."""
    h, w = x.shape[-2:]
    return (w == 1 or x.stride(-1) == 1) and (h == 1 or x.stride(-2) == w)


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides on every dim of size > 1."""
    return a.shape == b.shape and all(
        size == 1 or sa == sb for size, sa, sb in zip(a.shape, a.stride(), b.stride())
    )


def strides4(x: torch.Tensor) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Sizes and strides of ``x`` (ndim <= 4) padded in front to four dims."""
    pad = 4 - x.dim()
    if pad < 0:
        raise ValueError(f"strided kernel path takes at most 4 dims, got shape {tuple(x.shape)}")
    n, c, h, w = (1,) * pad + tuple(x.shape)
    sn, sc, sh, sw = (0,) * pad + tuple(x.stride())
    return (n, c, h, w), (sn, sc, sh, sw)
