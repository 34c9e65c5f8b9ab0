"""The batched part fabrics (``model.batched_parts``, pnfs.model.batched) are the per-part model laid
out differently: same outputs, loss, gradients, BN statistics, state dict, counts and architecture."""

from __future__ import annotations

import json

import pytest
import torch

from pnfs.config import ConfigError, config_to_dict, load_config
from pnfs.engine.checkpoint import atomic_save, new_checkpoint
from pnfs.evaluate.loading import load_for_inference
from pnfs.kernels import weighted_sum_reference
from pnfs.kernels.grouped_weighted_sum import grouped_weighted_sum
from pnfs.loss import pose_loss
from pnfs.model import PoseNFS, build_model
from pnfs.model.batched import BatchedParts
from pnfs.model.pnfs import batched_parts
from pnfs.summary import paper_counts

CONFIG = "mpii_mobilenetv2_p3_256"
TINY = ["model.channels=2", "model.vector_dim=4", "data.input_size=[64, 64]", "model.backbone.weights=none"]
# (P, H): Table I's groupings (P=8 shares shoulders, elbows and knees between parts) and H=2
PARTS = [(1, 1), (3, 1), (3, 2), (5, 1), (8, 1)]


def _config(num_parts: int, hidden_nodes: int, batched: bool, *more: str):
    parts = [
        f"model.num_parts={num_parts}",
        f"model.hidden_nodes={hidden_nodes}",
        f"model.batched_parts={batched}",
    ]
    return load_config(CONFIG, [*TINY, *parts, *more])


def _pair(num_parts: int, hidden_nodes: int = 1) -> tuple[PoseNFS, PoseNFS]:
    """(per-part, batched) with the per-part model's weights and random alphas and betas."""
    per_part = build_model(_config(num_parts, hidden_nodes, False))
    batched = build_model(_config(num_parts, hidden_nodes, True))
    with torch.no_grad():
        for p in per_part.arch_parameters():
            p.normal_()
    batched.load_state_dict(per_part.state_dict())
    assert isinstance(batched.parts, BatchedParts) and not isinstance(per_part.parts, BatchedParts)
    return per_part, batched


def _grads_by_part_key(model: PoseNFS) -> dict[str, torch.Tensor]:
    """The gradients of a model's parameters, keyed and shaped as the per-part model's parameters."""
    holder = model.with_part_layout(model.batched_parts)
    with torch.no_grad():
        for p, q in zip(model.parameters(), holder.parameters()):
            q.copy_(p.grad)
    return holder.state_dict()


def _assert_states_equal(a: dict, b: dict, **tol) -> None:
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], msg=lambda m, key=key: f"{key}: {m}", **tol)


