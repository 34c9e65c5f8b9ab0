"""``torch_loader.py`` on the hand-made shard of ``test_plan_reader.py``: a :class:`PlanBatches`
item field by field, the warp's border and pixels, the decode scale at its edges, and
:class:`PoseLoader`'s unpacking of (batch, bad samples) items.

The crops are single grey levels (sample s: ``20 * s``), so a warped input pixel inside the crop
is that level exactly and one outside it is black; the centre of the input, (11.5, 15.5), shows
the person box's centre, inside every crop.
"""

from __future__ import annotations

import numpy as np
import pytest
import simplejpeg
import torch

from pnfs.data.bad_samples import BadSample, BadSampleError, BadSampleReport
from pnfs.data.batch import PoseBatch
from pnfs.data.loaders.torch_loader import PlanBatches, PoseLoader, decode_for_input, warp_crops
from pnfs.data.shards.reader import ShardSet
from tests.data.loaders.test_plan_reader import FLIP, SIZE, plan, sample, write_shard

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, written out


def _batches(tmp_path, samples, batches) -> PlanBatches:
    shards = ShardSet.open([write_shard(tmp_path / "s.tar", samples)])
    return PlanBatches(shards, plan(batches, len(samples)), SIZE, 1.5, FLIP)


def test_a_plan_batch_is_a_pose_batch_of_the_samples(tmp_path):
    ds = _batches(tmp_path, [sample(s) for s in range(5)], [[0, 1], [4, 2]])
    batch, bad = ds[1]
    assert isinstance(batch, PoseBatch) and bad == []
    got = ds.checked(1)
    assert batch.image.shape == (2, 3, 32, 24) and batch.image.dtype == torch.float32
    assert batch.keypoints.dtype == torch.float32 and batch.affine.dtype == torch.float32
    torch.testing.assert_close(batch.keypoints, torch.from_numpy(got.keypoints).float())
    torch.testing.assert_close(batch.affine, torch.from_numpy(got.input_to_image).float())
    assert batch.image_id.tolist() == [104, 102] and batch.ann_id.tolist() == [204, 202]
    assert batch.image_id.dtype == torch.int64 and batch.ann_id.dtype == torch.int64
    assert batch.score.dtype == torch.float32 and batch.score.tolist() == pytest.approx([0.9, 0.7])
    for i, level in enumerate((80, 40)):
        centre = batch.image[i, :, 15, 11].tolist()
        assert centre == pytest.approx([(level / 255 - m) / s for m, s in zip(MEAN, STD)], abs=1e-5)
        corner = batch.image[i, :, 0, 0].tolist()  # outside the crop: black
        assert corner == pytest.approx([-m / s for m, s in zip(MEAN, STD)], abs=1e-5)


def test_a_plan_batch_hands_over_the_bad_samples_it_replaced(tmp_path):
    samples = [sample(s) for s in range(4)]
    samples[1] = sample(1, jpg=b"\xff\xd8 no jpeg")
    batch, bad = _batches(tmp_path, samples, [[0, 1]])[0]
    assert batch.ann_id.tolist() == [200, 202]
    assert [(b.reason, b.key) for b in bad] == [("bad_jpeg", "101_201")]
    assert batch.image[1, 0, 15, 11].item() == pytest.approx((40 / 255 - MEAN[0]) / STD[0], abs=1e-5)


def test_warp_crops_is_bilinear_with_a_black_border():
    crop = np.zeros((4, 4, 3), np.uint8)
    crop[:, :, 0] = [[0, 100, 200, 250]] * 4  # red grows along x
    crop[:, :, 2] = 7
    half = np.array([[[1.0, 0, 0.5], [0, 1, 0]]], np.float32)  # half a pixel right
    out = warp_crops([crop], half, (3, 6))
    assert out.shape == (1, 3, 6, 3) and out.dtype == np.uint8
    # input x samples crop x - 0.5: between neighbours, the mean (cv2 rounds to the nearest)
    assert out[0, 1, :, 0].tolist() == [0, 50, 150, 225, 125, 0]
    assert out[0, 1, 1:4, 2].tolist() == [7, 7, 7] and out[0, 1, 5, 2] == 0


@pytest.mark.parametrize(
    ("stretch", "scale"),
    [
        (1.0, 1.0),
        (0.51, 1.0),
        (0.5, 0.5),
        (0.26, 0.5),
        (0.25, 0.25),
        (0.126, 0.25),
        (0.125, 0.125),
        (0.01, 0.125),
    ],
)
def test_the_decode_scale_is_the_smallest_that_still_covers_the_input(stretch, scale):
    """f is the smallest of 1, 1/2, 1/4, 1/8 with f >= the largest stretch: exactly f at the edge."""
    data = simplejpeg.encode_jpeg(np.full((64, 48, 3), 90, np.uint8))
    image, m = decode_for_input(data, np.array([[stretch, 0.0, 3.0], [0.0, stretch / 2, 4.0]]))
    assert image.shape == (64 * scale, 48 * scale, 3)
    # decoded px d is crop px (d + 0.5) / f - 0.5: the matrix gains 1/f and a shift
    shift = 0.5 / scale - 0.5
    np.testing.assert_allclose(
        m,
        [[stretch / scale, 0, 3 + stretch * shift], [0, stretch / 2 / scale, 4 + stretch / 2 * shift]],
        atol=1e-12,
    )


