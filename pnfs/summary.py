"""Model size and cost: ``python -m pnfs.summary CONFIG [key=value ...] [--json]``.

Columns (one image, eval mode, traced on the PyTorch reference kernels):

* ``params``: trainable parameters (every one receives a gradient; see the model tests).
* ``arch_params``: the architecture parameters (every alpha and beta).
* ``macs``: multiply-adds counted by fvcore (convolutions, BN, bilinear up-sampling, ...;
  element-wise ops as fvcore's defaults count them). A non-aten op fvcore has no handle for
  (a custom kernel op) makes the summary fail instead of counting as 0; our kernel ops have
  handles (``pnfs.kernels.FVCORE_HANDLES``: counted as fvcore counts their PyTorch
  references), though the summary traces the reference path (``PNFS_KERNELS=torch``) anyway.
* ``paper_params``: the paper's convention: the parameters of every executed module whose
  class name contains "Conv" or "BatchNorm", counted once per call, so a wrapper such as
  :class:`pnfs.model.ops.SepConv` / ``DilConv`` counts its convolutions a second time.
  The backbones follow the authors' builds, whose conv-BN blocks were plain
  ``nn.Sequential``: torchvision's ``Conv2dNormActivation`` wrapper is not matched.
* ``paper_gmacs``: multiply-adds of the executed convolutions (k*k*c_in/groups per output
  element, bias excluded) divided by 1024^3. A transposed convolution (SimpleBaseline's
  deconvolutions) is counted by the same formula, k*k*c_in per output element, as the
  SimpleBaseline/HRNet authors' model summary counts every conv (weight size x output size):
  4x what a 4x4 stride-2 deconvolution really multiplies, but what Table VI's 12.0G is
  (docs/design.md §2, "Size and cost of the presets").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from pnfs.config import Config, ConfigError, load_config
from pnfs.errors import run_main

# Wrappers whose name matches the convention but which the authors' backbones did not have.
_NOT_PAPER_WRAPPERS = ("Conv2dNormActivation", "ConvNormActivation")


def _is_paper_module(module: nn.Module) -> bool:
    name = type(module).__name__
    return ("Conv" in name or "BatchNorm" in name) and name not in _NOT_PAPER_WRAPPERS


@contextmanager
def _reference_kernels():
    old = os.environ.get("PNFS_KERNELS")
    os.environ["PNFS_KERNELS"] = "torch"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PNFS_KERNELS", None)
        else:
            os.environ["PNFS_KERNELS"] = old


def paper_counts(model: nn.Module, image: torch.Tensor) -> tuple[int, int]:
    """(params, conv multiply-adds) of one forward pass in the paper's convention."""
    params, macs = 0, 0

    def hook(module: nn.Module, inputs, output) -> None:
        nonlocal params, macs
        params += sum(p.numel() for p in module.parameters())
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            kh, kw = module.kernel_size
            macs += output[0].numel() * kh * kw * module.in_channels // module.groups

    handles = [m.register_forward_hook(hook) for m in model.modules() if _is_paper_module(m)]
    try:
        with torch.no_grad(), _reference_kernels():
            model(image)
    finally:
        for h in handles:
            h.remove()
    return params, macs


def fvcore_macs(model: nn.Module, image: torch.Tensor) -> int:
    """fvcore's multiply-add count; fails on ops it would silently count as 0."""
    with warnings.catch_warnings():  # fvcore.nn imports a torch.jit.script-ed loss: a FutureWarning
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    from pnfs.kernels import FVCORE_HANDLES

    analysis = FlopCountAnalysis(model, image)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    # our kernels, should a custom op be traced: counted as fvcore counts their references
    analysis.set_op_handle(**FVCORE_HANDLES)
    with torch.no_grad(), _reference_kernels():
        total = analysis.total()

    # fvcore leaves aten element-wise ops uncounted by design; any other op it cannot count
    # (a custom kernel op of any namespace) would silently count as 0, so that is an error.
    def uncountable(op: str) -> bool:  # custom ops and autograd.Function calls (prim::PythonOp)
        return not op.startswith(("aten::", "prim::")) or op.startswith("prim::PythonOp")

    unknown = {op: n for op, n in analysis.unsupported_ops().items() if uncountable(op)}
    if unknown:
        raise RuntimeError(f"fvcore cannot count the custom ops {unknown}; add a handle in pnfs.summary")
    return int(total)


def summarize(cfg: Config) -> dict:
    """The five numbers of :mod:`pnfs.summary` for one image of ``cfg.data.input_size``."""
    from pnfs.model import build_model

    model = build_model(cfg).eval()
    height, width = cfg.data.input_size
    image = torch.randn(1, 3, height, width)
    paper_params, paper_macs = paper_counts(model, image)
    return {
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "arch_params": sum(p.numel() for p in model.arch_parameters()),
        "macs": fvcore_macs(model, image),
        "paper_params": paper_params,
        "paper_gmacs": paper_macs / 1024**3,
    }


def format_table(name: str, row: dict) -> str:
    lines = [
        f"{name}",
        f"  trainable parameters       {row['params']:>14,d}  ({row['params'] / 1e6:.2f}M)",
        f"  architecture parameters    {row['arch_params']:>14,d}",
        f"  multiply-adds (fvcore)     {row['macs']:>14,d}  ({row['macs'] / 1e9:.2f}G)",
        f"  paper convention params    {row['paper_params']:>14,d}  ({row['paper_params'] / 1e6:.2f}M)",
        f"  paper convention GMadds    {row['paper_gmacs']:>14.3f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pnfs.summary", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML file or preset name in pnfs/configs")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    row = summarize(cfg)
    print(json.dumps(row) if args.json else format_table(args.config, row))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
