"""bf16 under CUDA's autocast policy, on the CPU: the model, the training loss, training and evaluation.

The first bf16 run on an H200 crashed in its first forward (docs/design.md §3): CUDA autocast
returns fp32 from bilinear up-sampling, so an input node's weighted sum got bf16 and fp32 inputs,
while CPU autocast keeps up-sampling in bf16 and the CPU tests passed. Here
:func:`kernel_cases.cuda_autocast_policy` gives CPU autocast CUDA's fp32 list, so the same mix
reaches the kernels on the CPU: with the references (normal pass) and with the Triton kernels
under the interpreter (``interpret`` pass), forward and backward.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from pnfs.config import load_config
from pnfs.model import build_model
from pnfs.model.cell import Downsample, Upsample
from tests.support.kernel_cases import cuda_autocast_policy, triton_for_interpreter_cases  # noqa: F401  (autouse fixture)

BF16, F32 = torch.bfloat16, torch.float32
# the demo preset as it trains (128x96) with the references; smaller under the interpreter
DEMO = {"torch": [], "triton": ["data.input_size=[64,32]", "model.num_parts=1"]}
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpret)]


def cpu_bf16():
    return torch.autocast("cpu", dtype=BF16)


def test_the_emulation_gives_cpu_autocast_cudas_dtypes():
    torch.manual_seed(0)
    up, down = Upsample(4, 2), Downsample(1, 2)
    coarse, fine = torch.randn(1, 4, 3, 5), torch.randn(1, 1, 12, 20)
    with cpu_bf16():
        assert up(coarse).dtype == BF16  # CPU autocast's own policy: why CPU runs never crashed
        with cuda_autocast_policy():
            assert up(coarse).dtype == F32 and down(fine).dtype == BF16  # the H200's input node
            x = torch.randn(2, 3).to(BF16)
            assert torch.softmax(x, 0).dtype == F32 and x.sum().dtype == F32 and x.square().dtype == F32
            assert x.sum(dtype=BF16).dtype == BF16 and (x @ x.T).dtype == BF16
        assert up(coarse).dtype == BF16  # the registration ends with the block
    with cuda_autocast_policy():
        x = coarse.to(BF16)
        assert (
            torch.nn.functional.interpolate(x, scale_factor=2.0, mode="bilinear").dtype == BF16
        )  # no autocast


def _demo_model(backend: str, monkeypatch, *more: str) -> tuple[torch.nn.Module, torch.Tensor]:
    monkeypatch.setenv("PNFS_KERNELS", backend)
    cfg = load_config("demo", [*DEMO[backend], *more])
    torch.manual_seed(0)
    model = build_model(cfg).train().to(memory_format=torch.channels_last)
    h, w = cfg.data.input_size
    images = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    return model, images.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "backend, layout",
    [
        ("torch", "model.batched_parts=false"),
        ("torch", "model.batched_parts=true"),
        pytest.param("triton", "model.batched_parts=false", marks=pytest.mark.interpret),
    ],
)
def test_posenfs_forward_and_backward_under_cudas_autocast_policy(backend, layout, monkeypatch):
    """The demo PoseNFS in channels_last, as ``train.amp=bf16`` runs it on a GPU: bf16 scores close
    to the fp32 model's, finite gradients for every weight, alpha and beta. On a GPU
    ``model.batched_parts=auto`` batches the parts, so that layout meets CUDA's policy too."""
    model, images = _demo_model(backend, monkeypatch, layout)
    fp32_scores = model(images)
    fp32_scores.square().mean().backward()
    fp32_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    fp32_scores = fp32_scores.detach()
    model.zero_grad(set_to_none=True)
    with cpu_bf16(), cuda_autocast_policy():
        scores = model(images)
        loss = scores.float().square().mean()
    loss.backward()
    assert scores.dtype == BF16 and scores.shape == fp32_scores.shape
    assert (scores.float() - fp32_scores).abs().max() < 0.05  # scores in [0, 1), bf16 convolutions
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing and any("alpha" in n for n, _ in model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    # the bf16 gradient points where the fp32 one does: every weight, alpha and beta together
    bf16_all = torch.cat([p.grad.flatten().double() for _, p in model.named_parameters()])
    fp32_all = torch.cat([fp32_grads[name].flatten().double() for name, _ in model.named_parameters()])
    assert torch.nn.functional.cosine_similarity(bf16_all, fp32_all, dim=0) > 0.98
    assert math.isclose(bf16_all.norm().item(), fp32_all.norm().item(), rel_tol=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_fused_training_loss_under_cudas_autocast_policy(backend, monkeypatch):
    """``batch_loss`` as the engine calls it with ``train.amp=bf16`` and channels_last: the model's
    bf16 vectors into ``squash_mse_loss`` with fp32 targets, fp32 loss close to the fp32 one."""
    from pnfs.loss import batch_loss, loss_setup
    from tests.engine.test_step import random_batch, tiny

    monkeypatch.setenv("PNFS_KERNELS", backend)
    cfg, model = tiny("model.vector_dim=4")
    batch = random_batch(cfg, n=2)
    fp32 = batch_loss(model, batch, loss_setup(model, cfg.data.sigma, torch.device("cpu"), None, True))
    fp32.backward()
    fp32_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    setup = loss_setup(model, cfg.data.sigma, torch.device("cpu"), BF16, True)
    assert setup.vector_joints is not None  # the fused path
    with cuda_autocast_policy():
        loss = batch_loss(model, batch, setup)
    loss.backward()
    assert loss.dtype == F32 and math.isclose(loss.item(), fp32.item(), rel_tol=0.05)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    bf16_all = torch.cat([p.grad.flatten().double() for p in model.parameters()])
    fp32_all = torch.cat([g.flatten().double() for g in fp32_grads])
    assert torch.nn.functional.cosine_similarity(bf16_all, fp32_all, dim=0) > 0.9  # bf16 vectors: 0.96 seen
    assert math.isclose(bf16_all.norm().item(), fp32_all.norm().item(), rel_tol=0.1)


def test_training_and_evaluation_with_bf16_amp_through_the_config(tmp_path, tmp_path_factory, monkeypatch):
    """``train.amp=bf16 eval.amp=bf16`` on the CPU under CUDA's policy: two steps, then the
    evaluation, both through the engine. Training's input nodes saw the H200's bf16/fp32 mix;
    evaluation (the frozen model: its input nodes are plain sums) ran the head's squash under
    bf16 autocast."""
    import pnfs.inference
    import pnfs.model.cell as cell
    import pnfs.model.pnfs as pnfs_model
    from pnfs.engine.trainer import run_training
    from tests.support.engine import TINY_OVERRIDES, tiny_dataset

    monkeypatch.setattr(pnfs.inference, "bf16_supported", lambda device: True)  # CI CPUs may lack it
    seen = set()  # (kernel, grad enabled, autocast enabled, input dtypes)

    def recording(name, kernel):
        def call(tensors, *args, **kwargs):
            dtypes = tuple(x.dtype for x in tensors) if isinstance(tensors, list) else (tensors.dtype,)
            seen.add((name, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), dtypes))
            return kernel(tensors, *args, **kwargs)

        return call

    monkeypatch.setattr(cell, "weighted_sum", recording("weighted_sum", cell.weighted_sum))
    monkeypatch.setattr(pnfs_model, "squash_score", recording("squash_score", pnfs_model.squash_score))
    tiny = tiny_dataset(tmp_path_factory)
    overrides = [
        *TINY_OVERRIDES,
        *tiny["overrides"],
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
        "train.eval_every=1",
        "train.amp=bf16",
        "eval.amp=bf16",
        "data.num_workers=0",
        f"train.out_dir={tmp_path}",
    ]
    with cuda_autocast_policy():
        result = run_training(load_config(None, overrides))
    assert result["global_step"] == 2 and result["skipped_steps"] == 0
    assert math.isfinite(result["metrics"]["score"]) and 0.0 <= result["metrics"]["score"] <= 1.0
    val_manifest = json.loads((tiny["shards"] / "val" / "manifest.json").read_text())
    val_people = sum(s["samples"] for split in val_manifest["splits"].values() for s in split["shards"])
    assert result["metrics"]["num_samples"] == val_people  # every val person decoded once under bf16
    mixed = (BF16, BF16, F32)  # finer (conv), same (conv), coarser (up-sampled: fp32)
    assert ("weighted_sum", True, True, mixed) in seen  # training
    assert ("squash_score", False, True, (BF16,)) in seen  # evaluation


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_posenfs_under_cuda_autocast_on_a_gpu(backend, monkeypatch):
    """The same forward/backward under CUDA's own bf16 autocast: what crashed on the H200."""
    model, images = _demo_model("torch", monkeypatch)
    monkeypatch.setenv("PNFS_KERNELS", backend)
    model, images = model.cuda(), images.cuda()
    with torch.autocast("cuda", dtype=BF16):
        scores = model(images)
    scores.float().square().mean().backward()
    assert scores.dtype == BF16 and torch.isfinite(scores).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
