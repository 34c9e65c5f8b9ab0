"""One training step, start to end on the device (docs/design.md §1, §7).

    loss   = pose_loss(model(x), y, w)                 (pnfs.loss.batch_loss)
    grads  = grad loss                                 (DDP all-reduces them in the backward)
    norm   = ||grads||, clipped to train.grad_clip
    finite = isfinite(norm)                            (the same on every rank)
    Adam step with found_inf = not finite              (fused Adam: a skipped step changes nothing)

With ``train.flat_params`` (:mod:`pnfs.engine.flat`) the weight optimizer is a
:class:`~pnfs.engine.flat.FlatAdam`: the gradients are zeroed in their flat buffer before the
backward, and the norm and the Adam update each run over the flat buffers in a few operators.

Nothing here waits for the device: the loss and the flag go to a :class:`StepRecord` that the
host reads once per log interval. A rank whose loss is not finite poisons one gradient element
(``loss + 0 * loss * anchor``), so the all-reduce carries the flag to every rank and the norm is
non-finite everywhere: no extra collective per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pnfs.engine.distributed import average_gradients
from pnfs.engine.flat import FlatAdam
from pnfs.engine.guard import StepRecord
from pnfs.loss import LossSetup, batch_loss, pose_loss


@dataclass
class StepParts:
    """What one optimizer step touches. ``forward`` runs the batch (the bare model or its DDP /
    compiled wrapper); ``module`` is the bare model; ``params`` are ``optimizer``'s tensors."""

    forward: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    setup: LossSetup
    record: StepRecord
    max_norm: float  # train.grad_clip; 0: no clipping


def poison_non_finite(loss: torch.Tensor, anchor: nn.Parameter) -> torch.Tensor:
    """``loss`` with the same value and gradients, except that a non-finite loss makes the
    gradient of one element of ``anchor`` NaN (0 * inf = NaN), which the all-reduce spreads."""
    return loss + (loss.detach() * 0.0) * anchor.reshape(-1)[0]


def clipped_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Total 2-norm ``||(||g_1||, ..., ||g_n||)||`` of the gradients before clipping them to
    ``max_norm``. With 0 (no clipping) only the norm is computed: ``clip_grad_norm_`` would
    still multiply every gradient by min(inf / norm, 1) = 1, one more pass over all of them
    that changes no bit (the norm is the same computation, ``_foreach_norm`` then the norm of
    the stack)."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def apply_if_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """Fused Adam's ``found_inf`` path (as GradScaler drives it): parameters, moments and the
    step count stay as they are when ``finite`` is False. No host sync."""
    found_inf = (~finite).to(torch.float32)
    if isinstance(optimizer, FlatAdam):
        optimizer.apply(found_inf)
    elif len(optimizer.state) == sum(len(g["params"]) for g in optimizer.param_groups):
        fused_adam_update(optimizer, found_inf)
    else:  # the first step builds Adam's state
        # fused Adam reads found_inf from an attribute GradScaler sets (torch declares none)
        optimizer.found_inf = found_inf  # type: ignore[attr-defined]
        optimizer.step()


def fused_adam_update(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """What ``optimizer.step()`` of a fused ``torch.optim.Adam`` with its state built runs: per
    group ``step += 1``, the fused kernel (which does nothing when ``found_inf`` is 1) and
    ``step -= found_inf``. Called directly because ``Optimizer.step`` breaks Dynamo graphs on
    purpose, so that a whole step traces as one graph (docs/design.md §8). One device, one dtype."""
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        state = [optimizer.state[p] for p in params]
        steps = [st["step"] for st in state]
        beta1, beta2 = group["betas"]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(
            params,
            [p.grad for p in params],
            [st["exp_avg"] for st in state],
            [st["exp_avg_sq"] for st in state],
            [st["max_exp_avg_sq"] for st in state] if group["amsgrad"] else [],
            steps,
            amsgrad=group["amsgrad"],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            grad_scale=None,
            found_inf=found_inf,
        )
        torch._foreach_sub_(steps, [found_inf] * len(steps))


def weight_step(s: StepParts, batch: Any, loss_fn: Callable[..., torch.Tensor] = pose_loss) -> None:
    """One step of the weight optimizer on ``batch`` (alpha/beta included under ``sync``)."""
    if isinstance(s.optimizer, FlatAdam):
        flat_weight_step(s, s.optimizer, batch, loss_fn)
        return
    loss = batch_loss(s.forward, batch, s.setup, loss_fn)
    logged = loss.detach()
    poison_non_finite(loss, s.params[0]).backward()
    finite = torch.isfinite(clipped_norm(s.params, s.max_norm))
    apply_if_finite(s.optimizer, finite)
    s.module.zero_grad(set_to_none=True)
    s.record.add(logged, finite)


def flat_weight_step(
    s: StepParts, optimizer: FlatAdam, batch: Any, loss_fn: Callable[..., torch.Tensor] = pose_loss
) -> None:
    """:func:`weight_step` over flat buffers (``train.flat_params``): the gradient buffers are
    zeroed before the backward, which adds into them; after the step they hold this step's
    gradients (clipped), and the gradients of the module's other parameters (darts1's
    alpha/beta) are dropped as the per-tensor step drops all."""
    flat = optimizer.flat
    flat.zero_grad()
    loss = batch_loss(s.forward, batch, s.setup, loss_fn)
    logged = loss.detach()
    poison_non_finite(loss, s.params[0]).backward()
    finite = torch.isfinite(flat.clipped_norm(s.max_norm))
    apply_if_finite(optimizer, finite)
    for p in s.module.parameters():
        if p.grad is not None and not flat.holds(p):
            p.grad = None
    s.record.add(logged, finite)


def arch_step(
    s: StepParts, batch: Any, world_size: int, loss_fn: Callable[..., torch.Tensor] = pose_loss
) -> None:
    """darts1: one Adam_arch step on grad_{alpha,beta} of the held-out batch's loss. Runs the bare
    module (no DDP reduction of the weight gradients) and all-reduces only alpha/beta's."""
    loss = batch_loss(s.module, batch, s.setup, loss_fn)
    grads = torch.autograd.grad(poison_non_finite(loss, s.params[0]), s.params, allow_unused=True)
    for p, g in zip(s.params, grads):
        p.grad = g
    average_gradients(s.params, world_size)
    finite = torch.isfinite(clipped_norm(s.params, s.max_norm))
    apply_if_finite(s.optimizer, finite)
    for p in s.params:
        p.grad = None
    s.record.add_flag(finite)
