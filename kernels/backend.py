"""Which implementation a kernel call uses: ``PNFS_KERNELS=auto|torch|triton``.

* ``torch``: the pure-PyTorch reference everywhere.
* ``triton``: the Triton kernel (on CPU tensors only under ``TRITON_INTERPRET=1``).
* ``auto`` (default): Triton for CUDA tensors on a GPU of compute capability >= 8.0 (A100 and
  later: :data:`MIN_CAPABILITY`; the paper's Titan Xp, sm_61, gets the reference) when ``triton``
  imports, the reference otherwise. If a kernel fails to compile or launch, ``auto`` warns once,
  naming the kernel and the error, and uses the reference for that kernel from then on.

The variable is read at every eager call, so tests can switch it with ``monkeypatch.setenv``;
a ``torch.compile``d function keeps the choice it was traced with.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

from pnfs.kernels._compat import HAS_TRITON

BACKENDS = ("auto", "torch", "triton")
MIN_CAPABILITY = (8, 0)
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


def use_triton(tensor: torch.Tensor) -> bool:
    """True when this call should run the Triton kernel for ``tensor``."""
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
    return tensor.device.type == "cuda" and triton_available() and capable(tensor.device)


def capable(device: torch.device) -> bool:
    """Whether ``device``'s compute capability is at least :data:`MIN_CAPABILITY`."""
    return tuple(torch.cuda.get_device_capability(device)) >= MIN_CAPABILITY


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
