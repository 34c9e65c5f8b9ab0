"""The frozen inference model: a trained PoseNFS with its search machinery folded away.

    frozen = freeze(model)                       # model: a PoseNFS (any mode), left untouched
    frozen = freeze(model, prune_below=0.05)     # also drop ops whose softmax weight is < 0.05

At inference alpha and beta are constants, ``zero`` columns are dead and BatchNorm is an
affine map, so (paper eqs. (1)-(3), :mod:`pnfs.model.cell`):

* every BatchNorm that follows a convolution is folded into it (backbones, stems, the
  cells' finer/coarser transforms, the ops' pointwise convs);
* the input node ``I = ReLU(3 * sum_i softmax(beta)_i T_i(O_i))`` becomes
  ``ReLU(w_id * O + conv'(O_finer) + up(conv''(O_coarser)))``: the factor ``3 softmax(beta)_i``
  is folded into the transform's conv (bilinear up-sampling is linear and keeps constants,
  so it commutes with the scale and the bias); slots that read the same tensor through the
  same kind of transform are summed into one conv (or one identity weight);
* a hidden node ``h_j = sum |O| softmax(alpha)_o o(h_i)`` becomes a plain sum: the weight
  ``|O| softmax(alpha)_o > 0`` is folded into the op's last affine step (the last folded
  pointwise conv of sep/dil conv, which a ReLU follows -- ``w ReLU(x) = ReLU(w x)`` for w > 0;
  the affine BN of a pooling op); ``skip_connect`` keeps a scalar weight;
* ``zero`` ops are gone; with ``prune_below`` every op whose ``softmax(alpha)_o`` (and every
  input slot whose ``softmax(beta)_i``) is below the threshold is dropped too -- except the
  strongest op of each edge and the strongest slot of each input node, so no node goes dead.
  Pruning changes the outputs; :func:`output_change` measures by how much.

A Table VI baseline (:class:`pnfs.model.BaselinePoseNet`) has no alpha/beta: freezing it folds
its BatchNorms, those after SimpleBaseline's deconvolutions included.

Without pruning the frozen model equals the training model in eval mode up to float32
rounding (within 1e-4 on the scores; ``tests/test_deploy.py``). It is in eval mode, takes no
gradient and is in ``channels_last`` memory format. Its forward is plain PyTorch, so it
exports (``launch/export.py``).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from pnfs.inference import HEATMAP_STRIDE, Refine, back_project, decode, predict_scores
from pnfs.model.backbones import FabricBackbone
from pnfs.model.baseline import BaselinePoseNet
from pnfs.model.cell import BETA_ORDER, Cell, Downsample, Upsample
from pnfs.model.fabric import Fabric, cell_name
from pnfs.model.ops import DilConv, PoolBN, SepConv
from pnfs.model.pnfs import PoseNFS

ModuleT = TypeVar("ModuleT", bound=nn.Module)

# --------------------------------------------------------------------------- BatchNorm folding


def _pair(value: str | tuple[int, ...], what: str) -> tuple[int, int]:
    """A 2-d conv's (h, w) setting, e.g. its ``stride``; a string padding ('same') has no pair."""
    if isinstance(value, str) or len(value) != 2:
        raise ValueError(f"freeze: a 2-d conv's {what} is {value!r}, expected (h, w)")
    return value[0], value[1]


def _conv_bias(conv: nn.Conv2d | nn.ConvTranspose2d) -> torch.Tensor:
    """The bias of a conv built with ``bias=True``."""
    if conv.bias is None:
        raise ValueError(f"freeze: {conv} has no bias")
    return conv.bias


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as y = a * x + b per channel (float64): a = gamma / sqrt(var + eps)."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError(f"freeze: {bn} keeps no running statistics (track_running_stats=False)")
    var = bn.running_var.double()
    mean = bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    a = gamma / torch.sqrt(var + bn.eps)
    return a, beta - mean * a


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, scale: float = 1.0) -> nn.Conv2d:
    """A new conv equal to ``scale * bn(conv(x))`` (eval-mode BN; ``bn=None``: ``scale * conv(x)``).

    W' = scale * a * W, b' = scale * (a * b_conv + b_bn), computed in float64.
    """
    out_ch = conv.out_channels
    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else weight.new_zeros(out_ch)
    if bn is not None:
        a, b = _bn_affine(bn)
        weight = weight * a.view(-1, 1, 1, 1)
        bias = a * bias + b
    folded = nn.Conv2d(
        conv.in_channels,
        out_ch,
        _pair(conv.kernel_size, "kernel_size"),
        stride=_pair(conv.stride, "stride"),
        padding=conv.padding if isinstance(conv.padding, str) else _pair(conv.padding, "padding"),
        dilation=_pair(conv.dilation, "dilation"),
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    )
    dtype = conv.weight.dtype
    folded.weight.data = (scale * weight).to(dtype)
    _conv_bias(folded).data = (scale * bias).to(dtype)
    return folded.to(conv.weight.device)


