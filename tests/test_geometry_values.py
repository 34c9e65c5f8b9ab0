"""pnfs.data.geometry against matrices and regions worked out by hand (module docstring:
M = Flip · T(c_in) · R(rotation) · S(W / (region_w · scale)) · T(-c_box)), the defaults the
loaders rely on (margin 1.25, rotation ±45°, flip probability 0.5), and numpy in -> numpy out,
torch in -> torch out, in the input's dtype."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pnfs.data import geometry as G


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
