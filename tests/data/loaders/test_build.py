"""Loaders on synthetic shards: order, resumption, rank splits, agreement of torch/gpu/DALI."""

from __future__ import annotations

import importlib.util
import logging
import math
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pnfs.config import load_config
from pnfs.data.bad_samples import BadSampleError
from pnfs.data.loaders.assemble import denormalise
from pnfs.data.loaders.build import build_loader, make_epoch_plan, shard_paths
from pnfs.data.loaders.torch_loader import PoseLoader
from pnfs.data.plan import train_plan, val_plan
from pnfs.data.shards.reader import ShardSet
from pnfs.data.targets import gaussian_targets
from pnfs.keypoints import COCO

REPO = Path(__file__).resolve().parents[3]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "data_prep" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_shards")
    _script("make_synthetic").main(
        ["--out", str(root / "raw"), "--train", "30", "--val", "14", "--seed", "1"]
    )
    shard_coco = _script("shard_coco")
    for split in ("train", "val"):
        rc = shard_coco.main(
            ["--images", str(root / "raw" / "images" / split),
             "--annotations", str(root / "raw" / "annotations" / f"person_keypoints_{split}.json"),
             "--out", str(root / "shards"), "--shard-size", "6", "--max-side", "160", "--no-progress"]
        )  # fmt: skip
        assert rc == 0
    return root / "shards"


def _cfg(shards: Path, loader: str = "torch", workers: int = 0, size=(64, 64), **extra):
    overrides = [
        f"data.train_shards={shards}",
        f"data.val_shards={shards}",
        f"data.loader={loader}",
        f"data.num_workers={workers}",
        f"data.input_size=[{size[0]}, {size[1]}]",
        "train.batch_size=4",
        "eval.batch_size=4",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def _ids(loader) -> list[tuple[int, int]]:
    return [(int(i), int(a)) for b in loader for i, a in zip(b.image_id, b.ann_id)]


# ----------------------------------------------------------------------------- plans (pure)


def test_train_plan_same_seed_same_order_and_new_order_each_epoch():
    counts = [6, 6, 6, 6, 6]
    flat = lambda p: [tuple(r) for b in p.batches for r in b.tolist()]
    a, b = train_plan(counts, 4, seed=0, epoch=0), train_plan(counts, 4, seed=0, epoch=0)
    assert flat(a) == flat(b)
    assert flat(a) != flat(train_plan(counts, 4, seed=0, epoch=1))
    assert flat(a) != flat(train_plan(counts, 4, seed=1, epoch=0))
    np.testing.assert_array_equal(a.augment[0].rotation, b.augment[0].rotation)


def test_train_plan_resume_yields_exactly_the_remaining_samples():
    counts = [6, 6, 5, 6]
    full = train_plan(counts, 4, seed=3, epoch=2, workers=2)
    stream = np.concatenate(full.batches)
    for k in (0, 4, 5, 13, len(stream)):
        rest = train_plan(counts, 4, seed=3, epoch=2, workers=2, start_sample=k)
        np.testing.assert_array_equal(
            np.concatenate(rest.batches) if rest.batches else stream[:0], stream[k:]
        )
        scales = np.concatenate([a.scale for a in rest.augment]) if rest.batches else np.zeros(0)
        np.testing.assert_array_equal(scales, np.concatenate([a.scale for a in full.augment])[k:])


@pytest.mark.parametrize(("counts", "world", "workers"), [([6] * 7, 3, 2), ([6, 6, 2], 2, 2), ([40], 4, 3)])
def test_train_plan_equal_batches_on_every_rank_and_shards_split_by_rank(counts, world, workers):
    plans = [
        train_plan(counts, 4, seed=0, epoch=0, rank=r, world_size=world, workers=workers)
        for r in range(world)
    ]
    assert len({len(p) for p in plans}) == 1
    assert all(len(b) == 4 for p in plans for b in p.batches)
    if len(counts) >= world * workers:  # each rank's shards hold what it owes: no shard read by two
        used = [{int(s) for b in p.batches for s in b[:, 0]} for p in plans]
        assert all(not (used[i] & used[j]) for i in range(world) for j in range(i + 1, world))


def test_val_plan_every_sample_once_over_ranks_last_batch_kept():
    counts = [6, 6, 2]
    plans = [val_plan(counts, 4, rank=r, world_size=3) for r in range(3)]
    seen = [tuple(x) for p in plans for b in p.batches for x in b.tolist()]
    assert sorted(seen) == sorted((s, i) for s, n in enumerate(counts) for i in range(n))
    # blocks [0, 4), [4, 9), [9, 14) of the 14 samples, batches of 4 with the remainder kept
    assert [[len(b) for b in p.batches] for p in plans] == [[4], [4, 1], [4, 1]]
    assert [tuple(x) for x in plans[1].batches[0].tolist()] == [(0, 4), (0, 5), (1, 0), (1, 1)]


def test_scaled_decode_keeps_the_warped_picture_and_the_geometry():
    """A crop decoded at 1/2 or 1/4 scale and warped with the composed matrix shows the same
    picture, with a bright blob at the same place (a half-pixel slip would move it 0.2 px)."""
    import simplejpeg

    from pnfs.data.loaders.torch_loader import decode_for_input, warp_crops

    ys, xs = np.mgrid[0:300, 0:400]
    blob = 40 + 200 * np.exp(-((xs - 173.3) ** 2 + (ys - 121.7) ** 2) / (2 * 14.0**2))
    data = simplejpeg.encode_jpeg(
        np.repeat(blob[..., None], 3, -1).round().astype(np.uint8), quality=94, colorsubsampling="444"
    )
    full = simplejpeg.decode_jpeg(data)

    def centroid(img):
        w = np.clip(img[..., 0].astype(float) - 50, 0, None)  # the blob only: no background, no border
        return (
            np.array([(w * np.arange(w.shape[1])).sum(), (w * np.arange(w.shape[0])[:, None]).sum()])
            / w.sum()
        )

    for stretch, scale in ((0.9, 1.0), (0.45, 0.5), (0.2, 0.25)):
        to_input = np.array(
            [[stretch, 0.0, 96 / 2 - 173.3 * stretch], [0.0, stretch, 72 / 2 - 121.7 * stretch]]
        )
        image, m = decode_for_input(data, to_input)
        assert image.shape[:2] == (math.ceil(300 * scale), math.ceil(400 * scale))
        np.testing.assert_allclose(m[:, :2], to_input[:, :2] / scale)
        ref, got = warp_crops([full], to_input[None], (72, 96))[0], warp_crops([image], m[None], (72, 96))[0]
        assert np.abs(ref.astype(float) - got).mean() < 1.0
        np.testing.assert_allclose(centroid(got), centroid(ref), atol=0.05)
    tiny = simplejpeg.encode_jpeg(np.zeros((6, 6, 3), np.uint8))
    assert decode_for_input(tiny, np.array([[0.1, 0, 0], [0, 0.1, 0]]))[0].shape == (6, 6, 3)


# ----------------------------------------------------------------------------- loaders


def test_torch_loader_order_resume_and_epochs(shards):
    cfg = _cfg(shards)
    first = _ids(build_loader(cfg, "train", epoch=0))
    assert first == _ids(build_loader(cfg, "train", epoch=0))
    assert first != _ids(build_loader(cfg, "train", epoch=1))
    assert _ids(build_loader(cfg, "train", epoch=0, start_sample=5)) == first[5:]
    loader = build_loader(cfg, "train")
    assert len(loader) == 30 // 4 == len(list(loader))


def test_every_rank_gets_the_same_number_of_full_batches(shards):
    cfg = _cfg(shards)
    loaders = [build_loader(cfg, "train", rank=r, world_size=3, epoch=2) for r in range(3)]
    sizes = [[len(b) for b in loader] for loader in loaders]
    assert sizes[0] == sizes[1] == sizes[2] == [4, 4]  # 30 samples // 3 ranks // batch 4
    ids = [set(_ids(loader)) for loader in loaders]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])


