"""pnfs.summary: fvcore multiply-adds, the paper's counting convention and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

from pnfs.config import load_config
from pnfs.model import build_model
from pnfs.model.ops import DilConv, SepConv
from pnfs.summary import format_table, fvcore_macs, main, paper_counts


def test_paper_convention_counts_conv_wrappers_twice():
    sep, dil = SepConv(4), DilConv(4)  # BN(affine=False) has no parameters
    sep_params = 2 * (4 * 9 + 4 * 4)
    dil_params = 4 * 9 + 4 * 4
    model = nn.Sequential(sep, dil, nn.BatchNorm2d(4))
    params, macs = paper_counts(model, torch.randn(1, 4, 5, 5))
    assert params == 2 * sep_params + 2 * dil_params + 8
    assert macs == 25 * (sep_params + dil_params)  # each conv executed once, stride 1, 5x5 output


def test_paper_convention_ignores_torchvision_conv_bn_wrappers():
    """The authors' MobileNetV2 blocks were nn.Sequential: conv + BN counted once."""
    block = Conv2dNormActivation(3, 8, kernel_size=3)
    params, macs = paper_counts(block, torch.randn(1, 3, 6, 6))
    assert params == 8 * 27 + 16
    assert macs == 36 * 8 * 27


def test_paper_convention_counts_per_execution():
    conv = nn.Conv2d(2, 2, 1, bias=True)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return self.conv(self.conv(x))

    params, macs = paper_counts(Twice(), torch.randn(1, 2, 3, 3))
    assert params == 2 * 6 and macs == 2 * 9 * 4


def test_fvcore_counts_convolutions():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU())
    assert fvcore_macs(model, torch.randn(1, 3, 8, 8)) == 64 * 8 * 27


def test_fvcore_refuses_ops_it_cannot_count():
    class Opaque(nn.Module):
        def forward(self, x):
            return torch.ops.pnfs_test_summary.opaque(x)

    lib = torch.library.Library("pnfs_test_summary", "DEF")
    lib.define("opaque(Tensor x) -> Tensor")
    lib.impl("opaque", lambda x: x * 2, "CPU")
    with pytest.raises(RuntimeError, match="pnfs_test_summary::opaque"):
        fvcore_macs(nn.Sequential(nn.Conv2d(3, 3, 1), Opaque()), torch.randn(1, 3, 4, 4))


def test_fvcore_refuses_autograd_functions_it_cannot_count():
    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    class UsesFunction(nn.Module):
        def forward(self, x):
            return Double.apply(x)

    with pytest.raises(RuntimeError, match="PythonOp"):
        fvcore_macs(UsesFunction(), torch.randn(1, 3, 4, 4))


def test_fvcore_total_covers_the_paper_conv_count():
    model = build_model(load_config("demo", ["data.input_size=[64, 64]"])).eval()
    image = torch.randn(1, 3, 64, 64)
    _, conv_macs = paper_counts(model, image)
    macs = fvcore_macs(model, image)
    assert conv_macs <= macs < 1.15 * conv_macs  # plus BN, bilinear up-sampling


def test_cli_json(capsys):
    assert main(["demo", "model.channels=3", "data.input_size=[64, 64]", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert set(row) == {"params", "arch_params", "macs", "paper_params", "paper_gmacs"}
    model = build_model(load_config("demo", ["model.channels=3"]))
    assert row["params"] == sum(p.numel() for p in model.parameters())
    assert row["arch_params"] == sum(p.numel() for p in model.arch_parameters())
    assert row["paper_params"] > row["params"]  # SepConv/DilConv counted twice
    assert row["macs"] > 0 and row["paper_gmacs"] > 0


def test_cli_bad_override_is_a_clear_error():
    out = subprocess.run(
        [sys.executable, "-m", "pnfs.summary", "demo", "model.vector_dim=0"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "model.vector_dim" in out.stderr
    assert "Traceback" not in out.stderr


def test_human_table():
    row = {"params": 2_890_866, "arch_params": 66, "macs": 1_283_731_456, "paper_params": 3_315_240,
           "paper_gmacs": 1.164}  # fmt: skip
    text = format_table("mpii_mobilenetv2_p3_256", row)
    assert "2,890,866  (2.89M)" in text and "3,315,240  (3.32M)" in text and "1.164" in text
