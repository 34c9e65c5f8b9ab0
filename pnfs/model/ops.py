"""Candidate operations of a cell edge (paper §III-B, docs/design.md §2).

Every op keeps the shape: stride 1, ``channels`` in and out, [N, C, H, W] -> [N, C, H, W].

* ``zero``: contributes nothing. It is never built nor computed; it only keeps its column
  in ``softmax(alpha)`` (see :class:`pnfs.model.cell.Cell`).
* ``skip_connect``: identity.
* ``sep_conv_3x3``: (depthwise 3x3 -> pointwise 1x1 -> BN(affine=False) -> ReLU) twice.
* ``dil_conv_3x3``: depthwise 3x3 with dilation 2 -> pointwise 1x1 -> BN(affine=False) -> ReLU.
* ``avg_pool_3x3`` (count_include_pad=False) and ``max_pool_3x3``, each followed by
  BN(affine=False).

The wrapper class names :class:`SepConv` and :class:`DilConv` contain "Conv" on purpose:
the paper's counting convention (``pnfs.summary``) counts every executed module whose
class name contains "Conv" or "BatchNorm", so these wrappers count their conv parameters a
second time, exactly as the paper's figures do.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ZERO = "zero"


def _dw_pw_bn_relu(channels: int, dilation: int, groups: int) -> list[nn.Module]:
    return [
        nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, groups=channels, bias=False),
        nn.Conv2d(channels, channels, 1, groups=groups, bias=False),
        nn.BatchNorm2d(channels, affine=False),
        nn.ReLU(inplace=False),
    ]


class SepConv(nn.Sequential):
    """sep_conv_3x3: (dw 3x3 -> pw 1x1 -> BN(affine=False) -> ReLU) x 2; ``groups`` > 1 splits
    the pointwise convs into that many independent channel blocks (the parts of a batched fabric)."""

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(*_dw_pw_bn_relu(channels, 1, groups), *_dw_pw_bn_relu(channels, 1, groups))


class DilConv(nn.Sequential):
    """dil_conv_3x3: dw 3x3 dilation 2 -> pw 1x1 -> BN(affine=False) -> ReLU (``groups`` as SepConv)."""

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(*_dw_pw_bn_relu(channels, 2, groups))


class PoolBN(nn.Sequential):
    """3x3 pooling (stride 1, padding 1) followed by BN(affine=False)."""

    def __init__(self, channels: int, kind: str) -> None:
        pool = (
            nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
            if kind == "avg"
            else nn.MaxPool2d(3, stride=1, padding=1)
        )
        super().__init__(pool, nn.BatchNorm2d(channels, affine=False))


OP_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "skip_connect": lambda c, g: nn.Identity(),
    "sep_conv_3x3": SepConv,
    "dil_conv_3x3": DilConv,
    "avg_pool_3x3": lambda c, g: PoolBN(c, "avg"),
    "max_pool_3x3": lambda c, g: PoolBN(c, "max"),
}


def build_op(name: str, channels: int, groups: int = 1) -> nn.Module:
    """The module of candidate op ``name`` on ``channels`` channels (``zero`` has none);
    ``groups`` independent channel blocks of ``channels // groups`` each (1: one op)."""
    if name not in OP_BUILDERS:
        known = [ZERO, *OP_BUILDERS]
        raise ValueError(f"unknown op {name!r}; expected one of {known}")
    return OP_BUILDERS[name](channels, groups)