def test_worker_processes_keep_the_plan_order(shards):
    cfg = _cfg(shards, workers=2)
    loader = build_loader(cfg, "train", epoch=4)
    shard_set = ShardSet.open(shard_paths(cfg, "train"))
    plan = make_epoch_plan(cfg, "train", shard_set.counts, rank=0, world_size=1, epoch=4, start_sample=0,
                     batch_size=4, augment=True)  # fmt: skip
    expected = [shard_set.key(int(s), int(p)) for b in plan.batches for s, p in b]
    assert [f"{i}_{a}" for i, a in _ids(loader)] == expected


def test_val_loader_every_sample_once_across_ranks(shards):
    cfg = _cfg(shards)
    per_rank = [_ids(build_loader(cfg, "val", rank=r, world_size=2)) for r in range(2)]
    all_ids = per_rank[0] + per_rank[1]
    assert len(all_ids) == len(set(all_ids)) == 14
    assert per_rank[0] == _ids(build_loader(cfg, "val", rank=0, world_size=2))  # deterministic
    assert [len(b) for b in build_loader(cfg, "val", rank=0, world_size=2)] == [4, 3]


def test_val_batch_without_augmentation_maps_back_to_the_original(shards):
    """affine (input -> original) takes the batch keypoints back to the annotation."""
    import json

    cfg = _cfg(shards)
    ann = json.loads((shards.parent / "raw" / "annotations" / "person_keypoints_val.json").read_text())
    original = {a["id"]: np.asarray(a["keypoints"], float).reshape(17, 3) for a in ann["annotations"]}
    batch = next(iter(build_loader(cfg, "val")))
    for i in range(len(batch)):
        kp = batch.keypoints[i].double().numpy()
        ref = original[int(batch.ann_id[i])]
        inside = kp[:, 2] > 0
        assert inside.sum() >= (ref[:, 2] > 0).sum() - 2  # margin 1.25: labelled joints stay inside
        m = batch.affine[i].double().numpy()
        back = kp[inside, :2] @ m[:, :2].T + m[:, 2]
        np.testing.assert_allclose(back, ref[inside, :2], atol=0.01)


def _loader_outputs(shards, kind):
    cfg = _cfg(shards, loader=kind, size=(128, 96))
    return list(build_loader(cfg, "val", augment=True))


