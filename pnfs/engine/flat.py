"""Flat parameters: all trained tensors of a group in one buffer, their gradients in another
(``train.flat_params``, docs/design.md §7).

A PNFS supernet has a few hundred parameter tensors (232 for ``mpii_mobilenetv2_p3_256``).
Per tensor, the step's bookkeeping dispatches operators of its own: a norm for the gradient
norm, a step count added to and subtracted from, a read of it inside CPU fused Adam, ... --
thousands of operators per step that do almost no arithmetic (on a GPU: launches). Here each
``nn.Parameter``'s ``.data`` and ``.grad`` are views into one flat buffer per
(parameter kind, device, dtype), so that the norm, the non-finite check, the zeroing and Adam
run as a handful of operators over the flat buffers:

    data  [N]   p_i.data = data[o_i : o_i + n_i] with p_i's own shape and strides
    grad  [N]   p_i.grad = grad[o_i : o_i + n_i] likewise; the backward adds into it in place
    ||g||     = vector_norm(grad)                      (in float64; over buffers: the norm of their norms)
    zero      : grad.zero_()                           (before the step's backward)

The kinds stay apart (weights; alpha/beta), as the search strategies treat them apart
(:mod:`pnfs.engine.strategies`). :class:`FlatAdam` is Adam over the buffers, one fused kernel
call per step, with ``torch.optim.Adam``'s per-tensor ``state_dict`` both ways: checkpoints
do not change, and a run resumes across ``train.flat_params`` in either direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class FlatViewError(RuntimeError):
    """A parameter is no longer a view into its flat buffer; the message names it and why."""


@dataclass
class FlatBuffer:
    """The parameters of one kind, device and dtype, laid end to end.

    data:    [N] the parameters' values; ``params[i].data`` views ``data[offsets[i]:][:n_i]``
    grad:    [N] their gradients, viewed by ``params[i].grad`` the same way
    params:  the parameters, in the order given
    offsets: where each starts in ``data`` and ``grad``
    """

    data: torch.Tensor
    grad: torch.Tensor
    params: list[nn.Parameter]
    offsets: list[int]
    grad_views: list[torch.Tensor] = field(default_factory=list)

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """``flat``'s part for parameter ``i``, with that parameter's shape and strides
        (a channels_last weight stays channels_last)."""
        p = self.params[i]
        return flat.as_strided(p.shape, p.stride(), self.offsets[i])

    def holds(self, i: int) -> bool:
        """Parameter ``i``'s data still lies where this buffer put it."""
        p = self.params[i]
        start = self.data.data_ptr() + self.offsets[i] * self.data.element_size()
        return (
            p.data_ptr() == start and p.untyped_storage().data_ptr() == self.data.untyped_storage().data_ptr()
        )


def _dense_span(p: torch.Tensor) -> bool:
    """``p``'s strides address each of ``p.numel()`` consecutive elements once (contiguous in
    some order of its dimensions, as contiguous and channels_last tensors are), so they fit a
    flat segment of that length."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(p.shape, p.stride()) if s > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def flatten_group(params: Sequence[nn.Parameter]) -> list[FlatBuffer]:
    """Move ``params`` into flat buffers, one per (device, dtype), keeping their values, shapes,
    strides and any gradient they hold; from here on each ``.data`` and ``.grad`` is a view."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
    for p in params:
        if not _dense_span(p):
            raise FlatViewError(
                f"train.flat_params: a parameter of shape {tuple(p.shape)} with strides {p.stride()} "
                "is not dense; set train.flat_params=false"
            )
        by_kind.setdefault((p.device, p.dtype), []).append(p)
    buffers = []
    for (device, dtype), members in by_kind.items():
        offsets, total = [], 0
        for p in members:
            offsets.append(total)
            total += p.numel()
        data = torch.empty(total, device=device, dtype=dtype)
        grad = torch.zeros(total, device=device, dtype=dtype)
        buf = FlatBuffer(data, grad, members, offsets)
        with torch.no_grad():
            for i, p in enumerate(members):
                view = buf.view(data, i)
                view.copy_(p.detach())
                old_grad = p.grad
                p.data = view
                buf.grad_views.append(buf.view(grad, i))
                if old_grad is not None:
                    buf.grad_views[i].copy_(old_grad)
                p.grad = buf.grad_views[i]
        buffers.append(buf)
    return buffers


