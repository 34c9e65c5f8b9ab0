"""Fused kernels of pnfs, installed as ``pnfs.kernels``.

Each kernel has one file holding its Triton kernel(s), the PyTorch reference (fallback and
test oracle) and the autograd Function; :mod:`pnfs.kernels.backend` picks one per call.
"""

from pnfs.kernels.argmax_decode import argmax_decode, argmax_decode_reference
from pnfs.kernels.backend import requested_backend, use_triton
from pnfs.kernels.squash import squash_score, squash_score_reference
from pnfs.kernels.weighted_sum import weighted_sum, weighted_sum_reference

__all__ = [
    "argmax_decode",
    "argmax_decode_reference",
    "requested_backend",
    "squash_score",
    "squash_score_reference",
    "use_triton",
    "weighted_sum",
    "weighted_sum_reference",
]
