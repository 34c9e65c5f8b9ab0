"""Options set the way a user sets them (issue 26): a config override on a launch script's
command line, then the effect on what the product writes."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pnfs.config import load_config
from pnfs.data.loaders.build import build_loader
from pnfs.evaluate.loading import load_for_inference
from pnfs.inference import predict, predict_scores
from pnfs.model import build_model
from tests.launch.test_export import _onnx_run, checkpoint, crops, export_cli  # noqa: F401  (module fixtures)
from tests.support.engine import TINY_OVERRIDES, tiny_dataset


def test_export_decodes_with_eval_refine_gaussian_like_predict(checkpoint, crops, tmp_path):  # noqa: F811
    """``launch/export.py --decode eval.refine=gaussian``: onnxruntime gives what ``predict`` gives
    with the Gaussian refinement, not the quarter offset."""
    out = tmp_path / "gaussian.onnx"
    argv = ["--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out), "--decode"]
    assert export_cli.main([*argv, "eval.refine=gaussian"]) == 0
    images, affine = crops
    keypoints, _ = _onnx_run(out, images, affine)

    model, _ = load_for_inference(checkpoint)
    gaussian = predict(model, images, affine, refine="gaussian").keypoints.numpy()
    quarter = predict(model, images, affine, refine="quarter").keypoints.numpy()
    top2 = predict_scores(model, images).flatten(2).topk(2, dim=-1).values
    clear = ((top2[..., 0] - top2[..., 1]) > 1e-5).numpy()
    apart = np.abs(gaussian - quarter).max(-1) > 1.0  # joints where the two decodings disagree
    assert (clear & apart).sum() >= 10, "the two refinements agree here: the test would prove nothing"
    distance = np.abs(keypoints - gaussian).max(-1)
    assert distance[clear].max() <= 0.5, (
        f"export is off the Gaussian decoding by {distance[clear].max():.2f} px"
    )


# --------------------------------------------------------------------------- model.* keys


def demo_model(*overrides: str):
    return build_model(load_config("demo", ["data.input_size=[64,64]", *overrides]))


def test_model_channel_keys_set_the_widths_of_the_built_model():
    """model.channels C: a node at 1/s has C*s channels; model.backbone.fabric_channels F likewise
    in the backbone's fabric, whose stem is model.backbone.fabric_stem_channels wide."""
    model = demo_model(
        "model.channels=5", "model.backbone.fabric_channels=3", "model.backbone.fabric_stem_channels=16"
    )
    assert model.parts[0].fabric.cells["l1_s4"].output.out_channels == 5 * 4
    assert model.parts[0].fabric.cells["l1_s8"].output.out_channels == 5 * 8
    assert model.backbone.fabric.cells["l3_s32"].output.out_channels == 3 * 32
    assert model.backbone.stem[0].out_channels == 16


def test_hidden_node_keys_set_the_cells_and_their_alpha_rows():
    """H hidden nodes: H(H+1)/2 edges, one alpha row each (paper eq. (2))."""
    model = demo_model("model.hidden_nodes=3", "model.backbone.fabric_hidden_nodes=2")
    assert all(c.hidden_nodes == 3 for p in model.parts for c in p.fabric.cells.values())
    assert model.parts[0].fabric.alpha.shape[0] == 6
    assert model.backbone.fabric.alpha.shape[0] == 3


def test_model_ops_are_the_ops_on_every_edge():
    from pnfs.model.ops import PoolBN

    model = demo_model("model.ops=[zero,skip_connect,max_pool_3x3]")
    cell = model.parts[0].fabric.cells["l1_s4"]
    kinds = [[type(op).__name__ for op in edge] for edge in cell.edge_ops]
    assert kinds == [["Identity", "PoolBN"]]
    assert isinstance(cell.edge_ops[0][1][0], torch.nn.MaxPool2d) and isinstance(cell.edge_ops[0][1], PoolBN)
    assert model.parts[0].fabric.alpha.shape == (1, 3)


# --------------------------------------------------------------------------- data.* keys


