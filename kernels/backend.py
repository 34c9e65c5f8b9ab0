"""Which implementation a kernel call uses: ``PNFS_KERNELS=auto|torch|triton``.

* ``torch``: the pure-PyTorch reference everywhere.
* ``triton``: the Triton kernel (on CPU tensors only under ``TRITON_INTERPRET=1``).
* ``auto`` (default): Triton for CUDA tensors when ``triton`` imports, the reference otherwise.

The variable is read at every eager call, so tests can switch it with ``monkeypatch.setenv``;
a ``torch.compile``d function keeps the choice it was traced with.
"""

from __future__ import annotations

import os

import torch

from pnfs.kernels._compat import HAS_TRITON

BACKENDS = ("auto", "torch", "triton")


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
    return tensor.device.type == "cuda" and triton_available()