class FlatParameters:
    """The flat buffers of an optimizer's parameters, kinds apart (see the module docstring).

    ``groups`` are lists of parameters that never share a buffer (weights; alpha/beta); within
    each, one buffer per device and dtype. ``params`` is every parameter in the order given."""

    def __init__(self, groups: Sequence[Sequence[nn.Parameter]]) -> None:
        self.params: list[nn.Parameter] = [p for g in groups for p in g]
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("FlatParameters: a parameter is given twice")
        self.buffers: list[FlatBuffer] = [b for g in groups if g for b in flatten_group(g)]
        self._ids = {id(p) for p in self.params}
        where = {id(p): (j, i) for j, b in enumerate(self.buffers) for i, p in enumerate(b.params)}
        self._where = [where[id(p)] for p in self.params]  # (buffer index, index in it) of params[k]

    def holds(self, p: nn.Parameter) -> bool:
        return id(p) in self._ids

    @property
    def datas(self) -> list[torch.Tensor]:
        return [b.data for b in self.buffers]

    @property
    def grads(self) -> list[torch.Tensor]:
        return [b.grad for b in self.buffers]

    def view(self, k: int, flats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Parameter ``k``'s part of ``flats`` (tensors shaped like the buffers, in their order)."""
        j, i = self._where[k]
        return self.buffers[j].view(flats[j], i)

    def zero_grad(self) -> None:
        """Gradients to zero, and every ``.grad`` the flat view again (code that set one to
        None, as ``Module.zero_grad`` does, is undone here: the next backward adds into the
        buffer). Run before the backward."""
        for buf in self.buffers:
            for p, g in zip(buf.params, buf.grad_views):
                if p.grad is not g:
                    p.grad = g
            buf.grad.zero_()

    def norm(self) -> torch.Tensor:
        """Total 2-norm of the gradients, ``||(||g_1||, ..., ||g_B||)||`` over the B buffers, summed
        in float64 and returned in the gradients' dtype (0-dim). One float32 reduction over a
        buffer of 10^5..10^7 elements loses up to 1e-5 relative on the CPU (measured: 1.9e-5 over
        215,864 gradients), more than the per-tensor norms of ``clip_grad_norm_`` do; summed in
        float64 it is the exact norm rounded once, within 1e-6 of the per-tensor one."""
        norms = [torch.linalg.vector_norm(g, dtype=torch.float64) for g in self.grads]
        total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
        return total.to(self.grads[0].dtype)

    def clipped_norm(self, max_norm: float) -> torch.Tensor:
        """:meth:`norm` before clipping the gradients to ``max_norm`` as ``clip_grad_norm_`` does,
        ``g <- g * min(max_norm / (norm + 1e-6), 1)``; with 0 (no clipping) only the norm."""
        norm = self.norm()
        if max_norm > 0:
            scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for g in self.grads:
                g.mul_(scale.to(g.dtype))
        return norm

    def check_views(self) -> None:
        """FlatViewError naming the first parameter whose data no longer lies in its buffer
        (``p.data = ...``, or ``Module.to`` onto another device or dtype, replaces a view)."""
        for k, p in enumerate(self.params):
            j, i = self._where[k]
            buf = self.buffers[j]
            if not buf.holds(i):
                raise FlatViewError(
                    f"train.flat_params: parameter {k} (shape {tuple(p.shape)}) is no longer a view into "
                    f"its flat buffer ({buf.data.device}, {buf.data.dtype}): something replaced its .data "
                    "(Module.to onto another device or dtype does); move the model before building the "
                    "optimizer"
                )


def adam_group_defaults(
    lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> dict[str, Any]:
    """The param-group entries of ``torch.optim.Adam(..., fused=True)`` of the installed torch,
    so that a :class:`FlatAdam` state dict loads into a per-tensor Adam and back unchanged."""
    probe = nn.Parameter(torch.zeros(1))
    return dict(
        torch.optim.Adam([probe], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True).defaults
    )


class FlatAdam(torch.optim.Optimizer):
    """Adam (Kingma & Ba; the paper trains with Adam, docs/training.md) over flat buffers.

    Per element, at step t with gradient g (plus ``weight_decay * w`` when set):

        m <- beta1 m + (1 - beta1) g            v <- beta2 v + (1 - beta2) g^2
        w <- w - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

    one ``torch._fused_adam_`` call over the buffers, the kernel that
    ``torch.optim.Adam(fused=True)`` runs per tensor (the same arithmetic per element). The
    moments are flat buffers too, with one step count for all parameters. ``found_inf`` = 1
    (:meth:`apply`) leaves weights, moments and the count as they are.

    ``param_groups`` and :meth:`state_dict` are ``torch.optim.Adam``'s, tensor by tensor (the
    ``params`` of the one group in the order given); :meth:`load_state_dict` takes either.
    """

    def __init__(
        self,
        flat: FlatParameters,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(flat.params, adam_group_defaults(lr, betas, eps, weight_decay))
        self.flat = flat
        self.exp_avg = [torch.zeros_like(d) for d in flat.datas]
        self.exp_avg_sq = [torch.zeros_like(d) for d in flat.datas]
        device = flat.buffers[0].data.device if flat.buffers else torch.device("cpu")
        self.step_count = torch.zeros((), dtype=torch.float32, device=device)  # Adam's fused "step"
        self.started = False  # torch.optim.Adam builds its state at the first step

    # ------------------------------------------------------------------ the update

    def apply(self, found_inf: torch.Tensor | None) -> None:
        """One Adam step over all buffers; none when ``found_inf`` (float32, 0-dim) is 1.
        No host read: ``step += 1``, the fused kernel (which returns at once when ``found_inf``
        is set), ``step -= found_inf``."""
        if not self.flat.buffers:
            return
        group = self.param_groups[0]
        if group.get("amsgrad", False):
            raise ValueError("FlatAdam: amsgrad is not supported")
        self._start()
        beta1, beta2 = group["betas"]
        n = len(self.flat.buffers)
        self.step_count.add_(1)
        torch._fused_adam_(
            self.flat.datas,
            self.flat.grads,
            self.exp_avg,
            self.exp_avg_sq,
            [],
            [self.step_count] * n,
            amsgrad=False,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group.get("maximize", False),
            grad_scale=None,
            found_inf=found_inf,
        )
        if found_inf is not None:
            self.step_count.sub_(found_inf)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.apply(getattr(self, "found_inf", None))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffers (``set_to_none`` cannot apply: the views stay)."""
        self.flat.zero_grad()

    def _start(self) -> None:
        """``self.state`` as torch.optim.Adam's after its first step, each entry a view."""
        if self.started:
            return
        for k, p in enumerate(self.flat.params):
            self.state[p] = {
                "step": self.step_count,
                "exp_avg": self.flat.view(k, self.exp_avg),
                "exp_avg_sq": self.flat.view(k, self.exp_avg_sq),
            }
        self.started = True

    # ------------------------------------------------------------------ state dict

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Adam``'s state dict: per parameter index ``{"step", "exp_avg",
        "exp_avg_sq"}``, each tensor a copy with its own storage (not views of the flat buffers,
        which a file would otherwise hold whole, nor one shared step tensor)."""
        packed = super().state_dict()
        packed["state"] = {
            k: {name: value.detach().clone() for name, value in entry.items()}
            for k, entry in packed["state"].items()
        }
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of a per-tensor ``torch.optim.Adam`` or of a FlatAdam (the same
        format) into the flat moments. The step counts must agree over parameters: FlatAdam
        keeps one (ValueError naming the parameters otherwise)."""
        super().load_state_dict(state_dict)  # validates the groups, casts the tensors
        loaded = dict(self.state)
        self.state.clear()
        self.started = False
        for m in (*self.exp_avg, *self.exp_avg_sq):
            m.zero_()
        self.step_count.zero_()
        if not loaded:
            return
        missing = [k for k, p in enumerate(self.flat.params) if p not in loaded]
        if missing:
            raise ValueError(
                f"optimizer state: parameters {missing[:5]} have no Adam state while others have; "
                "train.flat_params=true needs one for every parameter (resume with train.flat_params=false)"
            )
        for k, p in enumerate(self.flat.params):
            for name in ("exp_avg", "exp_avg_sq"):
                if loaded[p][name].shape != p.shape:
                    raise ValueError(
                        f"optimizer state: parameter {k} has shape {tuple(p.shape)}, the saved {name} of "
                        f"shape {tuple(loaded[p][name].shape)}: a state of another model or parameter order"
                    )
        steps = {float(loaded[p]["step"]) for p in self.flat.params}
        if len(steps) != 1:
            raise ValueError(
                f"optimizer state: the parameters' Adam step counts differ ({sorted(steps)[:5]}); "
                "train.flat_params=true keeps one for all (resume with train.flat_params=false)"
            )
        with torch.no_grad():
            for k, p in enumerate(self.flat.params):
                self.flat.view(k, self.exp_avg).copy_(loaded[p]["exp_avg"])
                self.flat.view(k, self.exp_avg_sq).copy_(loaded[p]["exp_avg_sq"])
            self.step_count.fill_(steps.pop())
        self._start()