def _sum_convs(convs: Sequence[nn.Conv2d]) -> nn.Conv2d:
    """One conv equal to the sum of same-geometry convs applied to the same input."""
    total = copy.deepcopy(convs[0])
    for conv in convs[1:]:
        total.weight.data += conv.weight.data
        _conv_bias(total).data += _conv_bias(conv).data
    return total


def fold_deconv_bn(deconv: nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> nn.ConvTranspose2d:
    """A new transposed conv (groups 1) equal to ``bn(deconv(x))`` in eval mode: its weight
    [in, out, k, k] scaled by a per output channel, b' = a * b_deconv + b_bn (float64)."""
    weight = deconv.weight.detach().double()
    bias = deconv.bias.detach().double() if deconv.bias is not None else weight.new_zeros(deconv.out_channels)
    a, b = _bn_affine(bn)
    folded = nn.ConvTranspose2d(
        deconv.in_channels,
        deconv.out_channels,
        _pair(deconv.kernel_size, "kernel_size"),
        stride=_pair(deconv.stride, "stride"),
        padding=_pair(deconv.padding, "padding"),
        output_padding=_pair(deconv.output_padding, "output_padding"),
        dilation=_pair(deconv.dilation, "dilation"),
        bias=True,
    )
    dtype = deconv.weight.dtype
    folded.weight.data = (weight * a.view(1, -1, 1, 1)).to(dtype)
    _conv_bias(folded).data = (a * bias + b).to(dtype)
    return folded.to(deconv.weight.device)


def fold_batchnorms(module: nn.Module) -> nn.Module:
    """Fold, in place, every BatchNorm2d that directly follows a Conv2d, and return ``module``.

    Two patterns are recognised: adjacent ``Conv2d, BatchNorm2d`` in an ``nn.Sequential``
    (torchvision's Conv2dNormActivation, MobileNetV2 blocks, downsample branches, timm's HRNet
    fuse/transition layers, the Fabric stem), and the attribute pairs ``conv{i}``/``bn{i}`` of
    ResNet-style blocks whose forward applies ``bn{i}(conv{i}(x))`` (torchvision and timm
    Bottleneck/BasicBlock, the ResNet-50 and HRNet stems). The BN becomes ``nn.Identity``.
    """
    for child in list(module.children()):
        fold_batchnorms(child)
    if isinstance(module, nn.Sequential):
        keys = list(module._modules)
        for first, second in itertools.pairwise(keys):
            conv, bn = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module._modules[first] = fold_conv_bn(conv, bn)
                module._modules[second] = nn.Identity()
            elif isinstance(conv, nn.ConvTranspose2d) and conv.groups == 1 and isinstance(bn, nn.BatchNorm2d):
                module._modules[first] = fold_deconv_bn(conv, bn)
                module._modules[second] = nn.Identity()
    for suffix in ("", "1", "2", "3"):
        conv_attr, bn_attr = getattr(module, f"conv{suffix}", None), getattr(module, f"bn{suffix}", None)
        if isinstance(conv_attr, nn.Conv2d) and isinstance(bn_attr, nn.BatchNorm2d):
            setattr(module, f"conv{suffix}", fold_conv_bn(conv_attr, bn_attr))
            setattr(module, f"bn{suffix}", nn.Identity())
    return module


# --------------------------------------------------------------------------- frozen cells


class Scale(nn.Module):
    """``skip_connect`` with its weight: x -> weight * x."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class PoolAffine(nn.Module):
    """3x3 pooling then a per-channel affine map ``scale * p + shift`` (a folded BN times w)."""

    scale: torch.Tensor  # buffer [1, c, 1, 1]
    shift: torch.Tensor  # buffer [1, c, 1, 1]

    def __init__(self, pool: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.pool = pool
        self.register_buffer("scale", scale.view(1, -1, 1, 1))
        self.register_buffer("shift", shift.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, self.pool(x), self.scale)


def _expect(module: nn.Module, kind: type[ModuleT], what: str) -> ModuleT:
    """``module``, checked to be a ``kind`` (the layout the freeze rules assume)."""
    if not isinstance(module, kind):
        raise TypeError(f"freeze: {what} is a {type(module).__name__}, expected {kind.__name__}")
    return module


def _freeze_op(op: nn.Module, weight: float) -> nn.Module:
    """One edge op (eval mode) -> a module computing ``weight * op(x)``."""
    if isinstance(op, nn.Identity):
        return Scale(weight)
    if isinstance(op, (SepConv, DilConv)):
        layers = list(op)
        # groups of (dw conv, pw conv, BN, ReLU); fold each BN into its pw conv, w into the last
        blocks = [layers[k : k + 4] for k in range(0, len(layers), 4)]
        body = []
        for b, (dw, pw, bn, _relu) in enumerate(blocks):
            scale = weight if b == len(blocks) - 1 else 1.0
            body += [
                copy.deepcopy(dw),
                fold_conv_bn(
                    _expect(pw, nn.Conv2d, "a pointwise conv"), _expect(bn, nn.BatchNorm2d, "its BN"), scale
                ),
                nn.ReLU(),
            ]
        return nn.Sequential(*body)
    if isinstance(op, PoolBN):
        pool, pool_bn = op[0], _expect(op[1], nn.BatchNorm2d, "a pool's BN")
        bn_scale, bn_shift = _bn_affine(pool_bn)
        assert pool_bn.running_var is not None  # _bn_affine raises without running statistics
        dtype = pool_bn.running_var.dtype
        return PoolAffine(copy.deepcopy(pool), (weight * bn_scale).to(dtype), (weight * bn_shift).to(dtype))
    raise TypeError(f"freeze: no rule for the op {type(op).__name__}")


class FrozenCell(nn.Module):
    """A cell with alpha/beta folded in (see the module docstring).

    ``forward(finer, same, coarser)`` -> [N, c, h, w], the inputs as in :class:`Cell`.
    ``identity`` maps each source read unchanged (``same``, or ``finer`` never) to its summed
    weight; ``down``/``up`` map sources to one folded conv each; ``edges[j-1]`` lists
    ``(i, op)`` for hidden node j.
    """

    def __init__(
        self,
        identity: dict[str, float],
        down: dict[str, nn.Conv2d],
        up: dict[str, nn.Conv2d],
        edges: list[list[tuple[int, nn.Module]]],
        output: nn.Conv2d,
    ) -> None:
        super().__init__()
        self.identity = identity
        self.down = nn.ModuleDict(down)
        self.up = nn.ModuleDict(up)
        self.inputs_of = [[i for i, _ in node] for node in edges]
        self.ops = nn.ModuleList(nn.ModuleList(op for _, op in node) for node in edges)
        self.output = output

    def forward(
        self, finer: torch.Tensor | None, same: torch.Tensor | None, coarser: torch.Tensor | None
    ) -> torch.Tensor:
        given = {"finer": finer, "same": same, "coarser": coarser}

        def read(src: str) -> torch.Tensor:
            tensor = given[src]
            if tensor is None:
                raise ValueError(f"FrozenCell: its input {src!r} is None")
            return tensor

        terms = [read(src) * w for src, w in self.identity.items()]
        terms += [conv(read(src)) for src, conv in self.down.items()]
        terms += [
            F.interpolate(conv(read(src)), scale_factor=2.0, mode="bilinear", align_corners=True)
            for src, conv in self.up.items()
        ]
        nodes = [torch.relu(_add(terms))]
        for sources, ops in zip(self.inputs_of, self.ops):
            node_ops = _expect(ops, nn.ModuleList, "a node's ops")
            nodes.append(_add([op(nodes[i]) for i, op in zip(sources, node_ops)]))
        return self.output(torch.cat(nodes[1:], dim=1))


def _add(terms: list[torch.Tensor]) -> torch.Tensor:
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def _keep(weights: torch.Tensor, prune_below: float) -> list[bool]:
    """Which entries survive pruning: those >= the threshold, and always the largest."""
    keep = [bool(w >= prune_below) for w in weights]
    keep[int(weights.argmax())] = True
    return keep


def freeze_cell(cell: Cell, alpha: torch.Tensor, prune_below: float = 0.0) -> FrozenCell:
    """One trained cell (eval-mode statistics) and its fabric's alpha -> a FrozenCell."""
    identity: dict[str, float] = {}
    down: dict[str, list[nn.Conv2d]] = {}
    up: dict[str, list[nn.Conv2d]] = {}
    if cell.beta is None:
        identity["same"] = 3.0
    else:
        beta = torch.softmax(cell.beta.detach().double(), dim=0)
        for slot, w, kept in zip(BETA_ORDER, beta, _keep(beta, prune_below)):
            if not kept:
                continue
            source, transform, w = cell.sources[slot], cell.transforms[slot], 3.0 * float(w)
            if isinstance(transform, Downsample):
                conv = _expect(transform[0], nn.Conv2d, "a Downsample's conv")
                bn = _expect(transform[1], nn.BatchNorm2d, "a Downsample's BN")
                down.setdefault(source, []).append(fold_conv_bn(conv, bn, w))
            elif isinstance(transform, Upsample):
                up.setdefault(source, []).append(fold_conv_bn(transform.conv, transform.bn, w))
            else:
                identity[source] = identity.get(source, 0.0) + w
    soft = torch.softmax(alpha.detach().double(), dim=-1)
    edges: list[list[tuple[int, nn.Module]]] = [[] for _ in range(cell.hidden_nodes)]
    for e, (i, j) in enumerate(cell.edges):
        row = soft[e, cell.op_columns]
        for op, w, kept in zip(
            _expect(cell.edge_ops[e], nn.ModuleList, "an edge's ops"), row, _keep(row, prune_below)
        ):
            if kept:
                edges[j - 1].append((i, _freeze_op(op, cell.num_ops * float(w))))
    return FrozenCell(
        identity,
        {s: _sum_convs(c) for s, c in down.items()},
        {s: _sum_convs(c) for s, c in up.items()},
        edges,
        copy.deepcopy(cell.output),
    )


class FrozenFabric(nn.Module):
    """A fabric of FrozenCells on the same layers: ``dict[scale, Tensor] -> dict[scale, Tensor]``."""

    def __init__(self, layers: list[list[int]], cells: dict[str, FrozenCell]) -> None:
        super().__init__()
        self.layers = layers
        self.cells = nn.ModuleDict(cells)

    def forward(self, inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        nodes = inputs
        for layer, scales in enumerate(self.layers, start=1):
            nodes = {
                s: self.cells[cell_name(layer, s)](nodes.get(s // 2), nodes.get(s), nodes.get(s * 2))
                for s in scales
            }
        return nodes


def freeze_fabric(fabric: Fabric, prune_below: float = 0.0) -> FrozenFabric:
    cells = {
        name: freeze_cell(_expect(cell, Cell, f"fabric cell {name}"), fabric.alpha, prune_below)
        for name, cell in fabric.cells.items()
    }
    return FrozenFabric([list(s) for s in fabric.layers], cells)


# --------------------------------------------------------------------------- the model


@torch.no_grad()
def freeze(
    model: PoseNFS | BaselinePoseNet, prune_below: float = 0.0, channels_last: bool = True
) -> PoseNFS | BaselinePoseNet:
    """A frozen copy of a trained PoseNFS (or baseline) for inference (eval mode, no grad,
    BN/alpha/beta folded).

    ``model`` is not changed. ``prune_below`` in [0, 1): also drop ops/slots whose softmax
    weight is below it (0: exact, nothing dropped beyond ``zero``).
    """
    if not 0.0 <= prune_below < 1.0:
        raise ValueError(f"--prune-below {prune_below!r} must be in [0, 1)")
    # freezing walks the parts one at a time: a batched PoseNFS (model.batched_parts) is unbatched first
    frozen = model.with_part_layout(False) if isinstance(model, PoseNFS) else copy.deepcopy(model)
    for part in frozen.part_networks() if isinstance(frozen, PoseNFS) else ():
        # the frozen model swaps in a FrozenFabric (the same forward); only deploy code walks it after
        part.fabric = freeze_fabric(part.fabric, prune_below)  # type: ignore[assignment]
    if isinstance(frozen.backbone, FabricBackbone):  # the same swap for the Fabric backbone
        frozen.backbone.fabric = freeze_fabric(frozen.backbone.fabric, prune_below)  # type: ignore[assignment]
    fold_batchnorms(frozen)
    remaining = [type(m).__name__ for m in frozen.modules() if isinstance(m, (nn.BatchNorm2d, Cell, Fabric))]
    if remaining:
        raise TypeError(f"freeze: modules left unfolded: {sorted(set(remaining))}")
    frozen.requires_grad_(False)
    frozen.eval()  # after folding: the modules built here (folded convs, frozen cells) start in training mode
    if channels_last:
        frozen.to(memory_format=torch.channels_last)
    return frozen


def count_ops(model: nn.Module) -> int:
    """Edge ops a (frozen or training) model computes (``zero`` never counts)."""
    frozen = sum(
        len(_expect(ops, nn.ModuleList, "a node's ops"))
        for m in model.modules()
        if isinstance(m, FrozenCell)
        for ops in m.ops
    )
    training = sum(
        len(_expect(ops, nn.ModuleList, "an edge's ops"))
        for m in model.modules()
        if isinstance(m, Cell)
        for ops in m.edge_ops
    )
    return frozen + training


@torch.no_grad()
def output_change(reference: nn.Module, frozen: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """How far ``frozen``'s scores are from ``reference``'s (eval mode) on ``images``:
    max and mean |delta score| and the fraction of joints whose argmax moved."""
    was = reference.training
    reference.eval()
    try:
        a, b = reference(images).float(), frozen(images).float()
    finally:
        reference.train(was)
    n, k = a.shape[:2]
    moved = (a.reshape(n, k, -1).argmax(-1) != b.reshape(n, k, -1).argmax(-1)).float().mean()
    delta = (a - b).abs()
    return {"max_abs": float(delta.max()), "mean_abs": float(delta.mean()), "argmax_moved": float(moved)}


# --------------------------------------------------------------------------- export


class DecodingModel(nn.Module):
    """Images and person-crop affines in, keypoints in original-image pixels and scores out.

    ``forward(images [N, 3, H, W], affine [N, 2, 3] input px -> image px)`` ->
    ``(keypoints [N, K, 2] float32, scores [N, K] float32)``: the frozen network, the optional
    flip test (:func:`pnfs.inference.predict_scores`), argmax with the quarter offset (or the
    Gaussian refinement) and back-projection x_img = A [u s, v s, 1], as
    :func:`pnfs.inference.predict` does, in one graph made of plain PyTorch ops.
    """

    def __init__(
        self,
        network: nn.Module,
        flip_permutation: list[int] | None = None,
        flip_shift: bool = False,
        refine: Refine = "quarter",
    ) -> None:
        super().__init__()
        self.network = network
        self.flip_permutation = flip_permutation
        self.flip_shift = flip_shift
        self.refine = refine

    def forward(self, images: torch.Tensor, affine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = predict_scores(self.network, images, self.flip_permutation, self.flip_shift)
        coords, maxvals = decode(scores, self.refine)
        return back_project(coords, affine.float(), HEATMAP_STRIDE), maxvals


EXPORT_FORMATS = ("onnx", "torchscript", "exported-program")


def _export_onnx(
    module: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    out: Path,
    names: list[str],
    outputs: list[str],
    shapes: dict | None,
) -> None:
    """``torch.onnx.export`` (the dynamo exporter, which runs on onnxscript), then
    ``onnx.checker.check_model(full_check=True)``: the file is valid ONNX and its shapes infer,
    so a broken graph fails here, naming the file, not later in the user's runtime."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (what torch.onnx's dynamo exporter builds the graph with)
    except ImportError as err:
        raise RuntimeError(
            f"--format onnx needs the onnx and onnxscript packages ({err.name} is missing): "
            "pip install onnx onnxscript"
        ) from None
    # The exporter's progress lines go to stderr, and its warning that the inputs share one batch
    # axis (they are meant to) is silenced: stdout keeps only what the command itself reports.
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*The axis name: .* will not be used")
        torch.onnx.export(
            module, inputs, str(out), input_names=names, output_names=outputs,
            dynamic_shapes=shapes, dynamo=True, external_data=False,
        )  # fmt: skip
    try:
        onnx.checker.check_model(str(out), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ValueError(f"exported {str(out)!r} is not a valid ONNX model: {err}") from None


def export_file(
    module: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    names: list[str],
    fmt: str,
    out: Path,
    dynamic: bool,
) -> None:
    """Write ``module`` traced on ``inputs`` (named ``names``) to ``out`` in ``fmt`` (one of
    :data:`EXPORT_FORMATS`); dim 0 of every input is free when ``dynamic``. The custom kernels
    are traced through their PyTorch references (``PNFS_KERNELS=torch`` while tracing)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {list(EXPORT_FORMATS)}")
    outputs = ["keypoints", "scores"] if len(inputs) == 2 else ["scores"]
    batch = torch.export.Dim("batch", min=1, max=1024)
    shapes = {name: {0: batch} for name in names} if dynamic else None
    previous = os.environ.get("PNFS_KERNELS")
    os.environ["PNFS_KERNELS"] = "torch"
    try:
        if fmt == "onnx":
            _export_onnx(module, inputs, out, names, outputs, shapes)
        elif fmt == "exported-program":
            torch.export.save(torch.export.export(module, inputs, dynamic_shapes=shapes), str(out))
        else:
            torch.jit.save(torch.jit.trace(module, inputs, check_trace=False), str(out))
    finally:
        if previous is None:
            os.environ.pop("PNFS_KERNELS")
        else:
            os.environ["PNFS_KERNELS"] = previous