def tiny_cfg(tmp_path_factory, *overrides: str):
    data = tiny_dataset(tmp_path_factory)
    return load_config(None, [*TINY_OVERRIDES, *data["overrides"], *overrides])


def affines(cfg, split="train", **kw) -> torch.Tensor:
    return torch.cat([b.affine for b in build_loader(cfg, split, epoch=0, **kw)])


def test_augmentation_keys_shape_the_training_crops(tmp_path_factory):
    """data.rotation=0, data.scale_range=[1,1], data.flip_prob=0: the training crops are the plain
    crops; flip_prob=1 mirrors every one (det < 0); rotation=90 turns some past 45 degrees."""
    still = ["data.rotation=0", "data.scale_range=[1.0,1.0]"]
    plain = affines(tiny_cfg(tmp_path_factory, *still, "data.flip_prob=0"), augment=False)
    none = affines(tiny_cfg(tmp_path_factory, *still, "data.flip_prob=0"))
    torch.testing.assert_close(none, plain, rtol=0, atol=1e-5)
    flipped = affines(tiny_cfg(tmp_path_factory, *still, "data.flip_prob=1"))
    assert (torch.linalg.det(flipped[:, :, :2]) < 0).all() and (torch.linalg.det(plain[:, :, :2]) > 0).all()
    turned = affines(tiny_cfg(tmp_path_factory, "data.rotation=90", "data.flip_prob=0"))
    angles = torch.rad2deg(torch.atan2(turned[:, 1, 0], turned[:, 0, 0])).abs()
    assert angles.max() > 45 and angles.max() <= 90 + 1e-3


def test_data_margin_scales_the_crop_around_the_box(tmp_path_factory):
    """The crop side is margin x the box: the input-to-image scale grows by 1.5 / 1.25 from 1.25 to 1.5."""
    a = affines(tiny_cfg(tmp_path_factory, "data.margin=1.25"), "val")
    b = affines(tiny_cfg(tmp_path_factory, "data.margin=1.5"), "val")
    scale = lambda m: torch.linalg.det(m[:, :, :2]).abs().sqrt()
    torch.testing.assert_close(scale(b) / scale(a), torch.full((len(a),), 1.5 / 1.25), rtol=1e-5, atol=0)


@pytest.mark.parametrize("workers", [0, 5, 6, 7])
def test_worker_counts_around_the_number_of_shards_fill_every_batch(tmp_path_factory, workers):
    """data.num_workers below, at and above the 6 training shards: 12 full batches holding each of
    the 48 people once, also where the workers cannot share the shards evenly (5, 7): a worker
    whose shards are short reads the rest of another's (pnfs/data/plan.py train_plan)."""
    batches = list(build_loader(tiny_cfg(tmp_path_factory, f"data.num_workers={workers}"), "train", epoch=0))
    assert [len(b.ann_id) for b in batches] == [4] * 12
    ids = [int(i) for b in batches for i in b.ann_id]
    people = {int(i) for b in build_loader(tiny_cfg(tmp_path_factory), "train", epoch=0) for i in b.ann_id}
    assert len(people) == 48 and sorted(ids) == sorted(people)


@pytest.mark.parametrize("batch_size, batches", [(11, 2), (12, 1), (13, 1), (4, 3)])
def test_eval_batch_size_against_the_12_val_people(tmp_path_factory, batch_size, batches):
    cfg = tiny_cfg(tmp_path_factory, f"eval.batch_size={batch_size}")
    loader = build_loader(cfg, "val")
    got = list(loader)
    assert len(loader) == len(got) == batches
    assert sorted(int(i) for b in got for i in b.ann_id) == sorted({int(i) for b in got for i in b.ann_id})
    assert sum(len(b.ann_id) for b in got) == 12


