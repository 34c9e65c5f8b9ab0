"""Inference path: flip test geometry, decoding, back-projection, round trip on real samples.

The stand-in for a trained network is ``pose_oracle.PerfectNetwork`` (see there).
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from pnfs.data.geometry import Augment, box_to_region, flip_joints, invert, region_to_input, transform_points
from pnfs.data.targets import gaussian_targets
from pnfs.inference import (
    back_project,
    decode,
    heatmap_stride,
    mirror_images,
    predict,
    predict_scores,
    unmirror_scores,
)
from pnfs.keypoints import COCO
from tests.support.pose_oracle import PerfectNetwork

STRIDE = 4
PERM = COCO.flip_permutation()


def _random_case(n=64, k=17, size=(64, 48), seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, *size, generator=g)
    h, w = size
    kp = torch.stack(
        [torch.rand(n, k, generator=g) * (w - 1), torch.rand(n, k, generator=g) * (h - 1), torch.ones(n, k)],
        -1,
    )
    return images, kp


def test_quarter_offset_has_no_bias_and_at_most_a_quarter_heatmap_pixel_error():
    _, kp = _random_case(n=200)
    targets, weights = gaussian_targets(kp, (16, 12), 2.0)
    coords, maxvals = decode(targets)
    err = coords * STRIDE - kp[..., :2]  # input px
    u = kp[..., :2] / STRIDE
    # the argmax is an inner pixel (the offset applies) when u is in [0.5, w - 1.5)
    interior = ((u[..., 0] >= 0.5) & (u[..., 0] < 10.5) & (u[..., 1] >= 0.5) & (u[..., 1] < 14.5)).unsqueeze(
        -1
    )
    assert err.abs()[interior.expand_as(err)].max() <= 0.25 * STRIDE + 1e-4
    on_map = weights > 0
    assert on_map.sum() > 3000
    assert err[on_map].abs().max() <= 0.5 * STRIDE + 1e-4  # a peak on the border pixel gets no offset
    assert err[on_map].mean(0).abs().max() < 0.05  # no constant bias (sd ~0.6 px, ~3300 joints)
    assert err[on_map].abs().mean() > 0.3  # ... but a real quantisation error remains (~0.5 px)
    assert torch.all(maxvals[on_map] > 0.9)


def test_gaussian_refinement_recovers_the_exact_centre():
    _, kp = _random_case(n=200)
    targets, _ = gaussian_targets(kp, (16, 12), 2.0)
    coords, _ = decode(targets, refine="gaussian")
    on_map = gaussian_targets(kp, (16, 12))[1] > 0
    assert (coords * STRIDE - kp[..., :2])[on_map].abs().max() < 0.01  # input px, borders included
    with pytest.raises(ValueError, match=r"eval\.refine"):
        decode(targets, refine="dark")


def test_mirror_input_is_exactly_the_mirror_of_a_heatmap_array_flip():
    images, kp = _random_case(n=8)
    net = PerfectNetwork(images, kp, PERM)
    mirrored_scores = net(mirror_images(images))
    np.testing.assert_allclose(unmirror_scores(mirrored_scores, PERM), net(images), atol=1e-6)


def test_flip_test_decodes_like_no_flip_and_runs_one_forward():
    images, kp = _random_case(n=32)
    net = PerfectNetwork(images, kp, PERM)
    affine = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(32, 2, 3)
    plain = predict(net, images, affine)
    net.calls = 0
    flipped = predict(net, images, affine, flip_permutation=PERM)
    assert net.calls == 1  # originals and mirrors in one batch
    torch.testing.assert_close(flipped.keypoints, plain.keypoints, atol=1e-4, rtol=0)
    torch.testing.assert_close(flipped.scores, plain.scores, atol=1e-4, rtol=0)


def test_plain_array_flip_and_hrnet_shift_are_biased_under_our_convention():
    images, kp = _random_case(n=64)
    net = PerfectNetwork(images, kp, PERM)
    labelled = gaussian_targets(kp, (16, 12))[1] > 0
    # plain array flip, no shift: the flipped peak sits 3/4 heatmap px left; average -3/8
    scores = net(torch.cat([images, images.flip(-1)]))
    naive = 0.5 * (scores[:64] + unmirror_scores(scores[64:], PERM))
    dx = (decode(naive, "gaussian")[0][..., 0] * STRIDE - kp[..., 0])[labelled]
    assert dx.mean() < -1.0  # about -1.5 input px
    # the HRNet habit (flip_shift): plain flip + one heatmap pixel right = +1/4 then +1/8 averaged
    shifted = predict_scores(net, images, PERM, flip_shift=True)
    dx = (decode(shifted, "gaussian")[0][..., 0] * STRIDE - kp[..., 0])[labelled]
    assert 0.25 < dx.mean() < 0.75  # about +0.5 input px
    ours = predict_scores(net, images, PERM)
    dx = (decode(ours, "gaussian")[0][..., 0] * STRIDE - kp[..., 0])[labelled]
    assert dx.abs().max() < 0.01


def test_back_projection_applies_each_samples_affine():
    g = torch.Generator().manual_seed(1)
    affine = torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
    coords = torch.rand(5, 17, 2, generator=g, dtype=torch.float64) * 30
    torch.testing.assert_close(back_project(coords, affine), transform_points(affine, coords * STRIDE))


def _real_crops(shared_data, aug: Augment, input_size=(128, 96)):
    """Every labelled person of the COCO sample, cropped with the augmentation ``aug[i % len]``."""
    root = shared_data / "coco_sample"
    data = json.loads((root / "test_coco.json").read_text())
    files = {im["id"]: im["file_name"] for im in data["images"]}
    anns = [a for a in data["annotations"] if a["num_keypoints"] > 0]
    photos = {i: cv2.cvtColor(cv2.imread(str(root / f)), cv2.COLOR_BGR2RGB) for i, f in files.items()}
    images, keypoints, affines, originals = [], [], [], []
    h, w = input_size
    for i, a in enumerate(anns):
        kp = np.asarray(a["keypoints"], dtype=np.float64).reshape(17, 3)
        centre, size = box_to_region(np.asarray(a["bbox"], dtype=np.float64), w / h)
        a_i = aug[i % len(aug)]
        to_input = region_to_input(centre, size, input_size, a_i.scale, a_i.rotation, a_i.flip)
        crop = cv2.warpAffine(photos[a["image_id"]], to_input, (w, h), flags=cv2.INTER_LINEAR)
        xy = flip_joints(transform_points(to_input, kp[:, :2]), PERM, a_i.flip)
        v = flip_joints(kp[:, 2:], PERM, a_i.flip)
        images.append(torch.from_numpy(crop).permute(2, 0, 1).float() / 255)
        keypoints.append(np.concatenate([xy, (v > 0).astype(np.float64)], 1))
        affines.append(invert(to_input))
        originals.append(flip_joints(kp, PERM, a_i.flip))
    return (
        torch.stack(images),
        torch.tensor(np.stack(keypoints), dtype=torch.float32),
        torch.tensor(np.stack(affines), dtype=torch.float32),
        np.stack(originals),
    )


AUGMENTATIONS = Augment(
    scale=np.array([1.0, 1.2, 0.8, 1.3, 0.7]),
    rotation=np.array([0.0, 30.0, -40.0, 45.0, -10.0]),
    flip=np.array([False, False, True, True, False]),
)


@pytest.mark.parametrize("shift", range(5))
def test_round_trip_on_real_samples(shared_data, shift):
    """GT -> targets -> (flip test) -> decode -> back-projection lands on the GT."""
    aug = Augment(
        *(np.roll(a, shift) for a in (AUGMENTATIONS.scale, AUGMENTATIONS.rotation, AUGMENTATIONS.flip))
    )
    images, kp, affine, originals = _real_crops(shared_data, aug)
    h, w = images.shape[-2] // STRIDE, images.shape[-1] // STRIDE
    weights = gaussian_targets(kp, (h, w))[1]
    visible = (weights > 0) & (kp[..., 2] > 0)
    assert visible.sum() > 100
    # the crops' affines take GT input px back to the GT original px: the test's geometry holds
    np.testing.assert_allclose(
        transform_points(affine.double(), kp[..., :2].double())[visible],
        originals[..., :2][visible.numpy()],
        atol=1e-3,
    )
    u = kp[..., :2] / STRIDE
    inner = (u >= 0.5) & (u < torch.tensor([w - 1.5, h - 1.5]))
    interior = inner.all(-1) & visible
    net = PerfectNetwork(images, kp, PERM)
    results = {}
    for refine in ("quarter", "gaussian"):
        for perm in (None, PERM):
            pred = predict(net, images, affine, flip_permutation=perm, refine=refine)
            torch.testing.assert_close(
                pred.keypoints, transform_points(affine, pred.input_keypoints), atol=2e-3, rtol=0
            )
            err = pred.input_keypoints - kp[..., :2]  # input px
            if refine == "quarter":
                assert err[interior].abs().max() <= 0.25 * STRIDE + 1e-3
                assert err[visible].abs().max() <= 0.5 * STRIDE + 1e-3
            else:
                assert err[visible].norm(dim=-1).max() < 0.5
                scale = affine[:, :, :2].det().abs().sqrt()[:, None]  # original px per input px
                orig_err = np.linalg.norm(pred.keypoints.numpy() - originals[..., :2], axis=-1)
                assert (orig_err / scale.numpy())[visible.numpy()].max() < 0.5
            results[refine, perm is None] = pred.keypoints
        torch.testing.assert_close(results[refine, True], results[refine, False], atol=1e-3, rtol=0)


def test_round_trip_has_no_constant_bias_on_real_samples(shared_data):
    errors = []
    for shift in range(5):
        aug = Augment(
            *(np.roll(a, shift) for a in (AUGMENTATIONS.scale, AUGMENTATIONS.rotation, AUGMENTATIONS.flip))
        )
        images, kp, affine, _ = _real_crops(shared_data, aug)
        visible = (gaussian_targets(kp, (32, 24))[1] > 0) & (kp[..., 2] > 0)
        pred = predict(PerfectNetwork(images, kp, PERM), images, affine, flip_permutation=PERM)
        errors.append((pred.input_keypoints - kp[..., :2])[visible])
    err = torch.cat(errors)
    assert len(err) > 500
    assert err.mean(0).abs().max() < 0.1  # input px; a half-pixel bias would be >= 0.5


def test_real_model_predicts_on_its_device():
    from pnfs.config import load_config
    from pnfs.model import build_model

    cfg = load_config("demo")
    model = build_model(cfg).eval()
    images = torch.randn(2, 3, *cfg.data.input_size)
    affine = torch.tensor([[[2.0, 0, 10], [0, 2.0, 5]]]).expand(2, 2, 3)
    pred = predict(model, images, affine, flip_permutation=PERM)
    assert pred.keypoints.shape == (2, 17, 2) and pred.scores.shape == (2, 17)
    # values: the decoded flip-test maps of this very model, back-projected through x -> 2x + (10, 5)
    coords, maxvals = decode(predict_scores(model, images, PERM))
    torch.testing.assert_close(pred.input_keypoints, coords * STRIDE, atol=1e-5, rtol=0)
    torch.testing.assert_close(pred.scores, maxvals, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        pred.keypoints, 2.0 * coords * STRIDE + torch.tensor([10.0, 5.0]), atol=1e-4, rtol=0
    )


@pytest.mark.gpu
def test_cuda_decoding_and_back_projection_match_the_cpu():
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(4, 17, 32, 24, generator=g)
    affine = torch.randn(4, 2, 3, generator=g)
    for refine in ("quarter", "gaussian"):
        cpu = back_project(decode(scores, refine)[0], affine)
        gpu = back_project(decode(scores.cuda(), refine)[0], affine.cuda())
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-5)


def test_mixed_precision_stops_at_the_forward_pass():
    """bf16 autocast must not reach the back-projection (bf16 keeps ~3 digits: pixels off by 4+)."""
    images, kp = _random_case(n=8)
    net = PerfectNetwork(images, kp, PERM)
    affine = torch.tensor([[2.5, 0.1, 1234.5], [-0.1, 2.5, 987.25]]).expand(8, 2, 3)
    full = predict(net, images, affine, flip_permutation=PERM)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # even inside a caller's autocast region
        mixed = predict(net, images, affine, flip_permutation=PERM, amp_dtype=torch.bfloat16)
    assert mixed.keypoints.dtype == torch.float32
    torch.testing.assert_close(mixed.keypoints, full.keypoints, atol=1e-3, rtol=0)


def test_heatmap_stride_is_the_exact_integer_ratio():
    assert heatmap_stride(64, 16) == 4 and isinstance(heatmap_stride(64, 16), int)
    assert heatmap_stride(64, 1) == 64
    for heatmap_width in (5, 0, -16):
        with pytest.raises(
            ValueError, match=f"input width 64 is not a multiple of the heatmap width {heatmap_width}"
        ):
            heatmap_stride(64, heatmap_width)