def _targets(batch):
    return gaussian_targets(batch.keypoints, (128 // 4, 96 // 4), sigma=2.0)


def test_gpu_path_agrees_with_torch_loader(shards):
    """Same keypoints (hence the same targets, to the bit) and images within interpolation tolerance."""
    ref, got = _loader_outputs(shards, "torch"), _loader_outputs(shards, "gpu")
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert torch.equal(a.ann_id, b.ann_id.cpu())
        assert torch.equal(a.keypoints, b.keypoints.cpu())
        for x, y in zip(_targets(a), _targets(b)):
            assert torch.equal(x, y.cpu())
        assert torch.allclose(a.affine, b.affine.cpu(), atol=1e-3)
        diff = (denormalise(a.image) - denormalise(b.image.cpu())).abs()
        assert diff.mean() < 1.5  # 0-255: different JPEG decoders + bilinear rounding


def test_dali_graph_agrees_with_torch_loader(shards):
    """The CPU graph without CUDA, the GPU graph (nvJPEG, GPU warp) with it."""
    from pnfs.data.loaders.dali_loader import dali_available

    ok, why = dali_available()
    if not ok:
        pytest.skip(why)
    ref, got = _loader_outputs(shards, "torch"), _loader_outputs(shards, "dali")
    assert [len(b) for b in ref] == [len(b) for b in got]
    for a, b in zip(ref, got):
        b = b.to("cpu")
        assert torch.equal(a.ann_id, b.ann_id) and torch.equal(a.image_id, b.image_id)
        assert (a.keypoints - b.keypoints).abs().max() <= 0.05
        (ta, wa), (tb, wb) = _targets(a), _targets(b)
        assert torch.equal(wa, wb) and (ta - tb).abs().max() < 0.02  # 0.05 px moves a σ=2 peak < 0.01
        assert torch.allclose(a.affine, b.affine, atol=1e-3)
        assert (denormalise(a.image) - denormalise(b.image)).abs().mean() < 1.5


def test_dali_train_order_is_seeded_per_epoch(shards):
    from pnfs.data.loaders.dali_loader import dali_available

    if not dali_available()[0]:
        pytest.skip(dali_available()[1])
    cfg = _cfg(shards, loader="dali")
    first = _ids(build_loader(cfg, "train", epoch=0))
    assert len(first) == (30 // 4) * 4
    assert first == _ids(build_loader(cfg, "train", epoch=0))
    assert first != _ids(build_loader(cfg, "train", epoch=1))
    assert _ids(build_loader(cfg, "train", epoch=0, start_sample=5)) == first[5 : len(first)]


def _dali_val_loader(shards, **kwargs):
    from pnfs.data.loaders.dali_loader import DaliPoseLoader

    cfg = _cfg(shards, loader="dali", size=(128, 96))
    shard_set = ShardSet.open(shard_paths(cfg, "val"))
    plan = make_epoch_plan(
        cfg,
        "val",
        shard_set.counts,
        rank=0,
        world_size=1,
        epoch=0,
        start_sample=0,
        batch_size=4,
        augment=True,
    )
    return DaliPoseLoader(
        shard_set, plan, split="val", batch_size=4, rank=0, world_size=1, seed=0, epoch=0,
        start_sample=0, num_threads=1, input_size=(128, 96), margin=cfg.data.margin,
        flip_perm=COCO.flip_permutation(), **kwargs,
    )  # fmt: skip


def test_dali_batches_are_converted_by_the_plugin_iterator_on_the_cpu_graph_too(shards, monkeypatch):
    """The one conversion path a GPU graph takes (DALIGenericIterator) also carries the CPU
    graph: every batch's pixels and ids are the plugin's tensors, typed from DALI's dtypes."""
    from pnfs.data.loaders.dali_loader import OUTPUTS, dali_available

    if not dali_available()[0]:
        pytest.skip(dali_available()[1])
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    seen: list[dict[str, torch.Tensor]] = []
    handed: list[object] = []
    plugin_next = DALIGenericIterator.__next__

    def spy(self):  # (the iterator's prefetched first batch passes through here twice)
        out = plugin_next(self)
        if not any(out is h for h in handed):
            handed.append(out)
            seen.append({k: v.clone() for k, v in out[0].items()})
        return out

    monkeypatch.setattr(DALIGenericIterator, "__next__", spy)
    batches = list(_dali_val_loader(shards, device="cpu"))
    assert len(seen) >= len(batches) == 4  # 14 val samples in batches of 4: 4, 4, 4, 2
    dtypes = dict(image=torch.float32, xy=torch.float32, kp=torch.float32, to_input=torch.float32,
                  score=torch.float32, ids=torch.int64, aug=torch.float32)  # fmt: skip
    for out in seen:
        assert tuple(out) == OUTPUTS
        assert {k: v.dtype for k, v in out.items()} == dtypes
        assert all(v.device.type == "cpu" for v in out.values())
    images = torch.cat([o["image"] for o in seen])
    ids = torch.cat([o["ids"] for o in seen])
    n = 0
    for b in batches:
        assert torch.equal(b.image, images[n : n + len(b)])
        assert torch.equal(b.image_id, ids[n : n + len(b), 0]) and torch.equal(
            b.ann_id, ids[n : n + len(b), 1]
        )
        n += len(b)


def test_dali_batches_are_the_graphs_outputs_not_copies(shards, monkeypatch):
    """A plan batch cut from one graph batch is that batch's image tensor (or a slice of it: the
    short last one), not a concatenation with the empty remainder of the batch before."""
    from pnfs.data.loaders.dali_loader import dali_available

    if not dali_available()[0]:
        pytest.skip(dali_available()[1])
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    images: list[torch.Tensor] = []
    plugin_next = DALIGenericIterator.__next__

    def spy(self):
        out = plugin_next(self)
        if not any(out[0]["image"] is i for i in images):
            images.append(out[0]["image"])
        return out

    monkeypatch.setattr(DALIGenericIterator, "__next__", spy)
    batches = list(_dali_val_loader(shards, device="cpu"))
    assert [len(b) for b in batches] == [4, 4, 4, 2]
    assert [b.image.data_ptr() for b in batches] == [i.data_ptr() for i in images[:4]]


def test_dali_cpu_outputs_reach_a_batch_on_another_device(shards):
    """A GPU graph's keypoints/matrices/ids are CPU outputs that must reach the batch's device:
    the same code moves a CPU graph's outputs to a stand-in device (meta) here."""
    from pnfs.data.loaders.dali_loader import dali_available

    if not dali_available()[0]:
        pytest.skip(dali_available()[1])
    ref = list(_dali_val_loader(shards, device="cpu"))
    got = list(_dali_val_loader(shards, device="meta"))
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        for name in ("image", "keypoints", "affine", "image_id", "ann_id", "score"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.device.type == "cpu" and y.device.type == "meta", name
            assert (x.shape, x.dtype) == (y.shape, y.dtype), name


@pytest.mark.gpu
def test_dali_gpu_graph_puts_images_on_the_gpu_and_the_rest_on_the_cpu_then_all_on_cuda(shards, monkeypatch):
    from pnfs.data.loaders.dali_loader import dali_available

    if not dali_available()[0]:
        pytest.skip(dali_available()[1])
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    devices: list[dict[str, str]] = []
    plugin_next = DALIGenericIterator.__next__

    def spy(self):
        out = plugin_next(self)
        devices.append({k: v.device.type for k, v in out[0].items()})
        return out

    monkeypatch.setattr(DALIGenericIterator, "__next__", spy)
    got = list(_dali_val_loader(shards, device="cuda"))
    ref = list(_dali_val_loader(shards, device="cpu"))
    assert devices and all(d.pop("image") == "cuda" and set(d.values()) == {"cpu"} for d in devices)
    for a, b in zip(ref, got, strict=True):
        assert all(getattr(b, f).device.type == "cuda" for f in ("image", "keypoints", "affine", "score"))
        b = b.to("cpu")
        assert torch.equal(a.ann_id, b.ann_id) and (a.keypoints - b.keypoints).abs().max() <= 1e-4
        assert (denormalise(a.image) - denormalise(b.image)).abs().mean() < 1.5  # nvJPEG vs libjpeg


@pytest.mark.gpu
def test_dali_gpu_batches_reach_cuda_by_pinned_asynchronous_copies(shards, monkeypatch):
    """The GPU graph's host outputs (keypoints, matrices, ids, scores) are copied to the GPU from
    page-locked memory with ``non_blocking``: no copy that makes the host wait each batch."""
    from pnfs.data.loaders.dali_loader import dali_available

    if not dali_available()[0]:
        pytest.skip(dali_available()[1])
    copies: list[tuple[bool, bool]] = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type == "cuda":
            copies.append((self.is_pinned(), bool(kwargs.get("non_blocking", False))))
        return out

    loader = _dali_val_loader(shards, device="cuda")
    monkeypatch.setattr(torch.Tensor, "to", spy)
    batches = list(loader)
    assert len(batches) == 4 and len(copies) >= 4 * 5  # five host fields per batch
    assert all(pinned and non_blocking for pinned, non_blocking in copies), copies


def test_augmented_grid_png_and_flip_swaps_joints_with_the_pixels(shards, tmp_path):
    """Draws augmented samples with skeletons (look at augmented_grid.png) and checks flips.

    Synthetic people are drawn facing the camera with blue left limbs and orange right limbs.
    A mirrored picture shows a person whose *right* side is blue, so after flip + joint swap
    the joint named left_* must sit on orange exactly on the flipped samples, on blue otherwise.
    """
    cfg = _cfg(shards, size=(128, 96), **{"data.flip_prob": 0.5})
    shard_set = ShardSet.open(shard_paths(cfg, "train"))
    plan = make_epoch_plan(cfg, "train", shard_set.counts, rank=0, world_size=1, epoch=0, start_sample=0,
                     batch_size=4, augment=True)  # fmt: skip
    flipped = np.concatenate([a.flip for a in plan.augment])
    tiles, agree = [], []
    n = 0
    for batch in build_loader(cfg, "train", epoch=0):
        images = denormalise(batch.image).clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        for img, kp in zip(images, batch.keypoints.numpy()):
            for side, (elbow, wrist) in enumerate(((7, 9), (8, 10))):
                if kp[elbow, 2] > 0 and kp[wrist, 2] > 0:
                    x, y = ((kp[elbow, :2] + kp[wrist, :2]) / 2).round().astype(int)
                    r, _, b = img[y, x].astype(int)
                    if abs(b - r) > 60:  # clearly blue or clearly orange (not occluded)
                        named_left_on_blue = (b > r) == (side == 0)
                        agree.append((bool(flipped[n]), named_left_on_blue != flipped[n]))
            tile = np.ascontiguousarray(img[:, :, ::-1])
            for a, b in COCO.skeleton:
                if kp[a, 2] > 0 and kp[b, 2] > 0:
                    pa, pb = tuple(kp[a, :2].round().astype(int)), tuple(kp[b, :2].round().astype(int))
                    cv2.line(tile, pa, pb, (0, 255, 0), 1, cv2.LINE_AA)
            for j, (x, y, w) in enumerate(kp):
                if w > 0:  # left joints red, right joints yellow (BGR)
                    colour = (0, 0, 255) if j in (1, 3, 5, 7, 9, 11, 13, 15) else (0, 255, 255)
                    cv2.circle(tile, (round(float(x)), round(float(y))), 2, colour, -1)
            tiles.append(tile)
            n += 1
    rows = [np.hstack(tiles[i : i + 7]) for i in range(0, 28, 7)]
    path = tmp_path / "augmented_grid.png"
    assert cv2.imwrite(str(path), np.vstack(rows))
    print(f"augmented grid: {path}")
    assert 0 < flipped[:n].sum() < n and len(agree) >= 10
    # overlapping people can cover a forearm with someone else's limb: a few disagree
    for state in (False, True):
        hits = [ok for f, ok in agree if f == state]
        print(f"flipped={state}: {np.mean(hits):.2f} of {len(hits)} forearms agree")
        assert len(hits) >= 5 and np.mean(hits) > 0.75


def test_targets_from_a_loader_batch(shards):
    batch = next(iter(build_loader(_cfg(shards), "train")))
    targets, weights = gaussian_targets(batch.keypoints, (16, 16), sigma=2.0)
    assert targets.shape == (4, 17, 16, 16) and weights.shape == (4, 17)
    on = weights > 0
    peak = targets.flatten(2).argmax(-1)
    u = (batch.keypoints[..., 0] / 4).round().clamp(0, 15)
    v = (batch.keypoints[..., 1] / 4).round().clamp(0, 15)
    assert torch.equal(peak[on], (v * 16 + u).long()[on])


def test_a_loader_with_workers_puts_opencv_on_one_thread_before_they_fork():
    """A fork taken after OpenCV's thread pool ran in the parent (e.g. overlays drawn after an
    evaluation) can hang the worker's first cv2 call: a DataLoader of cv2.warpAffine calls
    forked after a 1500x1500 warpAffine in the parent hung in 1 of 2 runs without this. So
    every loader with workers sets the parent to one OpenCV thread before forking."""
    threads = cv2.getNumThreads()
    try:
        cv2.setNumThreads(2)
        PoseLoader(torch.utils.data.TensorDataset(torch.zeros(2)), num_workers=0)
        assert cv2.getNumThreads() == 2  # no workers, no fork: OpenCV keeps its threads
        PoseLoader(torch.utils.data.TensorDataset(torch.zeros(2)), num_workers=1)
        assert cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(threads)


# ----------------------------------------------------------------------------- build-mutant tests
# (issue 26 part 6: build.py under mutation, docs/testing.md): the shard keys per split, the
# plan's arguments from the config, every refusal by its whole message, and what build_loader
# hands each loader.


def test_shard_paths_take_the_splits_own_key_or_the_override(shards):
    one = str(shards / "train-000001.tar")
    cfg = load_config(None, [f"data.train_shards={one}", f"data.val_shards={shards}"])
    assert shard_paths(cfg, "train") == [one]
    # a folder gives the split's own shards (3 of the 8 there)
    assert shard_paths(cfg, "val") == [str(shards / f"val-00000{i}.tar") for i in range(3)]
    assert shard_paths(cfg, "val", shards=[one]) == [one]
    empty = load_config(None, [])
    assert shard_paths(empty, "train", shards=one) == [one]


@pytest.mark.parametrize("split", ["train", "val"])
def test_shard_paths_name_the_empty_key_of_the_split(shards, split):
    other = "val" if split == "train" else "train"
    cfg = load_config(None, [f"data.{other}_shards={shards}"])
    with pytest.raises(ValueError) as e:
        shard_paths(cfg, split)
    assert str(e.value) == f"data.{split}_shards is empty: no shards for '{split}'"


_PLAN_KEYS = ["train.seed=7", "data.num_workers=3", "data.rotation=30", "data.scale_range=[0.8,1.2]",
              "data.flip_prob=0.3"]  # fmt: skip


def _same_plan(a, b) -> None:
    assert len(a) == len(b) and len(a.augment) == len(b.augment)
    for x, y in zip(a.batches, b.batches):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a.augment, b.augment):
        for name in ("scale", "rotation", "flip"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))


def test_make_epoch_plan_hands_the_config_to_the_train_plan():
    counts = [7, 9, 8, 6, 5]
    cfg = load_config(None, _PLAN_KEYS)
    got = make_epoch_plan(cfg, "train", counts, rank=1, world_size=2, epoch=5, start_sample=4, batch_size=3,
                          augment=True)  # fmt: skip
    want = train_plan(counts, 3, seed=7, epoch=5, rank=1, world_size=2, workers=3, start_sample=4,
                      rotation=30.0, scale_range=(0.8, 1.2), flip_prob=0.3, augment=True)  # fmt: skip
    _same_plan(got, want)
    scales = np.concatenate([a.scale for a in got.augment])
    assert (
        scales.min() >= 0.8
        and scales.max() <= 1.2
        and np.abs(np.concatenate([a.rotation for a in got.augment])).max() <= 30
    )
    plain = make_epoch_plan(cfg, "train", counts, rank=1, world_size=2, epoch=5, start_sample=4, batch_size=3,
                            augment=False)  # fmt: skip
    assert all((a.scale == 1).all() and (a.rotation == 0).all() and not a.flip.any() for a in plain.augment)


def test_make_epoch_plan_reads_with_one_worker_when_the_config_has_none():
    counts = [7, 9, 8, 6, 5]
    cfg = load_config(None, ["data.num_workers=0"])
    got = make_epoch_plan(cfg, "train", counts, rank=0, world_size=1, epoch=2, start_sample=0, batch_size=4,
                          augment=True)  # fmt: skip
    _same_plan(got, train_plan(counts, 4, seed=cfg.train.seed, epoch=2, workers=1))
    assert not _flat_equal(got, train_plan(counts, 4, seed=cfg.train.seed, epoch=2, workers=2))


def _flat_equal(a, b) -> bool:
    return [tuple(r) for x in a.batches for r in x.tolist()] == [
        tuple(r) for x in b.batches for r in x.tolist()
    ]


def test_make_epoch_plan_hands_the_config_to_the_val_plan():
    counts = [7, 9, 8]
    cfg = load_config(None, _PLAN_KEYS)
    got = make_epoch_plan(cfg, "val", counts, rank=1, world_size=3, epoch=5, start_sample=2, batch_size=3,
                          augment=True)  # fmt: skip
    want = val_plan(counts, 3, rank=1, world_size=3, start_sample=2, augment=True, seed=7, epoch=5,
                    rotation=30.0, scale_range=(0.8, 1.2), flip_prob=0.3)  # fmt: skip
    _same_plan(got, want)
    # samples 8..15 of the 24 (rank 1 of 3: shard 1 from sample 1), from the third on
    assert [tuple(r) for b in got.batches for r in b.tolist()] == [(1, i) for i in range(3, 9)]


def test_build_loader_refuses_another_split_and_a_rank_outside_the_world(shards):
    cfg = _cfg(shards)
    with pytest.raises(ValueError) as e:
        build_loader(cfg, "test")
    assert str(e.value) == "split must be 'train' or 'val', got 'test'"
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError) as e:
            build_loader(cfg, "val", rank=rank, world_size=world)
        assert str(e.value) == f"rank {rank} outside world_size {world}"
    assert len(build_loader(cfg, "val", rank=1, world_size=2)) == 2  # the last rank is inside


def test_dali_refuses_urls_without_a_cache_dir_naming_the_first():
    cfg = load_config(None, ["data.loader=dali", "data.val_shards=http://host/val-{000000..000001}.tar"])
    with pytest.raises(ValueError) as e:
        build_loader(cfg, "val")
    assert str(e.value) == (
        "data.loader=dali reads local files only, but data.val_shards names URLs "
        "(http://host/val-000000.tar): set data.cache_dir to a local folder (the shards are copied "
        "there once per node) or use data.loader=torch"
    )


def test_shards_of_another_joint_count_are_refused_naming_the_shard(shards):
    cfg = _cfg(shards, **{"data.dataset": "mpii"})
    with pytest.raises(ValueError) as e:
        build_loader(cfg, "val")
    assert (
        str(e.value) == f"{shards / 'val-000000.tar'}: samples have 17 joints but data.dataset='mpii' has 16"
    )


def test_batch_size_and_augmentation_default_by_split(shards):
    cfg = _cfg(shards, **{"train.batch_size": 3, "eval.batch_size": 5})
    assert [len(b) for b in build_loader(cfg, "val")] == [5, 5, 4]
    assert [len(b) for b in build_loader(cfg, "val", batch_size=6)] == [6, 6, 2]
    assert len(build_loader(cfg, "train")) == 30 // 3 and len(next(iter(build_loader(cfg, "train")))) == 3
    val = torch.cat([b.affine for b in build_loader(cfg, "val")])
    torch.testing.assert_close(val, torch.cat([b.affine for b in build_loader(cfg, "val", augment=False)]))
    assert not torch.allclose(val, torch.cat([b.affine for b in build_loader(cfg, "val", augment=True)]))
    train = torch.cat([b.affine for b in build_loader(cfg, "train")])
    torch.testing.assert_close(train, torch.cat([b.affine for b in build_loader(cfg, "train", augment=True)]))
    assert not torch.allclose(train, torch.cat([b.affine for b in build_loader(cfg, "train", augment=False)]))


def _dataset_settings(loader) -> tuple:
    """(input size, margin, flip permutation, bad-sample policy) of a loader's data set."""
    ds = loader.dataset
    return ds.input_size, ds.margin, ds.flip_perm, ds.on_error


def test_the_loaders_get_the_configs_geometry_workers_and_policy(shards):
    cfg = _cfg(shards, workers=2, size=(128, 96), **{"data.margin": 1.5, "data.on_error": "raise"})
    torch_loader = build_loader(cfg, "val")
    assert _dataset_settings(torch_loader) == ((128, 96), 1.5, COCO.flip_permutation(), "raise")
    assert torch_loader.num_workers == 2 and torch_loader.loader.num_workers == 2
    assert torch_loader.loader.pin_memory is torch.cuda.is_available()
    gpu = build_loader(_cfg(shards, loader="gpu", workers=2, size=(128, 96), **{"data.margin": 1.5}), "val")
    assert _dataset_settings(gpu) == ((128, 96), 1.5, COCO.flip_permutation(), "skip")
    assert gpu.loader.num_workers == 2
    assert type(gpu).__name__ == "GpuPoseLoader" and type(torch_loader).__name__ == "PoseLoader"


def test_an_unknown_loader_is_refused_by_name(shards):
    cfg = _cfg(shards)
    cfg.data.loader = "cv"
    with pytest.raises(ValueError) as e:
        build_loader(cfg, "val")
    assert str(e.value) == "data.loader: unknown loader 'cv'"


def _truncated_copy(shards: Path, folder: Path) -> list[str]:
    """The train shards with train-000002.tar cut inside its sample 4's JPEG: samples 4 and 5
    are lost; returns their keys."""
    folder.mkdir()
    for p in shards.glob("train-*"):
        (folder / p.name).write_bytes(p.read_bytes())
    for p in shards.glob("*.json"):
        (folder / p.name).write_bytes(p.read_bytes())
    shard = folder / "train-000002.tar"
    index = ShardSet.open([str(shard)]).index[0]
    off, size = index[4][1]["jpg"]
    with open(shard, "r+b") as f:
        f.truncate(off + size // 2)
    return [index[4][0], index[5][0]]


def test_dropped_samples_are_logged_counted_or_raised(shards, tmp_path, caplog):
    lost = _truncated_copy(shards, tmp_path / "cut")
    cut = str(tmp_path / "cut" / "train-000002.tar")
    with caplog.at_level(logging.WARNING, logger="pnfs.train"):
        loader = build_loader(
            _cfg(shards, **{"data.max_bad_samples": 5}), "train", shards=str(tmp_path / "cut")
        )
    report = loader.bad_samples
    assert report.limit == 5 and report.counts == {"truncated_shard": 2}
    assert [(s.reason, s.shard, s.key) for s in report.samples] == [("truncated_shard", cut, k) for k in lost]
    dropped = [
        (r.name, r.getMessage()) for r in caplog.records if r.getMessage().startswith("bad sample dropped: ")
    ]
    assert dropped == [("pnfs.train", f"bad sample dropped: {s}") for s in report.samples]
    assert len(loader) == 28 // 4
    # the default limit: 0.1% of the 28 samples planned, at least 1; 2 dropped samples pass it
    with pytest.raises(BadSampleError, match=r"2 bad samples, more than data\.max_bad_samples=1"):
        build_loader(_cfg(shards), "train", shards=str(tmp_path / "cut"))
    with pytest.raises(BadSampleError) as e:
        build_loader(_cfg(shards, **{"data.on_error": "raise"}), "train", shards=str(tmp_path / "cut"))
    first = ShardSet.open([cut]).dropped[0]
    assert str(e.value) == f"{first} (data.on_error=raise; skip drops such samples)"
    gpu = build_loader(
        _cfg(shards, loader="gpu", **{"data.max_bad_samples": 5}), "train", shards=str(tmp_path / "cut")
    )
    assert gpu.bad_samples.counts == {"truncated_shard": 2} and gpu.bad_samples.limit == 5
    with pytest.raises(BadSampleError) as e:
        build_loader(
            _cfg(shards, loader="dali", **{"data.max_bad_samples": 5}), "train", shards=str(tmp_path / "cut")
        )
    assert str(e.value) == (
        f"data.loader=dali reads every sample its .idx lists and cannot drop {first}; "
        "re-copy the shard or use data.loader=torch"
    )


def test_a_shard_that_does_not_match_its_manifest_is_logged(shards, tmp_path, caplog):
    _truncated_copy(shards, tmp_path / "cut")
    with caplog.at_level(logging.WARNING, logger="pnfs.train"):
        build_loader(_cfg(shards, **{"data.max_bad_samples": 5}), "train", shards=str(tmp_path / "cut"))
    problems = [r.getMessage() for r in caplog.records if "manifest" in r.getMessage()]
    assert len(problems) == 1 and [r.name for r in caplog.records if "manifest" in r.getMessage()] == [
        "pnfs.train"
    ]
    assert problems[0].startswith(
        f"shard does not match its manifest: {tmp_path / 'cut' / 'train-000002.tar'}"
    )


def test_a_limit_of_zero_bad_samples_is_kept_not_the_default(shards, tmp_path):
    _truncated_copy(shards, tmp_path / "cut")
    with pytest.raises(BadSampleError, match=r"1 bad samples, more than data\.max_bad_samples=0"):
        build_loader(_cfg(shards, **{"data.max_bad_samples": 0}), "train", shards=str(tmp_path / "cut"))


def test_urls_are_copied_into_data_cache_dir(shards, tmp_path):
    """``pipe:`` URLs (read here with cat) are copied once into data.cache_dir; DALI reads them
    from there too, so with a cache_dir it does not refuse URLs."""
    urls = f"pipe:cat {shards}/val-{{000000..000002}}.tar"
    cache = tmp_path / "cache"
    loader = build_loader(_cfg(shards, **{"data.val_shards": urls, "data.cache_dir": str(cache)}), "val")
    assert len(sorted(cache.glob("*.tar"))) == 3
    assert sum(len(b) for b in loader) == 14
    dali = build_loader(
        _cfg(shards, loader="dali", **{"data.val_shards": urls, "data.cache_dir": str(cache)}), "val"
    )
    assert len(dali) == 4


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"data.scale_range": "[0.7,1.6]"}, "data.scale_range=[0.7, 1.6]"),
        ({"data.input_size": "[64,128]"}, "data.input_size=[64, 128]"),
    ],
)
def test_a_config_beyond_the_shards_coverage_warns_naming_its_key(shards, keys, named):
    cfg = load_config(None, [f"data.val_shards={shards}"] + [f"{k}={v}" for k, v in keys.items()])
    with pytest.warns(UserWarning, match=re.escape(named)):
        build_loader(cfg, "val")