def test_verify_shards_names_a_shard_whose_bytes_changed_but_not_its_size(tmp_path_factory, tmp_path, caplog):
    """data.verify_shards=true: a shard whose sha256 differs from manifest.json is named; without
    it only sizes are compared, and an equal-size change passes unseen."""
    from pnfs.data.shards.reader import read_index

    data = tiny_dataset(tmp_path_factory)
    folder = tmp_path / "val"
    shutil.copytree(data["shards"] / "val", folder)
    shard = folder / "val-000001.tar"
    offset, _ = read_index(shard)[0][1]["kp.f32"]
    raw = bytearray(shard.read_bytes())
    raw[offset] ^= 0x01  # one bit of one keypoint coordinate: same size, other sha256
    shard.write_bytes(bytes(raw))
    for verify, named in (("false", False), ("true", True)):
        caplog.clear()
        cfg = tiny_cfg(tmp_path_factory, f"data.val_shards={folder}", f"data.verify_shards={verify}")
        with caplog.at_level(logging.WARNING, logger="pnfs.train"):
            build_loader(cfg, "val")
        assert any("val-000001.tar: sha256 differs" in r.getMessage() for r in caplog.records) == named
        assert not any("val-000000.tar" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- train.* keys


def test_a_run_logs_checkpoints_and_decays_the_lr_as_its_keys_say(tmp_path_factory, tmp_path):
    """Two epochs of 5 steps. train.log_every=3 logs steps 3, 6, 9, plus every checkpoint step and
    each epoch's end; train.checkpoint_every=2 saves at steps 2, 4, 6, 8 (and the epoch ends 5, 10);
    train.keep_last=2 leaves 8 and 10; lr_milestones=[1], lr_factor=0.5: 1e-3 then 5e-4."""
    from pnfs.engine.trainer import run_training

    out = tmp_path / "run"
    cfg = tiny_cfg(
        tmp_path_factory,
        "train.epochs=2",
        "train.max_steps_per_epoch=5",
        "train.log_every=3",
        "train.checkpoint_every=2",
        "train.keep_last=2",
        "train.lr=1e-3",
        "train.lr_milestones=[1]",
        "train.lr_factor=0.5",
        f"train.out_dir={out}",
    )
    assert run_training(cfg)["global_step"] == 10
    logged = {
        int(m.group(2)): (int(m.group(1)), float(m.group(3)))
        for m in re.finditer(r"epoch (\d+) step (\d+) loss \S+ lr (\S+)", (out / "train.log").read_text())
    }
    assert sorted(logged) == [2, 3, 4, 5, 6, 8, 9, 10]
    assert {lr for epoch, lr in logged.values() if epoch == 0} == {1e-3}
    assert {lr for epoch, lr in logged.values() if epoch == 1} == {5e-4}
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*.pt")) == [
        "step-00000008.pt",
        "step-00000010.pt",
    ]


# --------------------------------------------------------------------------- eval.* keys


def test_eval_flip_keys_decide_the_evaluated_poses(tmp_path_factory):
    """eval.flip_test and eval.flip_shift, read by the evaluation's own pass over the val loader,
    give the poses of ``predict`` with (or without) the flip test and the one-pixel shift."""
    from pnfs.deploy import freeze
    from pnfs.evaluate.runner import collect_predictions

    cfg = tiny_cfg(tmp_path_factory)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    frozen = freeze(model)
    batches = list(build_loader(cfg, "val"))
    perm = cfg.joints.flip_permutation()

    def by_hand(**kw) -> np.ndarray:
        images = [b.image.contiguous(memory_format=torch.channels_last) for b in batches]  # as evaluated
        return np.concatenate(
            [predict(frozen, x, b.affine, **kw).keypoints.numpy() for x, b in zip(images, batches)]
        )

    def evaluated(*overrides: str) -> np.ndarray:
        c = tiny_cfg(tmp_path_factory, "eval.amp=none", *overrides)  # float32, as by hand
        return collect_predictions(model, build_loader(c, "val"), c, torch.device("cpu"))["keypoints"]

    cases = {
        "plain": (evaluated("eval.flip_test=false"), by_hand()),
        "flip": (evaluated("eval.flip_test=true"), by_hand(flip_permutation=perm)),
        "shift": (evaluated("eval.flip_shift=true"), by_hand(flip_permutation=perm, flip_shift=True)),
    }
    for name, (got, want) in cases.items():
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3, err_msg=name)
    wants = [want for _, want in cases.values()]
    assert not np.allclose(wants[0], wants[1], atol=0.5) and not np.allclose(wants[1], wants[2], atol=0.5)


