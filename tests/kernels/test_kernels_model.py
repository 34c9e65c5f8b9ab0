"""Whole model: a tiny PNFS trains the same with the Triton kernels (interpreter) as with PyTorch's.

Run with the other interpreter tests (``make test-interpret``).

Why BatchNorm runs on its running statistics (``model.eval()``) while the model trains: at
64x32 input the 1/32 cells see 2 images x 2x1 pixels, so a BatchNorm in training mode
normalises each channel over 4 numbers and turns rounding-sized differences into O(1) ones
within a few steps. Measured with the PyTorch reference against *itself*, only the summation
order of every weighted sum reversed, as the largest relative difference of the 20 losses
(this model, data and SGD, unless noted):

    BatchNorm batch statistics,   fp32, lr 0.3                      1.3e-2
    BatchNorm batch statistics,   fp64, lr 0.3                      9.7e-6
    BatchNorm batch statistics,   fp32, lr 3.0, three part fabrics  3.7e-2  (fp64: 7.8e-3)
    BatchNorm running statistics, fp32, lr 3.0                      2.3e-7
    BatchNorm running statistics, fp32, lr 0.3 (this test)          0 (the same curve)

so in training mode no implementation, not even the reference, meets 1e-4 (in fp32 it misses
by 100x). With the normalisation fixed the model is still trained end to end (every conv, the
BatchNorm affine parameters, alpha and beta, 20 optimizer steps) through the forward and
backward of every kernel the model uses (``weighted_sum`` with ReLU for the input nodes and
without for the hidden nodes, ``squash_score`` in the head). Triton vs torch then differ by
~1e-7; a weight gradient 1% off moves the curve by 1.6e-3 and a squash gradient 0.1% off by
1.8e-4, both caught by the 1e-4 bound.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.interpret

STEPS = 20
LR = 0.3
SIZE = (64, 32)  # the least input (multiples of 32) whose pyramid reaches 1/32
OVERRIDES = [f"data.input_size=[{SIZE[0]},{SIZE[1]}]", "model.num_parts=1"]  # one part fabric: faster


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
    cfg = load_config("demo", OVERRIDES)
    torch.manual_seed(0)
    model = build_model(cfg).eval()  # BatchNorm on running statistics: see the module docstring
    # SGD: its step is proportional to the gradient, so rounding differences stay rounding-sized.
    # Adam's first steps are ~lr * sign(g): parameters whose true gradient is ~0 (cell output
    # biases feeding only conv + BN) get float-noise gradients whose sign depends on summation order.
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
    assert reference[-1] < 0.5 * reference[0], f"the tiny model should learn: {reference}"
    torch.testing.assert_close(torch.tensor(triton), torch.tensor(reference), rtol=1e-4, atol=0)


def _forward_backward(backend: str, monkeypatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and every parameter gradient of one forward/backward of the tiny model."""
    from pnfs.config import load_config
    from pnfs.model import build_model

    monkeypatch.setenv("PNFS_KERNELS", backend)
    torch.manual_seed(0)
    model = build_model(load_config("demo", OVERRIDES)).eval()
    images = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(3))
    out = model(images)
    out.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def test_triton_and_torch_kernels_agree_forward_and_backward(monkeypatch):
    """PNFS_KERNELS=triton (interpreter) against PNFS_KERNELS=torch: the same output and gradients."""
    out_torch, grads_torch = _forward_backward("torch", monkeypatch)
    out_triton, grads_triton = _forward_backward("triton", monkeypatch)
    torch.testing.assert_close(out_triton, out_torch, rtol=1e-5, atol=1e-6)
    assert grads_triton.keys() == grads_torch.keys() and any("alpha" in k for k in grads_torch)
    for name, grad in grads_torch.items():
        scale = max(grad.abs().max().item(), 1e-12)
        torch.testing.assert_close(grads_triton[name] / scale, grad / scale, rtol=1e-4, atol=1e-5, msg=name)
