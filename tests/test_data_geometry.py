"""Crop geometry and Gaussian targets: the pixel convention, numpy == torch, targets exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pnfs.data.geometry import (
    Augment,
    box_to_region,
    compose,
    flip_joints,
    input_affines,
    invert,
    reachable_region,
    region_to_input,
    transform_points,
)
from pnfs.data.targets import gaussian_targets
from pnfs.keypoints import COCO


def test_region_keeps_aspect_and_adds_margin():
    centre, size = box_to_region(np.array([10.0, 20.0, 50.0, 200.0]), aspect=0.75, margin=1.25)
    np.testing.assert_allclose(centre, [35.0, 120.0])
    np.testing.assert_allclose(size, [150 * 1.25, 200 * 1.25])  # widened to 3:4, then margin


def test_region_edges_land_on_input_pixel_edges():
    centre, size = np.array([100.0, 50.0]), np.array([64.0, 64.0])
    m = region_to_input(centre, size, (32, 32))
    corners = np.array([[68.0, 18.0], [132.0, 82.0], [100.0, 50.0]])
    np.testing.assert_allclose(transform_points(m, corners), [[-0.5, -0.5], [31.5, 31.5], [15.5, 15.5]])


def test_flip_mirrors_about_the_input_centre_and_rotation_about_the_box_centre():
    centre, size = np.array([100.0, 50.0]), np.array([64.0, 64.0])
    plain = region_to_input(centre, size, (32, 48))
    flipped = region_to_input(centre, size, (32, 48), flip=True)
    p = np.array([[90.0, 40.0]])
    a, b = transform_points(plain, p), transform_points(flipped, p)
    np.testing.assert_allclose(b[:, 0], 47 - a[:, 0])
    np.testing.assert_allclose(b[:, 1], a[:, 1])
    rotated = region_to_input(centre, size, (32, 48), rotation=90.0)
    np.testing.assert_allclose(transform_points(rotated, centre[None]), [[23.5, 15.5]], atol=1e-9)
    # +90 degrees: a point right of the centre goes below it (clockwise on screen)
    right = transform_points(rotated, np.array([[110.0, 50.0]]))
    assert right[0, 1] > 15.5 + 1 and abs(right[0, 0] - 23.5) < 1e-9


def test_numpy_and_torch_give_the_same_matrices():
    rng = np.random.default_rng(0)
    bbox = rng.uniform(10, 100, (5, 4))
    c2i = np.tile(np.array([[1.0, 0, 3], [0, 1.0, 7]]), (5, 1, 1))
    aug = Augment.sample(rng, 5)
    a_np, b_np = input_affines(bbox, c2i, (64, 48), aug)
    a_t, b_t = input_affines(torch.from_numpy(bbox), torch.from_numpy(c2i), (64, 48), aug)
    np.testing.assert_allclose(a_t.numpy(), a_np, atol=1e-10)
    np.testing.assert_allclose(b_t.numpy(), b_np, atol=1e-10)
    np.testing.assert_allclose(
        compose(invert(a_np), a_np)[:, :, :2], np.tile(np.eye(2), (5, 1, 1)), atol=1e-10
    )


def test_flip_joints_swaps_left_and_right_only_where_flipped():
    kp = np.arange(2 * 17 * 3, dtype=float).reshape(2, 17, 3)
    out = flip_joints(kp, COCO.flip_permutation(), np.array([True, False]))
    np.testing.assert_array_equal(out[0, 5], kp[0, 6])
    np.testing.assert_array_equal(out[0, 0], kp[0, 0])
    np.testing.assert_array_equal(out[1], kp[1])


def test_reachable_region_covers_every_augmented_input():
    bbox = np.array([40.0, 30.0, 60.0, 120.0])
    x0, y0, x1, y1 = reachable_region(bbox, 1.25, 1.3, aspects=(0.75, 4.0 / 3.0))
    rng = np.random.default_rng(1)
    for aspect_hw in [(256, 192), (256, 256), (192, 256)]:
        aug = Augment.sample(rng, 50)
        _, to_image = input_affines(
            bbox[None].repeat(50, 0), np.tile(np.eye(2, 3), (50, 1, 1)), aspect_hw, aug
        )
        h, w = aspect_hw
        corners = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [-0.5, h - 0.5], [w - 0.5, h - 0.5]])
        pts = transform_points(to_image, np.broadcast_to(corners, (50, 4, 2)))
        assert pts[..., 0].min() >= x0 - 1e-6 and pts[..., 0].max() <= x1 + 1e-6
        assert pts[..., 1].min() >= y0 - 1e-6 and pts[..., 1].max() <= y1 + 1e-6


def _reference_targets(kp, h, w, sigma, stride):
    """Per-joint loop, as the HRNet lineage does it (but with the unrounded centre)."""
    n, k, _ = kp.shape
    t = np.zeros((n, k, h, w), np.float32)
    wt = np.zeros((n, k), np.float32)
    ys, xs = np.mgrid[0:h, 0:w]
    for i in range(n):
        for j in range(k):
            u, v = kp[i, j, 0] / stride, kp[i, j, 1] / stride
            if kp[i, j, 2] > 0 and -0.5 <= u < w - 0.5 and -0.5 <= v < h - 0.5:
                wt[i, j] = 1
                t[i, j] = np.exp(-((xs - u) ** 2 + (ys - v) ** 2) / (2 * sigma**2))
    return t, wt


def test_targets_match_a_per_joint_reference_and_peak_at_the_exact_position():
    rng = np.random.default_rng(0)
    kp = np.concatenate([rng.uniform(-20, 270, (3, 17, 2)), rng.integers(0, 2, (3, 17, 1))], -1)
    kp[0, 0] = [100.0, 60.0, 1.0]  # u = 25, v = 15 exactly
    targets, weights = gaussian_targets(torch.from_numpy(kp), (64, 64), sigma=2.0, stride=4)
    ref_t, ref_w = _reference_targets(kp, 64, 64, 2.0, 4)
    assert targets.dtype == torch.float32 and targets.shape == (3, 17, 64, 64)
    np.testing.assert_allclose(targets.numpy(), ref_t, atol=1e-6)
    np.testing.assert_array_equal(weights.numpy(), ref_w)
    assert targets[0, 0, 15, 25] == 1.0 and targets[0, 0].argmax() == 15 * 64 + 25


def test_targets_peak_between_pixels_is_symmetric():
    kp = torch.tensor([[[42.0, 40.0, 1.0]]])  # u = 10.5
    t, _ = gaussian_targets(kp, (32, 32))
    assert torch.isclose(t[0, 0, 10, 10], t[0, 0, 10, 11])


@pytest.mark.parametrize(
    "bad", [[float("nan"), 5.0, 1.0], [-30.0, 5.0, 1.0], [5.0, 300.0, 1.0], [5.0, 5.0, 0.0]]
)
def test_targets_weight_zero_for_unlabelled_or_off_map_joints(bad):
    t, w = gaussian_targets(torch.tensor([[bad]]), (64, 48))
    assert w.item() == 0 and t.abs().sum() == 0 and torch.isfinite(t).all()
