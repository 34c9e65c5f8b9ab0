"""The three search strategies of the paper: which optimizer sees alpha/beta, and when.

* ``sync`` (the paper's default): alpha, beta and the weights w are ordinary parameters
  of one Adam and move together on grad_{w,alpha,beta} L_train.
* ``random``: alpha, beta ~ N(0, 1) drawn from ``search.seed``, frozen
  (``requires_grad=False``) and left out of every optimizer.
* ``darts1``: DARTS first order. The training shards are split ``search.arch_split``
  (weights : architecture, 2:1 by default); each iteration first takes an architecture
  step on a held-out batch with its own Adam (lr ``search.arch_lr`` = 3e-3, weight decay
  ``search.arch_weight_decay`` = 1e-3), then the weight step with alpha/beta excluded.

A model without alpha/beta (Table VI's baselines, ``model.name`` simplebaseline_resnet50 or
hrnet_w32) trains its weights under ``sync`` and ``random`` (there is nothing to move or
draw); ``darts1`` is refused (:func:`check_strategy`): it would hold a third of the training
shards out for architecture steps that have nothing to update.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pnfs.config import Config, ConfigError
from pnfs.engine.flat import FlatAdam, FlatParameters
from pnfs.model.baseline import BaselinePoseNet
from pnfs.model.pnfs import PoseNFS

PoseModel = PoseNFS | BaselinePoseNet  # what pnfs.model.build_model returns


@dataclass
class Optimizers:
    """``weights`` steps on the training loss; ``arch`` (darts1 only) on the held-out batches."""

    weights: torch.optim.Optimizer
    arch: torch.optim.Optimizer | None = None


def _ids(params: Sequence[nn.Parameter]) -> set[int]:
    return {id(p) for p in params}


def randomize_architecture(model: PoseModel, seed: int) -> None:
    """Random search: draw every alpha/beta from N(0, 1) with a generator seeded by ``seed``
    (in the order of ``model.arch_parameters()``) and freeze them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.arch_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p))
            p.requires_grad_(False)


def check_strategy(model: PoseModel, cfg: Config) -> None:
    """ConfigError when ``search.strategy`` needs architecture parameters the model lacks."""
    if cfg.search.strategy == "darts1" and not model.arch_parameters():
        raise ConfigError(
            f"search.strategy: 'darts1' searches alpha/beta, and model.name {cfg.model.name!r} has none; "
            "train it with search.strategy=sync (the default), which then trains the weights only"
        )


def prepare_architecture(model: PoseModel, cfg: Config) -> None:
    """Apply the strategy's initialisation (only ``random`` changes anything)."""
    if cfg.search.strategy == "random":
        randomize_architecture(model, cfg.search.seed)


def weight_param_groups(model: PoseModel, cfg: Config) -> list[nn.Parameter]:
    """Parameters of the weight optimizer: weights, plus alpha/beta under ``sync``.

    Parameters that do not require gradients are left out (docs/design.md §6: no dead parameters).
    """
    weights = [p for p in model.weight_parameters() if p.requires_grad]
    if cfg.search.strategy == "sync":
        weights += [p for p in model.arch_parameters() if p.requires_grad]
    return weights


