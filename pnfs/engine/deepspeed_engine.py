"""DeepSpeed as the alternative engine (``--deepspeed DS.json``): ZeRO stage 0-1, bf16 on CUDA,
gradient accumulation.

The batch fields of the json are filled from the config (``train_micro_batch_size_per_gpu``
= ``train.batch_size``; ``train_batch_size`` = micro batch x accumulation x world), and
``gradient_clipping`` from ``train.grad_clip`` when the json leaves it out. On CPU
(``DS_ACCELERATOR=cpu``, gloo) bf16 is switched off, and DeepSpeed's shared-memory
all-reduce op, which its first start compiles for about a minute, is marked unavailable
so the process group we already built (gloo) is used as it is. The weight optimizer is
ours (``torch.optim.Adam``) unless the json names one; a json optimizer on CPU needs
``"torch_adam": true`` to avoid building DeepSpeed's CPU Adam.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pnfs.config import Config, ConfigError
from pnfs.engine.distributed import DistContext
from pnfs.engine.guard import StepRecord
from pnfs.loss import LossSetup, batch_loss
from pnfs.process_group import all_reduce_sum_


def load_deepspeed_config(path: str | Path, cfg: Config, ctx: DistContext) -> dict[str, Any]:
    path = Path(path)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed {path}: not valid JSON ({e})") from None
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1):
        raise ConfigError(f"--deepspeed {path}: zero_optimization.stage={stage!r}; pnfs supports 0 and 1")
    accumulation = int(ds.get("gradient_accumulation_steps", 1) or 1)
    ds["gradient_accumulation_steps"] = accumulation
    ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    ds["train_batch_size"] = cfg.train.batch_size * accumulation * ctx.world_size
    ds.setdefault("gradient_clipping", cfg.train.grad_clip)
    if ctx.device.type == "cpu":
        ds["bf16"] = {"enabled": False}
        ds["fp16"] = {"enabled": False}
        opt = ds.get("optimizer")
        if opt and opt.get("type", "").lower() in ("adam", "adamw"):
            opt.setdefault("params", {})["torch_adam"] = True
    else:
        ds.setdefault("bf16", {"enabled": cfg.train.amp != "none"})
    return ds


def _skip_cpu_shm_build() -> None:
    """Mark DeepSpeed's shared-memory comm op incompatible: no compile at start-up, gloo is used."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    compatible = dict(getattr(deepspeed.ops, "__dict__", {}).get("__compatible_ops__") or {})
    compatible["deepspeed_shm_comm"] = False
    deepspeed.ops.__compatible_ops__ = compatible


def optimized_parameters(engine) -> list[nn.Parameter]:
    """The model tensors DeepSpeed's optimizer updates.

    ZeRO keeps the original tensors in ``bit16_groups`` (its ``param_groups`` hold flat
    partitions), the bf16 wrapper in ``bf16_groups``; a plain optimizer (stage 0, fp32)
    holds them in ``param_groups``."""
    opt = engine.optimizer
    groups = getattr(opt, "bit16_groups", None) or getattr(opt, "bf16_groups", None)
    if groups is None:
        groups = [g["params"] for g in opt.param_groups]
    return [p for group in groups for p in group]


def initialize_deepspeed(
    model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, config_path: str, ctx: DistContext
):
    """The DeepSpeed engine around ``model`` (on the process group :mod:`pnfs.engine.distributed` built)."""
    if ctx.device.type == "cpu":
        _skip_cpu_shm_build()
    import deepspeed

    ds = load_deepspeed_config(config_path, cfg, ctx)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if ctx.device.type == "cuda" else "gloo")
    kwargs: dict[str, Any] = {"model": model, "config": ds}
    if "optimizer" in ds:
        kwargs["model_parameters"] = [p for g in optimizer.param_groups for p in g["params"]]
    else:
        kwargs["optimizer"] = optimizer
    engine, _, _, _ = deepspeed.initialize(**kwargs)
    return engine


def deepspeed_step(
    engine,
    batch: Any,
    setup: LossSetup,
    record: StepRecord,
    arch_params: list[nn.Parameter],
    loss_fn: Callable,
) -> None:
    """One weight step through DeepSpeed. DeepSpeed owns backward and step and cannot skip a step
    on the device, so this step asks on the host whether every rank's loss is finite (one
    all-reduce, one sync) before it commits (docs/design.md §7)."""
    loss = batch_loss(engine, batch, setup, loss_fn)
    finite = torch.isfinite(all_reduce_sum_(loss.detach().float().reshape(1).clone())[0])
    if bool(finite):
        engine.backward(loss)
        engine.step()
    for p in arch_params:
        p.grad = None  # darts1: DeepSpeed leaves alone the grads of tensors it does not optimize
    record.add(loss, finite)