def test_the_joint_count_is_read_from_the_first_sample_of_the_first_shard_with_samples(shards, tmp_path):
    """An empty shard is passed over; a shard of one sample is read (its sample 0); only the first
    shard with samples is read: a later shard of 3 joints is not checked (a loader would refuse
    its arrays as bad samples, docs/data.md)."""
    from pnfs.data.loaders.build import _check_joints
    from tests.data.loaders.test_plan_reader import sample, write_shard

    val = ShardSet.open([str(shards / "val-000000.tar")])
    one = write_shard(tmp_path / "one.tar", [val.read_present(0, 0, tuple(val.index[0][0][1]))])
    empty = write_shard(tmp_path / "empty.tar", [])
    three = write_shard(tmp_path / "three.tar", [sample(0), sample(1)])
    assert ShardSet.open([one]).counts == [1] and ShardSet.open([empty]).counts == [0]
    assert _check_joints(ShardSet.open([empty, one, three]), 17, "coco") is None
    with pytest.raises(ValueError) as e:
        _check_joints(ShardSet.open([empty, one]), 14, "crowdpose")
    assert str(e.value) == f"{one}: samples have 17 joints but data.dataset='crowdpose' has 14"
    with pytest.raises(ValueError, match=r"three\.tar: samples have 3 joints"):
        _check_joints(ShardSet.open([empty, three, one]), 17, "coco")