def build_optimizers(
    model: PoseModel, cfg: Config, fused_weights: bool = False, flat: bool = False
) -> Optimizers:
    """Adam(lr=train.lr) over :func:`weight_param_groups`; darts1 adds Adam over alpha/beta.

    ``model`` is the bare module (not the DDP wrapper), on its device and in its memory format:
    parameters are the same tensors.
    The architecture Adam, and the weight Adam with ``fused_weights`` (not handed to DeepSpeed),
    are PyTorch's fused Adam, whose ``found_inf`` input skips a step on the device
    (:func:`pnfs.engine.step.apply_if_finite`; docs/design.md §7). With ``flat``
    (``train.flat_params``) the weight Adam is :class:`pnfs.engine.flat.FlatAdam`, the same
    fused update over flat buffers (weights in one, alpha/beta under ``sync`` in another) that
    the parameters become views of; its state dict is the per-tensor Adam's.
    """
    check_strategy(model, cfg)
    arch = list(model.arch_parameters())
    arch_ids = _ids(arch)
    weights = weight_param_groups(model, cfg)
    if cfg.search.strategy != "sync":
        assert not (_ids(weights) & arch_ids), "alpha/beta must not be in the weight optimizer"
    if flat:
        kinds = [[p for p in weights if id(p) not in arch_ids], [p for p in weights if id(p) in arch_ids]]
        weight_opt: torch.optim.Optimizer = FlatAdam(
            FlatParameters(kinds), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
    else:
        weight_opt = torch.optim.Adam(
            weights, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused_weights
        )
    arch_opt = None
    if cfg.search.strategy == "darts1":
        arch_opt = torch.optim.Adam(
            arch,
            lr=cfg.search.arch_lr,
            betas=(0.5, 0.999),
            weight_decay=cfg.search.arch_weight_decay,
            fused=True,
        )
    return Optimizers(weight_opt, arch_opt)


def describe_optimizers(model: PoseModel, cfg: Config, weight_params: Sequence[nn.Parameter]) -> str:
    """One log line on what the weight optimizer really updates; raises if it breaks the strategy.

    ``weight_params`` are the model tensors the weight optimizer steps (for DeepSpeed, the
    tensors its wrapper holds, :func:`pnfs.engine.deepspeed_engine.optimized_parameters`).
    Under ``random`` and ``darts1`` no alpha/beta may be among them; under ``sync`` all must be.
    """
    arch = [p for p in model.arch_parameters() if p.requires_grad]
    held = _ids(weight_params)
    inside = sum(id(p) in held for p in arch)
    if cfg.search.strategy == "sync" and inside != len(arch):
        raise RuntimeError(
            f"sync: only {inside} of {len(arch)} alpha/beta tensors are in the weight optimizer"
        )
    if cfg.search.strategy != "sync" and inside:
        raise RuntimeError(f"{cfg.search.strategy}: {inside} alpha/beta tensors are in the weight optimizer")
    weights = len(held) - inside
    if not model.arch_parameters():
        return f"weight optimizer: {weights} weight tensors; model.name {cfg.model.name!r} has no alpha/beta"
    where = "included" if inside else "excluded"
    line = f"weight optimizer: {weights} weight tensors, alpha/beta {where} ({inside} tensors)"
    if cfg.search.strategy == "darts1":
        line += f"; architecture optimizer: {len(arch)} alpha/beta tensors"
    return line


def split_shards(shards: Sequence[str], split: Sequence[int]) -> tuple[list[str], list[str]]:
    """darts1's fixed train split: shard i goes to the architecture set when
    ``i mod (w + a) >= w`` for ``split = [w, a]``; the rest trains the weights."""
    w, a = split
    if len(shards) < w + a:
        raise ConfigError(
            f"search.arch_split: {list(split)!r} needs at least {w + a} training shards to hold "
            f"a fixed part out for the architecture step; data.train_shards gives {len(shards)}"
        )
    weight_set = [s for i, s in enumerate(shards) if i % (w + a) < w]
    arch_set = [s for i, s in enumerate(shards) if i % (w + a) >= w]
    return weight_set, arch_set


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Ready a fused Adam for CUDA-graph capture (``train.cuda_graph``): ``capturable`` set and
    each group's learning rate a 0-dim tensor on ``device``, which the schedule then fills in
    place (:func:`pnfs.engine.schedule.set_learning_rate`). Call it after loading a checkpoint:
    ``load_state_dict`` puts the saved groups' plain values back.

    The tensor has the precision each fused kernel computes the step size in from a plain
    number, so the update does not change: float32 on CUDA, float64 on the CPU."""
    dtype = torch.float32 if device.type == "cuda" else torch.float64
    for group in optimizer.param_groups:
        group["capturable"] = True
        group["lr"] = torch.tensor(float(group["lr"]), dtype=dtype, device=device)
