"""Whole model: a tiny PNFS trains the same with the Triton kernels (interpreter) as with PyTorch's.

Run with the other interpreter tests (``make test-interpret``).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.interpret

STEPS = 20
LR = 3.0  # the loss gradients are ~1e-4 (mean over all pixels)
SIZE = (64, 32)  # the least input (multiples of 32) whose pyramid reaches 1/32


def _gaussian_targets(n: int, joints: int, h: int, w: int, generator: torch.Generator) -> torch.Tensor:
    """Score-map targets: a Gaussian (sigma 2 heatmap px, peak 1) at a random position per joint."""
    centers = torch.rand(n, joints, 2, generator=generator) * torch.tensor([w - 1.0, h - 1.0])
    ys = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w)
    d2 = (xs - centers[..., 0, None, None]) ** 2 + (ys - centers[..., 1, None, None]) ** 2
    return torch.exp(-d2 / (2 * 2.0**2))


def _loss_curve(backend: str, monkeypatch) -> list[float]:
    from pnfs.config import load_config
    from pnfs.loss import pose_loss
    from pnfs.model import build_model

    monkeypatch.setenv("PNFS_KERNELS", backend)
    cfg = load_config("demo", [f"data.input_size=[{SIZE[0]},{SIZE[1]}]"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    # SGD: its step is proportional to the gradient, so rounding differences between two correct
    # implementations stay rounding-sized. Adam's first steps are ~lr * sign(g): parameters whose
    # true gradient is ~0 (cell output biases feeding only conv + BN) get float-noise gradients
    # of ~1e-11 whose sign depends on summation order, and any two backends then drift apart.
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, *SIZE, generator=generator)
    targets = _gaussian_targets(2, model.num_joints, SIZE[0] // 4, SIZE[1] // 4, generator)
    weights = (torch.rand(2, model.num_joints, generator=generator) > 0.2).float()
    curve = []
    for _ in range(STEPS):
        loss = pose_loss(model(images), targets, weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    return curve


def test_tiny_pnfs_loss_curve_is_the_same_with_triton_and_torch_kernels(monkeypatch):
    reference = _loss_curve("torch", monkeypatch)
    triton = _loss_curve("triton", monkeypatch)
    assert reference[-1] < reference[0], f"the tiny model should learn: {reference}"
    torch.testing.assert_close(torch.tensor(triton), torch.tensor(reference), rtol=1e-4, atol=0)