def test_eval_rescore_and_oks_nms_thresholds_shape_the_coco_results(tmp_path_factory):
    """Two predictions of one person in one image, joint scores 0.3 (A) and 0.6 (B):
    eval.rescore_threshold=0.2 scores them 1 x 0.3 / 0.6, 0.5 drops A's joints (score 0);
    eval.oks_nms_threshold=0.9 keeps only B (their OKS is 1), 1.0 keeps both."""
    import json

    from pnfs.evaluate.runner import coco_metrics

    cfg = tiny_cfg(tmp_path_factory)
    image_id = json.loads(Path(cfg.data.val_annotations).read_text())["images"][0]["id"]
    kp = np.stack([np.linspace(10, 50, 17), np.linspace(5, 60, 17)], -1)
    pred = {
        "keypoints": np.stack([kp, kp]),
        "scores": np.stack([np.full(17, 0.3), np.full(17, 0.6)]),
        "image_id": np.array([image_id, image_id]),
        "ann_id": np.array([0, 1]),
        "box_score": np.array([1.0, 1.0]),
        "area": np.array([3000.0, 3000.0]),
    }

    def scores(*overrides: str) -> list[float]:
        _, results = coco_metrics(pred, tiny_cfg(tmp_path_factory, *overrides))
        return sorted(r["score"] for r in results)

    assert scores("eval.oks_nms_threshold=1.0") == pytest.approx([0.3, 0.6])
    assert scores("eval.oks_nms_threshold=1.0", "eval.rescore_threshold=0.5") == pytest.approx([0.0, 0.6])
    assert scores() == pytest.approx([0.6])  # the default 0.9 keeps the better of the two


def test_train_seed_decides_the_run(tmp_path_factory, tmp_path):
    """train.seed: the same seed twice ends with the same weights, another seed with others."""
    from pnfs.engine.trainer import run_training

    def digest(name: str, *overrides: str) -> str:
        cfg = tiny_cfg(
            tmp_path_factory,
            "train.epochs=1",
            "train.max_steps_per_epoch=2",
            f"train.out_dir={tmp_path / name}",
            *overrides,
        )
        return run_training(cfg)["weights_sha256"]

    first = digest("a", "train.seed=5")
    assert digest("b", "train.seed=5") == first
    assert digest("c", "train.seed=6") != first


def test_eval_pckh_threshold_and_hrnet_compat_set_the_mpii_numbers(shared_data):
    """Every joint off by 0.3 head sizes: PCKh@0.5 is 100 and eval.pckh_threshold=0.25 gives 0;
    off by 0.105 head sizes: "@0.1" is 0, and 100 with eval.hrnet_compat=true (read at 0.11)."""
    from pnfs.evaluate.mpii import load_mpii_ground_truth
    from pnfs.evaluate.runner import mpii_metrics

    root = shared_data / "mpii_sample"
    files = [
        "data.dataset=mpii",
        f"data.val_annotations={root / 'test_mpii.json'}",
        f"data.val_head_sizes={root / 'mpii_headsizes_pose-hg-train_valid_h5.json'}",
    ]
    gt = load_mpii_ground_truth(root / "test_mpii.json", root / "mpii_headsizes_pose-hg-train_valid_h5.json")
    n = len(gt.images)

    def metrics(off: float, *overrides: str) -> dict:
        keypoints = gt.joints[..., :2].astype(np.float64).copy()
        keypoints[..., 0] += off * gt.head_size[:, None]
        pred = {
            "keypoints": keypoints,
            "scores": np.ones(keypoints.shape[:2]),
            "image_id": np.arange(n),
            "ann_id": np.arange(n),
        }
        return mpii_metrics(pred, load_config(None, [*files, *overrides]))[0]

    assert metrics(0.3)["PCKh"] == 100.0
    assert metrics(0.3, "eval.pckh_threshold=0.25")["PCKh"] == 0.0
    assert metrics(0.105)["PCKh@0.1"] == 0.0
    assert metrics(0.105, "eval.hrnet_compat=true")["PCKh@0.1"] == 100.0