@pytest.mark.parametrize("num_parts, hidden_nodes", PARTS)
def test_training_step_equals_the_per_part_model(num_parts, hidden_nodes):
    """float64, training mode: scores, loss, every gradient and the BN running statistics."""
    per_part, batched = _pair(num_parts, hidden_nodes)
    per_part.double(), batched.double()
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    targets = torch.rand(2, 16, 16, 16, dtype=torch.float64)
    weights = torch.rand(2, 16, dtype=torch.float64)
    results = []
    for model in (per_part, batched):
        scores = model(images)
        loss = pose_loss(scores, targets, weights)
        loss.backward()
        results.append((scores.detach(), loss.detach()))
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-14)
    _assert_states_equal(per_part.state_dict(), batched.state_dict(), rtol=1e-12, atol=1e-14)
    expected, got = _grads_by_part_key(per_part), _grads_by_part_key(batched)
    for name, _ in per_part.named_parameters():
        torch.testing.assert_close(
            got[name], expected[name], rtol=1e-9, atol=1e-14, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("num_parts, hidden_nodes", [(3, 1), (8, 1)])
def test_eval_mode_and_vectors_equal_the_per_part_model(num_parts, hidden_nodes):
    per_part, batched = _pair(num_parts, hidden_nodes)
    images = torch.randn(2, 3, 64, 64)
    per_part(images), batched(images)  # one training step's BN statistics, so eval differs from init
    per_part.eval(), batched.eval()
    with torch.no_grad():
        torch.testing.assert_close(batched(images), per_part(images), rtol=1e-5, atol=1e-6)
        if per_part.vector_joints is not None:
            torch.testing.assert_close(
                batched(images, vectors=True), per_part(images, vectors=True), rtol=1e-5, atol=1e-6
            )
    assert batched.vector_joints == per_part.vector_joints


def test_channels_last_matches_the_per_part_model():
    per_part, batched = _pair(3)
    per_part, batched = (m.to(memory_format=torch.channels_last) for m in (per_part, batched))
    images = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    outputs = []
    for model in (per_part, batched):
        v = model(images, vectors=True)
        v.square().mean().backward()
        outputs.append(v.detach())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    expected, got = _grads_by_part_key(per_part), _grads_by_part_key(batched)
    for name, _ in per_part.named_parameters():
        torch.testing.assert_close(
            got[name], expected[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_bf16_autocast_runs_forward_and_backward():
    _, batched = _pair(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = batched(torch.randn(2, 3, 64, 64), vectors=True)
    assert v.dtype == torch.bfloat16 and v.shape == (2, 16 * 4, 16, 16)
    v.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in batched.parameters())


def test_state_dict_keys_and_tensors_are_the_per_part_models():
    per_part, batched = _pair(8)
    _assert_states_equal(per_part.state_dict(), batched.state_dict(), rtol=0, atol=0)
    back = batched.with_part_layout(False)
    assert not back.batched_parts
    _assert_states_equal(per_part.state_dict(), back.state_dict(), rtol=0, atol=0)
    again = back.with_part_layout(True)
    _assert_states_equal(per_part.state_dict(), again.state_dict(), rtol=0, atol=0)


def test_the_same_seed_builds_the_same_initial_model():
    torch.manual_seed(3)
    per_part = build_model(_config(3, 1, False))
    after_per_part = torch.rand(1)
    torch.manual_seed(3)
    batched = build_model(_config(3, 1, True))
    after_batched = torch.rand(1)
    _assert_states_equal(per_part.state_dict(), batched.state_dict(), rtol=0, atol=0)
    assert torch.equal(after_per_part, after_batched)  # the RNG is where the per-part build leaves it


@pytest.mark.parametrize("save_batched", [False, True])
def test_checkpoints_load_across_layouts_through_load_for_inference(tmp_path, save_batched):
    per_part, batched = _pair(3)
    saver = batched if save_batched else per_part
    cfg = _config(3, 1, save_batched)
    path = atomic_save(
        new_checkpoint(model=saver.state_dict(), config=config_to_dict(cfg)), tmp_path / "c.pt"
    )
    images = torch.randn(2, 3, 64, 64)
    expected = saver.eval()(images)
    for batched_load in (False, True):
        model, _ = load_for_inference(path, overrides=[f"model.batched_parts={batched_load}"])
        assert model.batched_parts is batched_load
        with torch.no_grad():
            torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_other_channels_is_refused_by_name(tmp_path):
    other = build_model(_config(3, 1, False, "model.channels=3"))
    cfg = _config(3, 1, True)
    path = atomic_save(
        new_checkpoint(model=other.state_dict(), config=config_to_dict(cfg)), tmp_path / "c.pt"
    )
    with pytest.raises(ValueError, match=r"parts\.0\.adapters\.0\.weight"):
        load_for_inference(path)


def test_parameter_counts_and_architecture_are_the_per_part_models():
    per_part, batched = _pair(5)
    image = torch.randn(1, 3, 64, 64)
    assert paper_counts(batched, image) == paper_counts(per_part, image)
    assert sum(p.numel() for p in batched.parameters()) == sum(p.numel() for p in per_part.parameters())
    assert sum(p.numel() for p in batched.arch_parameters()) == sum(
        p.numel() for p in per_part.arch_parameters()
    )
    assert json.dumps(batched.architecture()) == json.dumps(per_part.architecture())


def test_batched_parts_switch():
    cfg = _config(3, 1, True)
    assert batched_parts(cfg) is True
    assert batched_parts(load_config(CONFIG, ["model.batched_parts=false"])) is False
    assert batched_parts(load_config(CONFIG, ["train.device=cpu"])) is False  # auto: not on the CPU
    assert batched_parts(load_config(CONFIG, ["train.device=cuda"])) is True  # auto: on CUDA
    with pytest.raises(ConfigError, match=r"model\.batched_parts"):
        load_config(CONFIG, ["model.batched_parts=sometimes"])


def test_grouped_weighted_sum_is_the_per_part_weighted_sum_on_each_block():
    parts, c, k = 3, 5, 4
    inputs = [torch.randn(2, parts * c, 3, 7) for _ in range(k)]
    weights = torch.randn(parts, k)
    for relu in (False, True):
        out = grouped_weighted_sum(inputs, weights, relu=relu)
        for p in range(parts):
            block = [x[:, p * c : (p + 1) * c] for x in inputs]
            assert torch.equal(
                out[:, p * c : (p + 1) * c], weighted_sum_reference(block, weights[p], relu=relu)
            )


def test_grouped_weighted_sum_refuses_mismatched_weights():
    inputs = [torch.randn(1, 6, 2, 2)] * 2
    with pytest.raises(ValueError, match="2 inputs but weights of shape"):
        grouped_weighted_sum(inputs, torch.ones(3, 3))
    with pytest.raises(ValueError, match="6 channels do not split into 4 parts"):
        grouped_weighted_sum(inputs, torch.ones(4, 2))


def test_walking_batched_parts_one_by_one_names_the_conversion():
    _, batched = _pair(3)
    with pytest.raises(TypeError, match=r"with_part_layout\(False\)"):
        list(batched.parts)
    assert len(list(batched.with_part_layout(False).parts)) == 3
