"""Which implementation a kernel call uses: ``PNFS_KERNELS=auto|torch|triton``.

* ``torch``: the pure-PyTorch reference everywhere.
* ``triton``: the Triton kernel (on CPU tensors only under ``TRITON_INTERPRET=1``).
* ``auto`` (default): per kernel, dtype and CUDA compute capability, whatever measured fastest
  there (:mod:`pnfs.kernels.auto_table`): Triton only where it beat both the eager and the
  compiled reference on such a GPU, the reference everywhere else (CPU tensors, unmeasured
  dtypes and GPUs, no ``triton``). If a kernel fails to compile or launch, ``auto`` warns once,
  naming the kernel and the error, and uses the reference for that kernel from then on.

The variable is read at every eager call, so tests can switch it with ``monkeypatch.setenv``;
a ``torch.compile``d function keeps the choice it was traced with.

How a Triton kernel is called (:func:`traced`): in eager mode through a
``torch.autograd.Function`` that launches it directly (no dispatcher round trip); while
``torch.compile``, ``torch.export``, ``make_fx`` or ``torch.jit.trace`` trace, through its
``torch.library`` custom op, which tracers see as one node with a fake (meta) implementation.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

from pnfs.kernels._compat import HAS_TRITON
from pnfs.kernels.auto_table import auto_choice

try:  # torch >= 2.3; torch._dynamo's own before that
    from torch.compiler import is_compiling
except ImportError:  # pragma: no cover - older torch 2.x
    from torch._dynamo import is_compiling
from torch.utils._python_dispatch import _get_current_dispatch_mode

BACKENDS = ("auto", "torch", "triton")
_FAILED: set[str] = set()  # kernels that failed to compile under ``auto``: reference from then on
T = TypeVar("T")


def requested_backend() -> str:
    value = os.environ.get("PNFS_KERNELS", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"PNFS_KERNELS={value!r}; expected one of {BACKENDS}")
    return value


def triton_available() -> bool:
    """Whether ``triton`` imported (checked once, at package import)."""
    return HAS_TRITON


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(tensor: torch.Tensor, kernel: str | None = None, dtype: torch.dtype | None = None) -> bool:
    """True when this call of ``kernel`` should run Triton for ``tensor`` (data of ``dtype``,
    default ``tensor.dtype``). Under ``auto`` a kernel not named, or not in the measured table,
    runs the reference."""
    backend = requested_backend()
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("PNFS_KERNELS=triton but triton does not import")
        if tensor.device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                "PNFS_KERNELS=triton on a CPU tensor needs TRITON_INTERPRET=1 in the environment "
                "before triton is imported"
            )
        return True
    if tensor.device.type != "cuda" or not triton_available():
        return False
    return auto_choice(kernel, dtype or tensor.dtype, capability(tensor.device)) == "triton"


_CAPABILITY: dict[torch.device, tuple[int, int]] = {}


def capability(device: torch.device) -> tuple[int, int]:
    """``device``'s CUDA compute capability (major, minor), asked once per device (a plain dict,
    not ``functools.cache``, which torch.compile warns about when it traces through it)."""
    if device not in _CAPABILITY:
        major, minor = torch.cuda.get_device_capability(device)
        _CAPABILITY[device] = (major, minor)
    return _CAPABILITY[device]


def traced() -> bool:
    """Whether a tracer is running (``torch.compile``, ``torch.export``, ``make_fx``, a fake-tensor
    or other dispatch mode, ``torch.jit.trace`` as fvcore uses it): then the kernels go through
    their custom ops, else direct launches."""
    return is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None


def device_guard(device: torch.device):
    """Make ``device`` the current CUDA device (kernels launch on the current one); no-op on CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def run(name: str, kernel: Callable[[], T], reference: Callable[[], T], device: torch.device) -> T:
    """``kernel()`` on ``device`` (its CUDA device made current); under ``auto`` a kernel that fails
    is reported once (one warning naming it and the error) and ``reference()`` is used instead."""
    if requested_backend() == "auto" and name in _FAILED:
        return reference()
    try:
        with device_guard(device):
            return kernel()
    except Exception as error:
        if requested_backend() != "auto":
            raise
        _FAILED.add(name)
        warnings.warn(
            f"pnfs.kernels: Triton kernel {name} failed ({type(error).__name__}: {error}); "
            "using the PyTorch reference for it from now on (PNFS_KERNELS=auto)",
            RuntimeWarning,
            stacklevel=3,
        )
        return reference()
