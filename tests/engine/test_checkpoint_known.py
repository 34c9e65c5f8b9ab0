"""Evaluation and prediction use the checkpoint's weights: a trained checkpoint scores what it
was trained to, the same model at initialisation does not, and the saved checkpoint predicts
exactly what the in-memory model that saved it predicted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from pnfs.data.loaders.build import build_loader
from pnfs.evaluate import evaluate_model
from pnfs.evaluate.loading import load_for_inference
from pnfs.inference import predict
from pnfs.keypoints import COCO
from tests.support.known_model import INITIAL_AP, TRAINED_AP

REPO = Path(__file__).resolve().parents[2]


def _launcher(name: str):
    spec = importlib.util.spec_from_file_location(f"pnfs_launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ap(checkpoint: Path) -> float:
    model, cfg = load_for_inference(checkpoint)
    return evaluate_model(model, build_loader(cfg, "val"), cfg, device="cpu")["AP"]


def test_the_trained_checkpoint_scores_far_above_its_initialisation(known_checkpoint):
    trained, initial = _ap(known_checkpoint.trained), _ap(known_checkpoint.initial)
    assert trained > TRAINED_AP, trained
    assert initial < INITIAL_AP, initial


def test_the_saved_checkpoint_predicts_what_the_model_that_saved_it_predicted(known_checkpoint):
    model, cfg = load_for_inference(known_checkpoint.trained)
    poses = [
        predict(model, b.image, b.affine, flip_permutation=COCO.flip_permutation())
        for b in build_loader(cfg, "val")
    ]
    torch.testing.assert_close(
        torch.cat([p.keypoints for p in poses]), known_checkpoint.keypoints, rtol=0, atol=0
    )
    torch.testing.assert_close(torch.cat([p.scores for p in poses]), known_checkpoint.scores, rtol=0, atol=0)


def test_evaluate_cli_scores_the_trained_checkpoint(known_checkpoint, tmp_path, capsys):
    args = ["--checkpoint", str(known_checkpoint.trained), "--annotations", str(known_checkpoint.annotations),
            "--device", "cpu", "--data", str(known_checkpoint.shards), "--out", str(tmp_path)]  # fmt: skip
    assert _launcher("evaluate").main(args) == 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["num_samples"] == 12 and saved["AP"] == _ap(known_checkpoint.trained) > TRAINED_AP


def _pixel_errors(checkpoint: Path, shared_data: Path, out: Path) -> np.ndarray:
    """launch/predict.py on one photo at its people's true boxes -> distance to the truth, labelled joints."""
    gt = json.loads((shared_data / "coco_sample" / "test_coco.json").read_text())
    image = gt["images"][0]
    people = [a for a in gt["annotations"] if a["image_id"] == image["id"] and a["num_keypoints"] > 0]
    boxes = [arg for a in people for arg in ("--box", ",".join(f"{v:g}" for v in a["bbox"]))]
    photo = shared_data / "coco_sample" / image["file_name"]
    argv = [
        "--checkpoint",
        str(checkpoint),
        "--image",
        str(photo),
        *boxes,
        "--out",
        str(out),
        "--min-score",
        "0",
    ]
    assert _launcher("predict").main(argv) == 0
    record = json.loads((out / f"{photo.stem}_pose.json").read_text())
    errors = []
    for person, truth in zip(record["people"], people, strict=True):
        got, want = np.asarray(person["keypoints"])[:, :2], np.asarray(truth["keypoints"]).reshape(17, 3)
        labelled = want[:, 2] > 0
        errors.append(np.hypot(*(got[labelled] - want[labelled, :2]).T))
    return np.concatenate(errors)


def test_predict_cli_finds_the_joints_with_the_trained_checkpoint_only(
    known_checkpoint, shared_data, tmp_path
):
    trained = _pixel_errors(known_checkpoint.trained, shared_data, tmp_path / "trained")
    initial = _pixel_errors(known_checkpoint.initial, shared_data, tmp_path / "initial")
    print(f"median joint error: trained {np.median(trained):.1f} px, initial {np.median(initial):.1f} px")
    assert np.median(trained) < 0.25 * np.median(initial), (np.median(trained), np.median(initial))
