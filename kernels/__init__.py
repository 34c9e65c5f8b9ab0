"""Fused kernels of pnfs, installed as ``pnfs.kernels``.

Each kernel has one file holding its Triton kernel(s), the PyTorch reference (fallback and
test oracle) and the autograd wiring (a ``torch.autograd.Function`` launching directly in eager
mode, a ``torch.library`` custom op for tracers; torch >= 2.4); :mod:`pnfs.kernels.backend`
picks one per call (``PNFS_KERNELS=auto|torch|triton``; ``auto`` from the measured table in
:mod:`pnfs.kernels.auto_table`). Every entry takes the mixed dtypes autocast produces
(:mod:`pnfs.kernels._dtypes`). :data:`FVCORE_HANDLES` lets fvcore count the custom ops.
"""

from pnfs.kernels.argmax_decode import argmax_decode, argmax_decode_reference
from pnfs.kernels.backend import requested_backend, use_triton
from pnfs.kernels.fvcore_handles import FVCORE_HANDLES, fvcore_handles
from pnfs.kernels.squash import (
    squash_mse_loss,
    squash_mse_loss_reference,
    squash_score,
    squash_score_reference,
)
from pnfs.kernels.weighted_sum import weighted_sum, weighted_sum_reference

__all__ = [
    "FVCORE_HANDLES",
    "argmax_decode",
    "argmax_decode_reference",
    "fvcore_handles",
    "requested_backend",
    "squash_mse_loss",
    "squash_mse_loss_reference",
    "squash_score",
    "squash_score_reference",
    "use_triton",
    "weighted_sum",
    "weighted_sum_reference",
]