def test_the_stretch_is_the_largest_of_a_turned_and_sheared_matrix():
    """Rotations by 30 degrees at 0.3 and by 45 at 0.6 and 0.4, and matrices of singular values (0.6,
    0.05) and (0.4, 0.05): the decode scale follows the largest stretch, not a matrix entry."""
    data = simplejpeg.encode_jpeg(np.full((64, 48, 3), 90, np.uint8))
    c, s = np.cos(np.pi / 6) * 0.3, np.sin(np.pi / 6) * 0.3
    assert decode_for_input(data, np.array([[c, -s, 0], [s, c, 0]]))[0].shape == (32, 24, 3)
    turned = np.array([[0.3, 0.3, 0], [-0.3, 0.3, 0]]) * np.sqrt(2)  # 45 degrees at 0.6; entries 0.42
    assert decode_for_input(data, turned)[0].shape == (64, 48, 3)
    # 45 degrees at 0.4: 1/2 (the determinant counts: with a·d + b·c it would seem 0.57 and be decoded whole)
    turned = np.array([[0.2, 0.2, 0], [-0.2, 0.2, 0]]) * np.sqrt(2)
    assert decode_for_input(data, turned)[0].shape == (32, 24, 3)
    flat = np.array([[0.0, 0.6, 0], [0.05, 0.0, 0]])  # singular values 0.6 and 0.05
    assert decode_for_input(data, flat)[0].shape == (64, 48, 3)
    assert decode_for_input(data, np.array([[0.0, 0.4, 0], [0.05, 0.0, 0]]))[0].shape == (32, 24, 3)


def test_a_crop_under_8_pixels_a_side_is_decoded_whole():
    for h, w in ((7, 40), (40, 7)):
        data = simplejpeg.encode_jpeg(np.full((h, w, 3), 90, np.uint8))
        image, m = decode_for_input(data, np.array([[0.2, 0, 1], [0, 0.2, 2]]))
        assert image.shape == (h, w, 3)
        np.testing.assert_array_equal(m, [[0.2, 0, 1], [0, 0.2, 2]])
    data = simplejpeg.encode_jpeg(np.full((8, 8, 3), 90, np.uint8))
    assert decode_for_input(data, np.array([[0.2, 0, 1], [0, 0.2, 2]]))[0].shape == (2, 2, 3)


class _Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _pose_batch(n: int) -> PoseBatch:
    return PoseBatch(
        torch.zeros(n, 3, 2, 2),
        torch.zeros(n, 1, 3),
        torch.zeros(n, 2, 3),
        torch.arange(n),
        torch.arange(n),
        torch.ones(n),
    )


def test_pose_loader_unpacks_batches_and_counts_their_bad_samples(caplog):
    bad = BadSample("bad_jpeg", "s.tar", "1_2", "broken")
    items = [(_pose_batch(2), []), (_pose_batch(3), [bad]), ("other", "item")]
    report = BadSampleReport(limit=5)
    loader = PoseLoader(_Items(items), num_workers=0, bad_samples=report)
    assert len(loader) == 3 and loader.num_workers == 0 and loader.bad_samples is report
    with caplog.at_level("WARNING", logger="pnfs.train"):
        got = list(loader)
    assert [len(b) for b in got[:2]] == [2, 3] and all(isinstance(b, PoseBatch) for b in got[:2])
    assert tuple(got[2]) == ("other", "item")  # not a (PoseBatch, bad samples) pair: as it came
    assert report.samples == [bad] and report.counts == {"bad_jpeg": 1}
    assert [r.getMessage() for r in caplog.records] == [f"bad sample dropped: {bad}"]


def test_pose_loader_without_a_report_stops_at_the_first_bad_sample():
    bad = BadSample("bad_json", "s.tar", "1_2", "no json")
    loader = PoseLoader(_Items([(_pose_batch(1), [bad])]), num_workers=0)
    assert loader.bad_samples.limit == 0 and loader.loader.pin_memory is False
    with pytest.raises(BadSampleError, match=r"more than data\.max_bad_samples=0"):
        list(loader)
    assert PoseLoader(_Items([]), num_workers=0, pin_memory=True).loader.pin_memory is True


@pytest.mark.parametrize("stretch", [1.0, 0.2])
def test_decode_for_input_gives_rgb_at_the_rounded_up_size(stretch):
    """A 61 x 47 crop of one colour: RGB order on the whole and the scaled path; at 1/4 libjpeg
    gives ceil(61 / 4) x ceil(47 / 4) = 16 x 12 pixels."""
    data = simplejpeg.encode_jpeg(
        np.tile(np.uint8([200, 30, 90]), (61, 47, 1)), quality=100, colorsubsampling="444"
    )
    image, _ = decode_for_input(data, np.array([[stretch, 0, 0], [0, stretch, 0]]))
    assert image.shape == ((61, 47, 3) if stretch == 1.0 else (16, 12, 3))
    assert np.abs(image[5, 5].astype(int) - [200, 30, 90]).max() <= 2


def test_a_scaled_decode_of_another_size_is_refused(monkeypatch):
    """The matrix assumes libjpeg's ceil(size * f): a decoder that gives another size is refused."""
    data = simplejpeg.encode_jpeg(np.full((64, 48, 3), 90, np.uint8))
    real = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: real(*a, **k)[:-1])
    with pytest.raises(ValueError) as e:
        decode_for_input(data, np.array([[0.3, 0, 0], [0, 0.3, 0]]))
    assert str(e.value) == "scaled JPEG decode gave (31, 24) for 64x48 at scale 0.5"
