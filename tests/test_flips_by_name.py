"""Left/right flips checked against the joints' names, never against the permutation under test.

The expected partner of a joint comes from its name alone: ``left_X`` <-> ``right_X``, every
other joint maps to itself. Each joint set's ``flip_pairs`` must agree; a real sample cropped
with and without the flip augmentation gives the mirror image with left and right swapped (pixels,
keypoints, targets); and the flip test of inference equals the average of the two passes done
by hand.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from pnfs.data.annotations.coco import read_coco_persons
from pnfs.data.annotations.mpii import read_mpii_persons
from pnfs.data.annotations.records import SkipReport
from pnfs.data.geometry import Augment
from pnfs.data.loaders.assemble import batch_geometry
from pnfs.data.loaders.torch_loader import warp_crops
from pnfs.data.shards.reader import SampleMeta
from pnfs.inference import predict_scores
from pnfs.keypoints import COCO, JOINT_SETS, MPII, MPII_FROM_RAW, JointSet

SIDES = (("left_", "right_"), ("right_", "left_"))
INPUT = (128, 96)  # H, W
STRIDE = 4


def partner_by_name(name: str) -> str:
    for side, other in SIDES:
        if name.startswith(side):
            return other + name[len(side) :]
    return name


def permutation_by_name(joints: JointSet) -> list[int]:
    index = {name: i for i, name in enumerate(joints.joints)}
    return [index[partner_by_name(name)] for name in joints.joints]


@pytest.mark.parametrize("joints", list(JOINT_SETS.values()), ids=list(JOINT_SETS))
def test_flip_pairs_are_the_left_right_twins_of_the_joint_names(joints):
    # the name rule only sees "left_"/"right_": a set spelling sides otherwise must not slip past it
    for name in joints.joints:
        assert not name.startswith(("l_", "r_", "left ", "right ", "L_", "R_")), name
    by_name = permutation_by_name(joints)
    expected = {tuple(sorted((i, p))) for i, p in enumerate(by_name) if i != p}
    assert {tuple(sorted(pair)) for pair in joints.flip_pairs} == expected
    assert len(joints.flip_pairs) == len(expected)
    assert joints.flip_permutation() == by_name


def test_mpii_raw_order_maps_onto_our_names():
    # MPII's own order (joint ids 0..15 of the MPII annotation format, HRNet's json)
    raw = [
        "r_ankle",
        "r_knee",
        "r_hip",
        "l_hip",
        "l_knee",
        "l_ankle",
        "pelvis",
        "thorax",
        "upper_neck",
        "head_top",
        "r_wrist",
        "r_elbow",
        "r_shoulder",
        "l_shoulder",
        "l_elbow",
        "l_wrist",
    ]
    spelled_out = [n.replace("r_", "right_", 1) if n.startswith("r_") else n for n in raw]
    spelled_out = [n.replace("l_", "left_", 1) if n.startswith("l_") else n for n in spelled_out]
    assert tuple(spelled_out[i] for i in MPII_FROM_RAW) == MPII.joints


def _real_people(shared_data, joints: JointSet):
    """(photo RGB, PersonRecord) for every person of the shared sample with >= 4 labelled joints."""
    if joints is COCO:
        root = shared_data / "coco_sample"
        people = read_coco_persons(root / "test_coco.json", SkipReport(), SkipReport())
    else:
        root = shared_data / "mpii_sample"
        people = read_mpii_persons(root / "test_mpii.json", SkipReport())
    photos = {}
    out = []
    for person in people:
        if (person.keypoints[:, 2] > 0).sum() < 4:
            continue
        if person.image_file not in photos:
            photos[person.image_file] = cv2.cvtColor(
                cv2.imread(str(root / person.image_file)), cv2.COLOR_BGR2RGB
            )
        out.append((photos[person.image_file], person))
    assert out, f"no labelled person in {root}"
    return out


def _sample(photo, person, joints: JointSet, flip: bool):
    """The loader's geometry and pixels for one person: (input RGB [H, W, 3], keypoints [K, 3])."""
    meta = SampleMeta(
        keypoints=person.keypoints[None],
        bbox=person.bbox[None],
        crop_to_image=np.eye(2, 3)[None],  # the whole photo stands for the crop
        score=np.ones(1),
        ids=np.zeros((1, 2), np.int64),
    )
    aug = Augment(np.array([1.1]), np.array([17.0]), np.array([flip]))
    crop_to_input, _, keypoints = batch_geometry(meta, aug, INPUT, 1.25, joints.flip_permutation())
    return warp_crops([photo], crop_to_input, INPUT)[0], keypoints[0]