def test_the_defaults_are_rank_0_of_1_epoch_0_from_the_start(shards):
    cfg = _cfg(shards)
    explicit = _ids(build_loader(cfg, "train", rank=0, world_size=1, epoch=0, start_sample=0))
    assert _ids(build_loader(cfg, "train")) == explicit
    assert explicit != _ids(build_loader(cfg, "train", epoch=1))


def test_data_verify_shards_compares_each_shards_sha256(shards, tmp_path, caplog):
    """One bit of one keypoint changed, the size kept: only data.verify_shards=true names it."""
    folder = tmp_path / "val"
    folder.mkdir()
    for p in [*shards.glob("val-*"), *shards.glob("*.json")]:
        (folder / p.name).write_bytes(p.read_bytes())
    shard = folder / "val-000001.tar"
    offset, _ = ShardSet.open([str(shard)]).index[0][0][1]["kp.f32"]
    raw = bytearray(shard.read_bytes())
    raw[offset] ^= 0x01
    shard.write_bytes(bytes(raw))
    for verify in (False, True):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pnfs.train"):
            build_loader(_cfg(shards, **{"data.val_shards": folder, "data.verify_shards": verify}), "val")
        named = [r.getMessage() for r in caplog.records if "sha256 differs" in r.getMessage()]
        assert len(named) == int(verify) and all("val-000001.tar" in m for m in named)


