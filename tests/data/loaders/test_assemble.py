"""``assemble.py`` by hand: the batch geometry of two hand-made samples (one flipped) and the
ImageNet normalisation of known pixel values, every expectation written out.

The samples: input (H, W) = (8, 6), box [10, 20, 3, 4] (already of aspect W/H = 0.75), margin 2,
so the region is 6 x 8 original px centred at (11.5, 22) and shown at 1 input px per original px:
original p -> input p - (11.5, 22) + ((W - 1) / 2, (H - 1) / 2) = p - (9, 18.5). The crop starts
at original (5, 16), so crop c -> input c + (-4, -2.5); flipped, x -> 5 - x (docs/design.md's
pixel convention, :mod:`pnfs.data.geometry`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pnfs.data.geometry import Augment
from pnfs.data.loaders.assemble import batch_geometry, denormalise, normalise, normalise_hwc
from pnfs.data.shards.reader import SampleMeta


def _meta() -> SampleMeta:
    keypoints = np.array(
        [
            [[4, 3, 2], [1, 2, 1], [5, 5, 0]],  # input (0, 0.5) in; (-3, -0.5) out; unlabelled at (1, 2.5)
            [[6, 4, 1], [9.6, 9, 2], [0, 0, 0]],  # flipped: (3, 1.5) in; (-0.6, 6.5) out; unlabelled
        ]
    )
    crop_to_image = np.array([[[1.0, 0, 5], [0, 1, 16]]] * 2)
    return SampleMeta(
        keypoints=keypoints,
        bbox=np.array([[10.0, 20, 3, 4]] * 2),
        crop_to_image=crop_to_image,
        score=np.ones(2),
        ids=np.array([[1, 2], [3, 4]]),
    )


def test_batch_geometry_of_two_hand_made_samples_one_flipped():
    aug = Augment(scale=np.ones(2), rotation=np.zeros(2), flip=np.array([False, True]))
    crop_to_input, input_to_image, keypoints = batch_geometry(_meta(), aug, (8, 6), 2.0, [0, 2, 1])
    np.testing.assert_allclose(
        crop_to_input, [[[1, 0, -4], [0, 1, -2.5]], [[-1, 0, 9], [0, 1, -2.5]]], atol=1e-12
    )
    np.testing.assert_allclose(
        input_to_image, [[[1, 0, 9], [0, 1, 18.5]], [[-1, 0, 14], [0, 1, 18.5]]], atol=1e-12
    )
    expected = [
        # labelled inside: weight 1; labelled outside: its place, weight 0; unlabelled: zeros
        [[0, 0.5, 1], [-3, -0.5, 0], [0, 0, 0]],
        # flipped: joints 1 and 2 swap places (flip_perm [0, 2, 1])
        [[3, 1.5, 1], [0, 0, 0], [-0.6, 6.5, 0]],
    ]
    np.testing.assert_allclose(keypoints, expected, atol=1e-12)
    assert keypoints.shape == (2, 3, 3) and keypoints.dtype == np.float64


def test_batch_geometry_scales_and_turns_with_the_augmentation():
    """Scale 2 shows twice the region (half the size), rotation 90 turns it clockwise on screen:
    original offset (dx, dy) from the box centre lands at (2.5 - dy / 2, 3.5 + dx / 2)."""
    meta = _meta()
    aug = Augment(scale=np.full(2, 2.0), rotation=np.full(2, 90.0), flip=np.zeros(2, bool))
    crop_to_input, _, keypoints = batch_geometry(meta, aug, (8, 6), 2.0, [0, 2, 1])
    # crop (4, 3) is original (9, 19): offset (-2.5, -3) -> input (4, 2.25)
    np.testing.assert_allclose(keypoints[0, 0], [4, 2.25, 1], atol=1e-12)
    # crop (6, 4) is original (11, 20): offset (-0.5, -2) -> input (3.5, 3.25), v = 1 counts as labelled
    np.testing.assert_allclose(keypoints[1, 0], [3.5, 3.25, 1], atol=1e-12)
    np.testing.assert_allclose(crop_to_input[0, :, :2], [[0, -0.5], [0.5, 0]], atol=1e-12)


# ImageNet mean / std written out: (v / 255 - mean) / std per channel
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _by_hand(v: np.ndarray, c: int) -> np.ndarray:
    return (v / 255.0 - MEAN[c]) / STD[c]


def test_normalise_known_values_per_channel():
    images = torch.tensor([[0, 255], [128, 7]], dtype=torch.uint8).view(1, 1, 2, 2).repeat(2, 3, 1, 1)
    images[1] = 255 - images[1]
    out = normalise(images)
    assert out.shape == (2, 3, 2, 2) and out.dtype == torch.float32
    for n in range(2):
        for c in range(3):
            expected = _by_hand(images[n, c].double().numpy(), c)
            np.testing.assert_allclose(out[n, c].numpy(), expected, rtol=1e-6, atol=1e-6)
    # the ends: 0 and 255 of the red channel
    assert out[0, 0, 0, 0].item() == pytest.approx(-0.485 / 0.229, rel=1e-6)
    assert out[0, 0, 0, 1].item() == pytest.approx(0.515 / 0.229, rel=1e-6)


def test_normalise_and_denormalise_keep_the_device():
    images = torch.zeros((2, 3, 4, 5), device="meta")
    assert normalise(images).device.type == "meta" and normalise(images).shape == (2, 3, 4, 5)
    assert denormalise(images).device.type == "meta" and denormalise(images).shape == (2, 3, 4, 5)


def test_denormalise_known_values_and_inverse_of_normalise():
    zeros, ones = denormalise(torch.zeros(1, 3, 1, 1)), denormalise(torch.ones(1, 3, 1, 1))
    np.testing.assert_allclose(zeros.view(3).numpy(), [123.675, 116.28, 103.53], rtol=1e-6)
    np.testing.assert_allclose(ones.view(3).numpy(), [182.07, 173.4, 160.905], rtol=1e-6)
    images = torch.arange(0, 256, 5, dtype=torch.uint8).view(1, 1, 4, 13).repeat(2, 3, 1, 1)
    back = denormalise(normalise(images))
    assert back.dtype == torch.float32
    np.testing.assert_allclose(back.numpy(), images.double().numpy(), atol=1e-3)


def test_normalise_hwc_moves_the_channels_first_and_normalises_each():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)  # [N, H, W, 3], channels differ
    pixels[0, 0, 0] = (0, 128, 255)
    out = normalise_hwc(pixels)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 3, 4) and out.dtype == torch.float32
    for n in range(2):
        for c in range(3):
            np.testing.assert_allclose(
                out[n, c].numpy(), _by_hand(pixels[n, :, :, c].astype(float), c), atol=1e-5
            )
    np.testing.assert_allclose(
        out[0, :, 0, 0].numpy(), [-0.485 / 0.229, (128 / 255 - 0.456) / 0.224, 0.594 / 0.225], rtol=1e-5
    )
    torch.testing.assert_close(
        out, normalise(torch.from_numpy(pixels).permute(0, 3, 1, 2)), rtol=1e-5, atol=1e-5
    )
