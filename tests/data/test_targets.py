"""pnfs.data.targets by hand: the Gaussian's width, its default σ = 2 (paper §III-D), and the
edges of the heatmap where a joint stops counting (u in [-0.5, w - 0.5), v in [-0.5, h - 0.5))."""

from __future__ import annotations

import math

import pytest
import torch

from pnfs.data.targets import gaussian_targets


def test_default_sigma_is_two_heatmap_pixels():
    # joint at heatmap (u, v) = (2, 1): one pixel to the right the target is exp(-1 / (2 * 2^2))
    t, w = gaussian_targets(torch.tensor([[[8.0, 4.0, 1.0]]]), (4, 6))
    assert w.tolist() == [[1.0]]
    assert t[0, 0, 1, 2].item() == 1.0
    assert t[0, 0, 1, 3].item() == pytest.approx(math.exp(-1 / 8), rel=1e-6)
    assert t[0, 0, 3, 5].item() == pytest.approx(math.exp(-(2**2 + 3**2) / 8), rel=1e-6)


@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_width_follows_sigma_squared(sigma):
    t, _ = gaussian_targets(torch.tensor([[[0.0, 0.0, 1.0]]]), (5, 5), sigma=sigma)
    assert t[0, 0, 0, 3].item() == pytest.approx(math.exp(-9 / (2 * sigma**2)), rel=1e-6)
    assert t[0, 0, 2, 0].item() == pytest.approx(math.exp(-4 / (2 * sigma**2)), rel=1e-6)


@pytest.mark.parametrize(
    ("u", "v", "weight"),
    [
        (-0.5, 1.0, 1.0),  # left edge of pixel 0 is on the map
        (-0.51, 1.0, 0.0),
        (-1.0, 1.0, 0.0),
        (0.0, 1.0, 1.0),
        (5.4, 1.0, 1.0),
        (5.5, 1.0, 0.0),
        (6.0, 1.0, 0.0),
        (2.0, -0.5, 1.0),  # the same in v, h = 4
        (2.0, -0.51, 0.0),
        (2.0, -1.0, 0.0),
        (2.0, 0.0, 1.0),
        (2.0, 3.4, 1.0),
        (2.0, 3.5, 0.0),
        (2.0, 4.0, 0.0),
    ],
)
def test_a_joint_counts_inside_the_heatmaps_pixel_edges_only(u, v, weight):
    kp = torch.tensor([[[4.0 * u, 4.0 * v, 1.0]]])  # input px = heatmap px * stride 4
    t, w = gaussian_targets(kp, (4, 6))
    assert w.item() == weight
    assert (t.abs().sum() > 0).item() == bool(weight)


@pytest.mark.parametrize("shape", [(1, 2, 2), (2, 3), (1, 1, 1, 3)])
def test_keypoints_of_another_shape_are_refused_naming_it(shape):
    with pytest.raises(
        ValueError, match=rf"keypoints must be \[N, K, 3\], got \({', '.join(map(str, shape))}"
    ):
        gaussian_targets(torch.zeros(shape), (4, 4))
