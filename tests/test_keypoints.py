"""Keypoint sets from YAML: the built-ins equal the paper's sets, bad files name file/key/value."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pnfs.config import ConfigError, load_config
from pnfs.data.loaders.build import build_loader
from pnfs.engine.trainer import run_training
from pnfs.evaluate import evaluate_model
from pnfs.evaluate.coco import box_pck
from pnfs.keypoints import COCO, CROWDPOSE, MPII, KeypointSetError, load_keypoint_set
from pnfs.model import build_model
from pnfs.parts import part_grouping, part_names
from tests.support.engine import TINY_OVERRIDES
from tests.support.pose_oracle import PerfectNetwork

TINY = [  # the engine tests' tiny model on 64x64 crops, one CPU process, one epoch
    *TINY_OVERRIDES,
    "train.epochs=1",
    "train.device=cpu",
    "eval.overlays=2",
]


def _r(a, b):
    return tuple(range(a, b + 1))


# The Table I groupings as the paper prints them, in our joint indices (written out here so that
# a change to the shipped YAML files shows up as a failure).
TABLE_I = {
    "mpii": {
        1: (_r(0, 15),),
        3: (_r(0, 2), _r(3, 8), _r(9, 15)),
        5: (_r(0, 4), (5, 7), (6, 8), (9, 10, 15), _r(11, 14)),
        8: (_r(0, 4), (3, 5), (5, 7), (4, 6), (6, 8), (9, 10, 11, 12, 15), (11, 13), (12, 14)),
    },
    "coco": {
        1: (_r(0, 16),),
        3: (_r(0, 4), _r(5, 10), _r(11, 16)),
        5: (_r(0, 6), (7, 9), (8, 10), (11, 12), _r(13, 16)),
        8: (_r(0, 6), (5, 7), (7, 9), (6, 8), (8, 10), _r(11, 14), (13, 15), (14, 16)),
    },
}
COCO_SKELETON = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
    (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)  # fmt: skip
MPII_SKELETON = (
    (0, 1), (1, 2), (2, 3), (2, 4), (3, 5), (5, 7), (4, 6), (6, 8), (2, 15), (15, 9), (15, 10),
    (9, 11), (11, 13), (10, 12), (12, 14),
)  # fmt: skip
COCO_SIGMAS = (
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107,
    0.087, 0.087, 0.089, 0.089,
)  # fmt: skip


@pytest.mark.parametrize("name", ["coco", "mpii"])
def test_builtin_groupings_are_table_i(name):
    joints = load_keypoint_set(name)
    for p, grouping in TABLE_I[name].items():
        assert part_grouping(joints, p) == grouping
    assert part_names(joints, 3) == ("head", "upper_limb", "lower_limb")
    assert len(part_names(joints, 8)) == 8


def test_builtin_sets_keep_their_order_flips_skeleton_and_sigmas():
    assert COCO.num_joints == 17 and COCO.joints[0] == "nose" and COCO.joints[-1] == "right_ankle"
    assert COCO.flip_pairs == ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
    assert COCO.skeleton == COCO_SKELETON
    assert COCO.sigmas == COCO_SIGMAS
    assert MPII.num_joints == 16 and MPII.joints[0] == "head_top" and MPII.joints[-1] == "pelvis"
    assert MPII.flip_pairs == ((3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14))
    assert MPII.skeleton == MPII_SKELETON
    assert MPII.sigmas is None


def test_crowdpose_set():
    assert CROWDPOSE.num_joints == 14 and CROWDPOSE.joints[-2:] == ("head", "neck")
    assert CROWDPOSE.sigmas[:2] == (0.079, 0.079) and CROWDPOSE.sigmas[6] == 0.107
    assert part_names(CROWDPOSE, 3) == ("head", "upper_limb", "lower_limb")


HAND = {
    "name": "hand5",
    "joints": ["wrist", "thumb", "index", "middle", "little"],
    "flip_pairs": [],
    "skeleton": [["wrist", "thumb"], ["wrist", "index"], ["wrist", "middle"], ["wrist", "little"]],
    "parts": {"palm": ["wrist", "thumb"], "fingers": ["index", "middle", "little"]},
}


def _write(tmp_path, data):
    path = tmp_path / "set.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_custom_set_loads_and_a_config_takes_it(tmp_path):
    path = _write(tmp_path, {**HAND, "colors": [[255, 0, 0]] * 4})
    joints = load_keypoint_set(path)
    assert joints.num_joints == 5 and joints.sigmas is None
    assert part_grouping(joints, 2) == ((0, 1), (2, 3, 4))
    cfg = load_config("demo", [f"data.keypoints={path}", "model.num_parts=2"])
    assert cfg.num_joints == 5 and cfg.parts == ((0, 1), (2, 3, 4))
    assert cfg.part_names == ("palm", "fingers")


@pytest.mark.parametrize(
    ("change", "key", "offender"),
    [
        ({"skeleton": [["wrist", "pinky"]]}, "skeleton[0]", "'pinky'"),
        ({"parts": {"palm": ["wrist", "thumb"], "fingers": ["index", "middle"]}}, "parts", "'little'"),
        ({"flip_pairs": [["thumb", "index"], ["thumb", "middle"]]}, "flip_pairs[1]", "'thumb'"),
        ({"sigmas": [0.1, 0.1, 0.1]}, "sigmas", "3"),
        ({"parts": {3: {"a": ["wrist", "thumb", "index", "middle", "little"]}}}, "parts.3", "P=3"),
        ({"joints": ["wrist", "wrist", "index", "middle", "little"]}, "joints", "'wrist'"),
        ({"colour": []}, "colour", "unknown key"),
    ],
)
def test_a_bad_set_names_file_key_and_value(tmp_path, change, key, offender):
    path = _write(tmp_path, {**HAND, **change})
    with pytest.raises(KeypointSetError) as err:
        load_keypoint_set(path)
    message = str(err.value)
    assert str(path) in message and f": {key}:" in message and offender in message, message


def test_config_reports_a_missing_set_and_a_missing_grouping(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.keypoints.*nowhere\.yaml"):
        load_config("demo", ["data.keypoints=nowhere.yaml"])
    path = _write(tmp_path, HAND)
    with pytest.raises(ConfigError, match=r"model\.num_parts.*hand5"):
        load_config("demo", [f"data.keypoints={path}", "model.num_parts=3"])


# --------------------------------------------------------------------------- a new set end to end

# Five joints of the synthetic people as a "hand": the nose as the palm, wrists and ankles as
# left/right finger tips and bases (COCO indices of make_synthetic's annotations).
HAND_FROM_COCO = (0, 9, 10, 15, 16)
HAND_SET = {
    "name": "hand5",
    "joints": ["palm", "left_tip", "right_tip", "left_base", "right_base"],
    "flip_pairs": [["left_tip", "right_tip"], ["left_base", "right_base"]],
    "skeleton": [
        ["palm", "left_base"],
        ["left_base", "left_tip"],
        ["palm", "right_base"],
        ["right_base", "right_tip"],
    ],
    "parts": {"palm": ["palm", "left_base", "right_base"], "tips": ["left_tip", "right_tip"]},
    "colors": [[255, 0, 0], [255, 128, 0], [0, 0, 255], [0, 128, 255]],
}


def _to_hand(coco_json, out_json):
    data = json.loads(coco_json.read_text())
    for ann in data["annotations"]:
        kps = np.asarray(ann["keypoints"], dtype=float).reshape(17, 3)[list(HAND_FROM_COCO)]
        ann["keypoints"] = kps.ravel().tolist()
        ann["num_keypoints"] = int((kps[:, 2] > 0).sum())
    data["annotations"] = [a for a in data["annotations"] if a["num_keypoints"] > 0]
    out_json.write_text(json.dumps(data))


def test_a_new_set_shards_trains_evaluates_and_draws_without_code_changes(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    run = dict(check=True, capture_output=True, text=True, cwd=repo)
    raw = tmp_path / "raw"
    subprocess.run(
        [sys.executable, "data_prep/make_synthetic.py", "--out", str(raw), "--train", "16", "--val", "8"],
        **run,
    )
    with_sigmas = tmp_path / "hand.yaml"
    with_sigmas.write_text(yaml.safe_dump({**HAND_SET, "sigmas": [0.05] * 5}, sort_keys=False))
    without_sigmas = tmp_path / "hand_no_sigmas.yaml"
    without_sigmas.write_text(yaml.safe_dump(HAND_SET, sort_keys=False))
    for split in ("train", "val"):
        hand_json = tmp_path / f"hand_{split}.json"
        _to_hand(raw / "annotations" / f"person_keypoints_{split}.json", hand_json)
        command = ["data_prep/shard_coco.py", "--images", str(raw / "images" / split)]
        command += [
            "--annotations",
            str(hand_json),
            "--out",
            str(tmp_path / "shards" / split),
            "--split",
            split,
        ]
        command += ["--keypoints", str(with_sigmas), "--workers", "1", "--no-progress"]
        subprocess.run([sys.executable, *command], **run)
    manifest = json.loads((tmp_path / "shards" / "val" / "manifest.json").read_text())
    assert "hand5" in json.dumps(manifest)

    overrides = [
        *TINY,
        f"data.keypoints={with_sigmas}",
        "model.num_parts=2",
        f"data.train_shards={tmp_path / 'shards' / 'train'}",
        f"data.val_shards={tmp_path / 'shards' / 'val'}",
        f"data.val_annotations={tmp_path / 'hand_val.json'}",
        f"train.out_dir={tmp_path / 'run'}",
    ]
    cfg = load_config(None, overrides)
    result = run_training(cfg)
    assert result["global_step"] == 4  # 16 people / batches of 4: one epoch

    model = build_model(cfg)
    loader = build_loader(cfg, "val", rank=0, world_size=1, epoch=0, start_sample=0)
    metrics = evaluate_model(model, loader, cfg, device="cpu", out_dir=tmp_path / "eval")
    assert 0.0 <= metrics["AP"] <= 1.0 and metrics["num_samples"] > 0
    assert sorted((tmp_path / "eval" / "overlays").glob("*.png"))
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert len(results[0]["keypoints"]) == 3 * 5

    # without sigmas: no OKS, so PCK@alpha of the box is reported instead of AP
    no_sigmas = load_config(None, [*overrides, f"data.keypoints={without_sigmas}"])
    metrics = evaluate_model(model, loader, no_sigmas, device="cpu")
    assert "AP" not in metrics and 0.0 <= metrics["PCK"] <= 1.0 and metrics["score"] == metrics["PCK"]
    assert set(HAND_SET["joints"]) == {k.split("/")[1] for k in metrics if k.startswith("PCK/")}

    # values, not ranges: a perfect network on the new set scores AP 1.0 (OKS with the set's
    # sigmas) and PCK 1.0 (no sigmas); the same network shifted by 0.3 of each box loses both
    batches = list(build_loader(cfg, "val"))
    images = torch.cat([b.image for b in batches])
    keypoints = torch.cat([b.keypoints for b in batches])
    flip = load_keypoint_set(with_sigmas).flip_permutation()
    exact = [*overrides, "eval.refine=gaussian"]
    for config, metric in (
        (load_config(None, exact), "AP"),
        (load_config(None, [*exact, f"data.keypoints={without_sigmas}"]), "PCK"),
    ):
        net = PerfectNetwork(images, keypoints, flip)
        assert evaluate_model(net, build_loader(config, "val"), config, device="cpu")[metric] == 1.0, metric
        shifted = keypoints.clone()
        shifted[..., 0] += 0.3 * images.shape[-1]
        net = PerfectNetwork(images, shifted, flip)
        assert evaluate_model(net, build_loader(config, "val"), config, device="cpu")[metric] < 0.5, metric


def test_box_pck_counts_joints_within_alpha_of_the_box_size(tmp_path):
    joints = load_keypoint_set(_write(tmp_path, HAND))
    truth = np.array([[10, 10, 2], [20, 10, 2], [30, 10, 2], [40, 10, 0], [50, 10, 2]], dtype=float)
    gt = {
        "images": [{"id": 1, "file_name": "1.jpg", "width": 200, "height": 200}],
        "annotations": [
            {"id": 7, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 50], "area": 5000.0,
             "iscrowd": 0, "keypoints": truth.ravel().tolist(), "num_keypoints": 4}
        ],
        "categories": [{"id": 1, "name": "person"}],
    }  # fmt: skip
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    pred = truth[None, :, :2].copy()
    pred[0, 1, 0] += 19.0  # within 0.2 * max(100, 50) = 20 px
    pred[0, 2, 0] += 21.0  # outside
    # joint 3 is unlabelled: its (exact) prediction must not count
    stats = box_pck(path, pred, np.array([7]), joints, alpha=0.2)
    assert stats["PCK"] == pytest.approx(3 / 4)
    assert stats["PCK/index"] == 0.0 and stats["PCK/thumb"] == 1.0 and np.isnan(stats["PCK/middle"])