def _mirrored_targets(keypoints: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """float64 Gaussian maps [K, h, w] of the *plain* sample's joints, mirrored and swapped by name."""
    h, w = INPUT[0] // STRIDE, INPUT[1] // STRIDE
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.zeros((len(keypoints), h, w))
    for j, (x, y, weight) in enumerate(keypoints):
        u, v = (INPUT[1] - 1 - x) / STRIDE, y / STRIDE  # mirrored about the input centre x = (W-1)/2
        if weight > 0 and -0.5 <= u < w - 0.5 and -0.5 <= v < h - 0.5:
            out[j] = np.exp(-((xs - u) ** 2 + (ys - v) ** 2) / (2 * sigma**2))
    return out


@pytest.mark.parametrize("joints", [COCO, MPII], ids=["coco", "mpii"])
def test_a_flipped_real_sample_is_the_mirror_with_left_and_right_swapped(shared_data, joints):
    from pnfs.data.targets import gaussian_targets

    by_name = permutation_by_name(joints)
    swapped_joints = 0
    for photo, person in _real_people(shared_data, joints):
        plain_image, plain = _sample(photo, person, joints, flip=False)
        flipped_image, flipped = _sample(photo, person, joints, flip=True)
        # pixels: the mirror image (bilinear weights are quantised, so a level or two apart)
        diff = np.abs(flipped_image.astype(int) - plain_image[:, ::-1].astype(int))
        assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())
        # keypoints: joint j of the flipped sample is joint by_name[j] of the plain one, mirrored
        source = plain[by_name]
        np.testing.assert_allclose(flipped[:, 0], np.where(source[:, 2] > 0, INPUT[1] - 1 - source[:, 0], 0))
        np.testing.assert_allclose(flipped[:, 1:], source[:, 1:], atol=1e-9)
        swapped_joints += int(((source[:, 2] > 0) & (np.arange(len(by_name)) != by_name)).sum())
        # targets: the plain joints' Gaussians mirrored, with left and right swapped
        targets, _ = gaussian_targets(
            torch.from_numpy(flipped[None]), (INPUT[0] // STRIDE, INPUT[1] // STRIDE)
        )
        np.testing.assert_allclose(targets[0].numpy(), _mirrored_targets(source), atol=1e-6)
    assert swapped_joints >= 8  # the sample really exercises left/right joints


class _LopsidedNet(torch.nn.Module):
    """A fixed random conv net, [N, 3, H, W] -> [N, K, H/4, W/4]: nothing in it is mirror-symmetric."""

    def __init__(self, num_joints: int):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.conv1 = torch.nn.Conv2d(3, 8, 5, stride=2, padding=2)
        self.conv2 = torch.nn.Conv2d(8, num_joints, 3, stride=2, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        return self.conv2(torch.tanh(self.conv1(x)))


@pytest.mark.parametrize("joints", [COCO, MPII], ids=["coco", "mpii"])
def test_flip_test_is_the_average_of_the_two_passes_done_by_hand(joints):
    net = _LopsidedNet(joints.num_joints).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 32, 24, generator=g)
    images[..., :8] += 1.0  # a bright left side: the input is not its own mirror
    width = images.shape[-1]
    # by hand: out[..., x] = images[..., W - s - x]; the s - 1 columns past the end repeat column 0
    mirrored = torch.empty_like(images)
    for x in range(width):
        mirrored[..., x] = images[..., max(width - STRIDE - x, 0)]
    with torch.no_grad():
        plain, mirror_scores = net(images), net(mirrored)
    by_name = permutation_by_name(joints)
    w = plain.shape[-1]
    unmirrored = torch.empty_like(plain)
    for j in range(joints.num_joints):
        for u in range(w):
            unmirrored[:, j, :, u] = mirror_scores[:, by_name[j], :, w - 1 - u]
    expected = 0.5 * (plain + unmirrored)
    assert (expected - plain).abs().max() > 0.1  # the mirrored pass changes the answer
    with torch.no_grad():
        got = predict_scores(net, images, joints.flip_permutation())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
