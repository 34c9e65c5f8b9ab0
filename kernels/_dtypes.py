"""The dtype policy every kernel entry shares (docs/design.md §3).

Autocast hands a kernel mixed dtypes: on CUDA, ops on autocast's fp32 list (bilinear
up-sampling among them) return fp32 next to bf16 convolution outputs. So each entry accepts any
mix of fp32, bf16, fp16 (and fp64) inputs, computes in fp32 (fp64 when an input is fp64), and
returns :func:`result_dtype`:

* autocast enabled for the inputs' device type, inputs not fp64: the autocast dtype;
* otherwise: the promoted dtype of the inputs (``torch.promote_types`` over them).

Gradients come back in each input's own dtype. Reference and Triton paths follow the same rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype when autocast is enabled for ``device_type``, else None (torch 2.x)."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        enabled = torch.is_autocast_enabled(device_type)
        return torch.get_autocast_dtype(device_type) if enabled else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return None


def promoted_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def result_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype a kernel returns for ``tensors`` (all on one device): see the module docstring."""
    promoted = promoted_dtype(tensors)
    if promoted == torch.float64:
        return promoted
    return _autocast_dtype(tensors[0].device.type) or promoted


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 for fp64 data (so the references pass float64 gradcheck)."""
    return torch.promote_types(dtype, torch.float32)