def test_dali_gets_the_rank_the_world_and_a_thread_per_worker(shards):
    """Val: rank r of 2 reads the same samples with DALI as with the torch loader; the graph runs
    on data.num_workers threads, at least one."""
    from pnfs.data.loaders.dali_loader import dali_available

    if not dali_available()[0]:
        pytest.skip(dali_available()[1])
    for rank in range(2):
        dali = _ids(build_loader(_cfg(shards, loader="dali"), "val", rank=rank, world_size=2))
        assert dali == _ids(build_loader(_cfg(shards), "val", rank=rank, world_size=2)) and len(dali) == 7
    assert build_loader(_cfg(shards, loader="dali", workers=0), "val").pipe.num_threads == 1
    assert build_loader(_cfg(shards, loader="dali", workers=3), "val").pipe.num_threads == 3


def test_the_gpu_loader_gets_data_on_error(shards):
    gpu = build_loader(_cfg(shards, loader="gpu", **{"data.on_error": "raise"}), "val")
    assert gpu.dataset.on_error == "raise"


def test_the_torch_loader_pins_its_batches_where_cuda_is(shards, monkeypatch):
    """Page-locked batches exactly when CUDA is there (the trainer's non-blocking copies); CUDA is
    stood in for by ``torch.cuda.is_available``: the loader is built, not iterated."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert build_loader(_cfg(shards), "val").loader.pin_memory is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert build_loader(_cfg(shards), "val").loader.pin_memory is False
