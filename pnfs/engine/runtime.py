"""Process-wide settings of a run: determinism, the autocast dtype, the weights' digest."""

from __future__ import annotations

import hashlib
import os
import warnings

import torch
from torch import nn

from pnfs.config import Config


def set_determinism(cfg: Config) -> None:
    """``train.deterministic``: deterministic kernels (bitwise resume); else cuDNN autotuning on GPU.

    The settings are process-wide, so both values are written: a run with ``false`` after one
    with ``true`` in the same process (a sweep, a notebook) gets torch's defaults back.
    """
    deterministic = cfg.train.deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic and torch.cuda.is_available()
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (``train.amp`` auto or bf16); fp32 on CPU unless bf16 is asked for.

    ``auto`` on a GPU without bfloat16 (``torch.cuda.is_bf16_supported()`` false, before sm_80)
    trains in fp32 and says so in a warning (fp16 would need a loss scaler).
    """
    if cfg.train.amp == "none":
        return None
    if cfg.train.amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        with torch.cuda.device(device):
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16
        warnings.warn(f"train.amp=auto: {device} has no bfloat16; training in float32", stacklevel=2)
    return None


def model_digest(model: nn.Module) -> str:
    """sha256 over every tensor of the state dict (names and bytes): equal iff bitwise equal."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
