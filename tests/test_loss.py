"""pnfs.loss against hand-computed numbers (paper §III-D):

    loss = mean_{n,j} 0.5 * w_nj * mean_{h,w} (score_njhw - target_njhw)^2

on the score path and on the vector path (score = |v|^2 / (1 + |v|^2)), and what batch_loss
hands the loss: targets of the batch's keypoints in the vectors' joint order, on the device.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pnfs.data.batch import PoseBatch
from pnfs.data.targets import gaussian_targets
from pnfs.loss import JointVectors, batch_loss, loss_setup, pose_loss


def test_score_path_loss_by_hand():
    # joint 0: errors (0.5, 0) -> mean 0.125, weight 1; joint 1: errors (1, 1) -> mean 1, weight 0;
    # sample 1: errors (0.2, 0.4) -> 0.1, and (0, 0) -> 0, both weight 1
    scores = torch.tensor([[[[0.5, 0.0]], [[1.0, 1.0]]], [[[0.2, 0.4]], [[0.0, 0.0]]]])
    targets = torch.zeros_like(scores)
    weights = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    loss = pose_loss(scores, targets, weights)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(0.5 * (0.125 + 0.0 + 0.1 + 0.0) / 4, rel=1e-6)


def test_score_path_counts_the_difference_not_the_scores():
    scores = torch.full((1, 1, 2, 2), 0.75)
    targets = torch.tensor([[[[0.75, 0.25], [0.75, 0.75]]]])
    loss = pose_loss(scores, targets, torch.ones(1, 1))
    assert loss.item() == pytest.approx(0.5 * 0.25 / 4, rel=1e-6)  # one pixel off by 0.5


def test_score_path_in_half_precision_is_computed_in_fp32():
    scores = torch.tensor([[[[0.5, 0.0]]]], dtype=torch.bfloat16)
    loss = pose_loss(scores, torch.zeros(1, 1, 1, 2, dtype=torch.bfloat16), torch.ones(1, 1))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(0.5 * 0.125, rel=1e-6)


def test_vector_path_loss_by_hand():
    # d = 2: pixel 0 has |v|^2 = 1 (score 0.5), pixel 1 has |v|^2 = 3^2 + 0 = 9 (score 0.9)
    vectors = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]]])  # [1, 1*2, 1, 2]
    targets = torch.tensor([[[[0.0, 1.0]]]])
    loss = pose_loss(JointVectors(vectors, 2), targets, torch.ones(1, 1))
    want = 0.5 * (0.5**2 + 0.1**2) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize(
    ("scores", "targets", "weights", "message"),
    [
        ((1, 2, 3, 4), (1, 2, 3, 5), (1, 2), r"scores \(1, 2, 3, 4\) vs targets \(1, 2, 3, 5\)"),
        ((1, 2, 3, 4), (1, 2, 3, 4), (1, 3), r"weights \(1, 3\) vs scores \(1, 2, 3, 4\)"),
        ((1, 2, 3, 4), (1, 2, 3, 4), (2, 2), r"weights \(2, 2\) vs scores"),
    ],
)
def test_score_path_shape_mismatch_is_named(scores, targets, weights, message):
    with pytest.raises(ValueError, match=rf"pose_loss: {message}"):
        pose_loss(torch.zeros(scores), torch.zeros(targets), torch.zeros(weights))


class VectorHead(nn.Module):
    """A stand-in for PoseNFS: three joints predicted as (joint 2, joint 0) by fixed vectors."""

    vector_joints = (2, 0)
    vector_dim = 1

    def __init__(self, h: int = 4, w: int = 3):
        super().__init__()
        self.vectors = nn.Parameter(torch.arange(2 * h * w, dtype=torch.float32).reshape(1, 2, h, w) / 10)
        self.scores = nn.Parameter(torch.linspace(0, 1, 3 * h * w).reshape(1, 3, h, w))
        self.calls: list[dict] = []

    def forward(self, images: torch.Tensor, vectors: bool = False) -> torch.Tensor:
        self.calls.append({"vectors": vectors, "channels_last": images.is_contiguous(
            memory_format=torch.channels_last) and not images.is_contiguous()})  # fmt: skip
        n = images.shape[0]
        return (self.vectors if vectors else self.scores).expand(n, -1, -1, -1)


def _batch() -> PoseBatch:
    kp = torch.tensor([[[4.0, 8.0, 1.0], [6.0, 2.0, 0.0], [9.0, 13.0, 1.0]]])
    return PoseBatch(
        image=torch.zeros(1, 3, 16, 12),
        keypoints=kp,
        affine=torch.eye(2, 3)[None],
        image_id=torch.zeros(1, dtype=torch.long),
        ann_id=torch.zeros(1, dtype=torch.long),
        score=torch.ones(1),
    )


def test_loss_setup_takes_the_models_vector_joints():
    setup = loss_setup(VectorHead(), 1.5, torch.device("cpu"), torch.bfloat16, True)
    assert setup.vector_joints.tolist() == [2, 0] and setup.vector_dim == 1 and setup.sigma == 1.5
    assert setup.autocast == torch.bfloat16 and setup.channels_last
    model = VectorHead()
    model.vector_joints = None  # P=8: shared joints, the score path
    assert loss_setup(model, 2.0, torch.device("cpu"), None, False).vector_joints is None


def test_batch_loss_on_the_vector_path_puts_keypoints_in_the_vectors_joint_order():
    model, batch, seen = VectorHead(), _batch(), {}

    def record(prediction, targets, weights):
        seen.update(prediction=prediction, targets=targets, weights=weights)
        return pose_loss(prediction, targets, weights)

    setup = loss_setup(model, 1.5, torch.device("cpu"), None, False)
    loss = batch_loss(model, batch, setup, record)
    want_t, want_w = gaussian_targets(batch.keypoints[:, [2, 0]], (4, 3), 1.5)
    assert isinstance(seen["prediction"], JointVectors) and seen["prediction"].d == 1
    torch.testing.assert_close(seen["targets"], want_t, rtol=0, atol=0)
    assert seen["weights"].tolist() == want_w.tolist() == [[1.0, 1.0]]
    assert model.calls == [{"vectors": True, "channels_last": False}]
    n2 = model.vectors.detach().square()
    by_hand = (0.5 * (n2 / (1 + n2) - want_t).square().mean(dim=(2, 3))).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_batch_loss_on_the_score_path_uses_every_joint_in_order():
    model, batch = VectorHead(), _batch()
    model.vector_joints = None
    setup = loss_setup(model, 2.0, torch.device("cpu"), None, True)
    loss = batch_loss(model, batch, setup)
    targets, weights = gaussian_targets(batch.keypoints, (4, 3), 2.0)
    assert weights.tolist() == [[1.0, 0.0, 1.0]]
    by_hand = (0.5 * weights * (model.scores.detach() - targets).square().mean(dim=(2, 3))).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert model.calls == [{"vectors": False, "channels_last": True}]


class ImageHead(nn.Module):
    """A stand-in whose output is made from the images (so it lives on their device) and
    which records the autocast state its forward ran under."""

    vector_joints = (2, 0)
    vector_dim = 1

    def __init__(self):
        super().__init__()
        self.autocast: list[tuple[bool, torch.dtype]] = []

    def forward(self, images: torch.Tensor, vectors: bool = False) -> torch.Tensor:
        self.autocast.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return images[:, :2, ::4, ::4].float()


def test_batch_loss_moves_images_and_keypoints_to_the_setups_device():
    model = ImageHead()
    loss = batch_loss(model, _batch(), loss_setup(model, 2.0, torch.device("meta"), None, False))
    assert loss.device.type == "meta"  # a CPU batch on a "meta" setup: every tensor was moved


def test_batch_loss_runs_the_forward_under_the_setups_autocast():
    model = ImageHead()
    batch_loss(model, _batch(), loss_setup(model, 2.0, torch.device("cpu"), torch.bfloat16, False))
    batch_loss(model, _batch(), loss_setup(model, 2.0, torch.device("cpu"), None, False))
    assert model.autocast[0] == (True, torch.bfloat16) and model.autocast[1][0] is False
    batch_loss(model, _batch(), loss_setup(model, 2.0, torch.device("cpu"), torch.float16, False))
    assert model.autocast[2] == (True, torch.float16)  # the setup's dtype, not autocast's default


def test_loss_setup_puts_the_joint_order_on_the_device():
    assert loss_setup(ImageHead(), 2.0, torch.device("meta"), None, False).vector_joints.device.type == "meta"
