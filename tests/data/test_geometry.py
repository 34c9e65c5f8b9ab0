"""pnfs.data.geometry and pnfs.data.targets: the pixel convention, numpy == torch, targets exact;
then the geometry against matrices and regions worked out by hand (module docstring:
M = Flip · T(c_in) · R(rotation) · S(W / (region_w · scale)) · T(-c_box)), the defaults the
loaders rely on (margin 1.25, rotation ±45°, flip probability 0.5), and numpy in -> numpy out,
torch in -> torch out, in the input's dtype."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pnfs.data import geometry as G
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


# --- by hand (was tests/test_geometry_values.py) ---


def test_box_to_region_default_margin_is_1_25():
    centre, size = G.box_to_region(np.array([10.0, 20.0, 30.0, 80.0]), 0.75)
    np.testing.assert_allclose(centre, [25.0, 60.0])
    np.testing.assert_allclose(size, [60.0 * 1.25, 80.0 * 1.25])  # widened to 0.75 * 80 = 60


def test_region_to_input_scales_by_the_region_width_and_centres_it():
    # region 100 wide, 200 high onto a 48 x 64 (W x H) input: k = 48 / 100 input px per px
    m = G.region_to_input(np.array([50.0, 0.0]), np.array([100.0, 200.0]), (64, 48))
    k = 0.48
    np.testing.assert_allclose(m, [[k, 0.0, 23.5 - k * 50.0], [0.0, k, 31.5]], atol=1e-12)


def test_region_to_input_rotation_and_scale_by_hand():
    # 90 degrees, scale 2 (more context): k = 48 / (100 * 2); R = [[0, -k], [k, 0]]
    m = G.region_to_input(np.array([0.0, 10.0]), np.array([100.0, 200.0]), (64, 48), scale=2.0, rotation=90.0)
    k = 0.24
    np.testing.assert_allclose(m, [[0.0, -k, 23.5 + k * 10.0], [k, 0.0, 31.5]], atol=1e-12)


def test_region_to_input_flip_mirrors_about_the_inputs_centre_line():
    centre, size = np.array([[0.0, 0.0]]), np.array([[48.0, 64.0]])
    plain = G.region_to_input(centre, size, (64, 48))
    flipped = G.region_to_input(centre, size, (64, 48), flip=np.array([True]))
    np.testing.assert_allclose(flipped[:, 0], [[-1.0, 0.0, 47.0 - 23.5]])
    np.testing.assert_allclose(flipped[:, 1], plain[:, 1])


def test_compose_of_translations_adds_them():
    a = np.array([[1.0, 0.0, 3.0], [0.0, 1.0, -2.0]])
    b = np.array([[2.0, 0.0, 5.0], [0.0, 2.0, 7.0]])
    np.testing.assert_allclose(G.compose(a, b), [[2.0, 0.0, 8.0], [0.0, 2.0, 5.0]])
    np.testing.assert_allclose(G.to_3x3(a)[2], [0.0, 0.0, 1.0])


def test_invert_of_one_unbatched_affine():
    m = np.array([[0.0, -2.0, 4.0], [2.0, 0.0, -6.0]])
    inv = G.invert(m)
    np.testing.assert_allclose(inv, [[0.0, 0.5, 3.0], [-0.5, 0.0, 2.0]])
    np.testing.assert_allclose(G.compose(inv, m), np.eye(2, 3), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_in_torch_out_in_the_inputs_dtype(dtype):
    centre, size = torch.tensor([[5.0, 6.0]], dtype=dtype), torch.tensor([[40.0, 40.0]], dtype=dtype)
    m = G.region_to_input(centre, size, (32, 32), scale=1.1, rotation=10.0, flip=torch.tensor([True]))
    assert isinstance(m, torch.Tensor) and m.dtype == dtype
    for out in (
        G.to_3x3(m),
        G.compose(m, m),
        G.invert(m),
        G.transform_points(m, torch.zeros(1, 3, 2, dtype=dtype)),
    ):
        assert isinstance(out, torch.Tensor) and out.dtype == dtype
    kp = torch.arange(12, dtype=dtype).reshape(1, 4, 3)
    flipped = G.flip_joints(kp, [1, 0, 3, 2], torch.tensor([True]))
    assert isinstance(flipped, torch.Tensor) and flipped[0, :, 0].tolist() == [3.0, 0.0, 9.0, 6.0]


def test_torch_float64_equals_numpy_float64():
    # python-float scale and rotation are taken in float64 too (a float32 1.1 is off by 2e-8)
    args = ((32, 48), 1.1, 10.0, True)
    want = G.region_to_input(np.array([5.0, 6.0]), np.array([40.0, 30.0]), *args)
    got = G.region_to_input(
        torch.tensor([5.0, 6.0], dtype=torch.float64), torch.tensor([40.0, 30.0], dtype=torch.float64), *args
    )
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-14, atol=1e-14)


def test_numpy_float32_stays_float32():
    m = G.region_to_input(np.zeros(2, np.float32), np.full(2, 40.0, np.float32), (32, 32), 1.2, 30.0, True)
    assert isinstance(m, np.ndarray) and m.dtype == np.float32


def test_inside_image_uses_the_pixel_edges():
    points = np.array(
        [
            [-0.5, 0.0],
            [-0.51, 0.0],
            [9.49, 0.0],
            [9.5, 0.0],
            [0.0, -0.5],
            [0.0, -0.51],
            [0.0, 4.5],
            [0.0, 4.49],
        ]
    )
    assert G.inside_image(points, (5, 10)).tolist() == [True, False, True, False, True, False, False, True]


def test_reachable_region_by_hand():
    # box 30 x 40 at (0, 0): widest region at aspect 1.0 is 40 x 40, times 1.25 = 50 x 50; its
    # diagonal times max_scale 1.3, halved, is the half-side of the square around the centre
    half = 0.5 * 1.3 * math.hypot(50.0, 50.0)
    np.testing.assert_allclose(
        G.reachable_region([0.0, 0.0, 30.0, 40.0]), [15 - half, 20 - half, 15 + half, 20 + half]
    )
    half = 0.5 * 2.0 * math.hypot(80.0, 80.0)  # margin 2, max_scale 2
    np.testing.assert_allclose(
        G.reachable_region(np.array([0, 0, 30, 40]), margin=2.0, max_scale=2.0),
        [15 - half, 20 - half, 15 + half, 20 + half],
    )


def test_augment_sample_defaults_cover_their_ranges():
    aug = G.Augment.sample(np.random.default_rng(0), 20000)
    assert len(aug) == aug.scale.shape[0] == aug.rotation.shape[0] == aug.flip.shape[0] == 20000
    assert 0.7 <= aug.scale.min() < 0.71 and 1.29 < aug.scale.max() <= 1.3
    assert -45.0 <= aug.rotation.min() < -44.5 and 44.5 < aug.rotation.max() <= 45.0
    assert aug.flip.dtype == bool and 0.48 < aug.flip.mean() < 0.52
    one = aug[3]
    assert (one.scale, one.rotation, one.flip) == (aug.scale[3], aug.rotation[3], aug.flip[3])


def test_augment_identity_changes_nothing():
    aug = G.Augment.identity(2)
    assert aug.scale.tolist() == [1.0, 1.0] and aug.rotation.tolist() == [0.0, 0.0]
    assert aug.flip.dtype == bool and not aug.flip.any()


def test_input_affines_apply_the_augmentation_and_the_margin():
    bbox = np.array([[10.0, 20.0, 30.0, 40.0]])
    aug = G.Augment(np.array([1.2]), np.array([30.0]), np.array([True]))
    crop_to_image = np.array([[[1.0, 0.0, 5.0], [0.0, 1.0, 7.0]]])
    to_input, back = G.input_affines(bbox, crop_to_image, (64, 48), aug, margin=1.5)
    centre, size = G.box_to_region(bbox, 0.75, 1.5)
    want = G.region_to_input(centre, size, (64, 48), 1.2, 30.0, True)
    np.testing.assert_allclose(to_input, G.compose(want, crop_to_image), atol=1e-12)
    np.testing.assert_allclose(back, G.invert(want), atol=1e-12)
