"""evaluate_model over real shards: COCO AP and MPII PCKh, single and 2-process gloo runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pnfs.config import load_config
from pnfs.data.loaders.build import build_loader
from pnfs.evaluate import evaluate_model
from pnfs.evaluate.loading import load_for_inference
from pnfs.keypoints import joint_set
from tests.support.known_model import TRAINED_AP
from tests.support.pose_oracle import PerfectNetwork

REPO = Path(__file__).resolve().parents[2]
TESTS_ROOT = (
    Path(__file__).resolve().parents[2]
)  # the repository: the worker imports tests.evaluate.test_runner


def _shard(script: str, images: Path, annotations: Path, out: Path) -> Path:
    subprocess.run(
        [sys.executable, str(REPO / "data_prep" / script), "--images", str(images), "--annotations",
         str(annotations), "--out", str(out), "--split", "val", "--shard-size", "5", "--no-progress"],
        check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def coco_shards(shared_data, tmp_path_factory) -> Path:
    root = shared_data / "coco_sample"
    return _shard("shard_coco.py", root, root / "test_coco.json", tmp_path_factory.mktemp("coco") / "shards")


@pytest.fixture(scope="module")
def mpii_shards(shared_data, tmp_path_factory) -> Path:
    root = shared_data / "mpii_sample"
    return _shard("shard_mpii.py", root, root / "test_mpii.json", tmp_path_factory.mktemp("mpii") / "shards")


def coco_config(shared_data, shards: Path, *extra: str):
    return load_config(
        "demo",
        [
            "data.num_workers=0",
            f"data.val_shards={shards}",
            f"data.val_annotations={shared_data / 'coco_sample' / 'test_coco.json'}",
            "eval.batch_size=5",
            *extra,
        ],
    )


def mpii_config(shared_data, shards: Path, *extra: str):
    root = shared_data / "mpii_sample"
    return load_config(
        "demo",
        [
            "data.dataset=mpii",
            "data.num_workers=0",
            f"data.val_shards={shards}",
            f"data.val_annotations={root / 'test_mpii.json'}",
            f"data.val_head_sizes={root / 'mpii_headsizes_pose-hg-train_valid_h5.json'}",
            "eval.batch_size=2",
            *extra,
        ],
    )


def pycocotools_stats(annotations: Path, results: Path) -> dict[str, float]:
    """pycocotools' own ten keypoint stats of a results json, named in COCOeval.summarize's order."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(annotations))
    ev = COCOeval(gt, gt.loadRes(str(results)), "keypoints")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    names = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
    return dict(zip(names, map(float, ev.stats), strict=True))


def perfect_network(cfg) -> PerfectNetwork:
    """The oracle for every sample of the val loader (all ranks' samples)."""
    batches = list(build_loader(cfg, "val"))
    return PerfectNetwork(
        torch.cat([b.image for b in batches]),
        torch.cat([b.keypoints for b in batches]),
        joint_set(cfg.data.dataset).flip_permutation(),
    )


def test_coco_ap_of_a_perfect_network_through_the_loader(shared_data, coco_shards, tmp_path):
    cfg = coco_config(shared_data, coco_shards, "eval.refine=gaussian", "eval.overlays=3")
    net = perfect_network(cfg)
    metrics = evaluate_model(net, build_loader(cfg, "val"), cfg, device="cpu", out_dir=tmp_path)
    assert metrics["AP"] == 1.0 and metrics["score"] == 1.0 and metrics["num_samples"] == 12
    assert len(json.loads((tmp_path / "results.json").read_text())) == 12
    assert json.loads((tmp_path / "metrics.json").read_text())["AP"] == 1.0
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 3
    # the paper's quarter offset: up to 1 input px of quantisation, small next to OKS's scale here
    cfg = coco_config(shared_data, coco_shards)
    quarter = evaluate_model(net, build_loader(cfg, "val"), cfg, device="cpu")
    assert quarter["AP"] >= 0.9


def test_mpii_pckh_of_a_perfect_network_through_the_loader(shared_data, mpii_shards, tmp_path):
    cfg = mpii_config(shared_data, mpii_shards, "eval.refine=gaussian")
    net = perfect_network(cfg)
    metrics = evaluate_model(net, build_loader(cfg, "val"), cfg, device="cpu", out_dir=tmp_path)
    assert metrics["PCKh"] == 100.0 and metrics["PCKh@0.1"] == 100.0 and metrics["score"] == 100.0
    assert metrics["missing"] == 0 and metrics["num_samples"] == 3
    assert set(metrics) >= {"Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean", "Mean@0.1"}
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["ann_id"] for r in results] == [0, 1, 2]
    # the quarter offset at a 128x96 input on 1280x720 frames: ~7 image px per input px, so the
    # 0.25 heatmap px quantisation already costs at PCKh@0.1 (0.1 head size is ~8-12 px here)
    cfg = mpii_config(shared_data, mpii_shards)
    quarter = evaluate_model(net, build_loader(cfg, "val"), cfg, device="cpu")
    assert quarter["PCKh"] == 100.0 and 50.0 < quarter["PCKh@0.1"] < 100.0


def test_a_trained_model_scores_what_pycocotools_finds_in_its_results(known_checkpoint, tmp_path):
    """The known checkpoint (tests/support/known_model.py) in train mode: evaluate_model scores it above
    TRAINED_AP, its ten stats are pycocotools' own for the results.json it wrote, and the model
    is left in the mode it was found in."""
    model, cfg = load_for_inference(known_checkpoint.trained)
    model.train()
    metrics = evaluate_model(model, build_loader(cfg, "val"), cfg, device="cpu", out_dir=tmp_path)
    assert metrics["num_samples"] == 12 and metrics["score"] == metrics["AP"] > TRAINED_AP
    recomputed = pycocotools_stats(known_checkpoint.annotations, tmp_path / "results.json")
    assert {k: metrics[k] for k in recomputed} == pytest.approx(recomputed, abs=1e-12)
    assert model.training  # evaluation leaves the mode as it found it


def test_missing_annotations_is_a_clear_error(shared_data, coco_shards):
    cfg = coco_config(shared_data, coco_shards, "data.val_annotations=")
    with pytest.raises(ValueError, match=r"data\.val_annotations"):
        evaluate_model(perfect_network(cfg), build_loader(cfg, "val"), cfg, device="cpu")


WORKER = """
import json, os, sys
import torch.distributed as dist
sys.path.insert(0, {tests!r})
import tests.evaluate.test_runner as T
from pnfs.data.loaders.build import build_loader
from pnfs.evaluate import evaluate_model
from pnfs.evaluate.loading import load_for_inference

rank, world = int(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=world)
for kind in ("coco", "mpii"):
    cfg = T.coco_config(T.Path({data!r}), T.Path({coco!r})) if kind == "coco" else T.mpii_config(
        T.Path({data!r}), T.Path({mpii!r}))
    net = T.perfect_network(cfg)
    loader = build_loader(cfg, "val", rank=rank, world_size=world, batch_size=2)
    metrics = evaluate_model(net, loader, cfg, device="cpu", rank=rank, world_size=world)
    print(kind, rank, json.dumps(metrics), flush=True)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_two_gloo_processes_give_the_same_metrics_as_one(shared_data, coco_shards, mpii_shards, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(
        WORKER.format(tests=str(TESTS_ROOT), port=_free_port(), data=str(shared_data), coco=str(coco_shards),
                      mpii=str(mpii_shards))
    )  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), "2"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
        for r in range(2)
    ]  # fmt: skip
    outputs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-3000:]
        outputs.append(out)
    lines = {tuple(line.split(" ", 2)[:2]): json.loads(line.split(" ", 2)[2]) for o in outputs
             for line in o.splitlines() if line.startswith(("coco ", "mpii "))}  # fmt: skip
    assert lines["coco", "1"] == {} and lines["mpii", "1"] == {}
    coco_cfg = coco_config(shared_data, coco_shards)
    single = evaluate_model(perfect_network(coco_cfg), build_loader(coco_cfg, "val"), coco_cfg, device="cpu")
    assert lines["coco", "0"] == single
    mpii_cfg = mpii_config(shared_data, mpii_shards)
    single = evaluate_model(perfect_network(mpii_cfg), build_loader(mpii_cfg, "val"), mpii_cfg, device="cpu")
    assert json.dumps(lines["mpii", "0"]) == json.dumps(single)  # NaN-safe exact comparison


def _share(ids):
    """One rank's predictions for the samples ``ids`` (keypoints carry the id, to follow them)."""
    n = len(ids)
    return {
        "keypoints": np.asarray(ids, dtype=np.float64)[:, None, None] * np.ones((n, 17, 2)),
        "scores": np.ones((n, 17)),
        "image_id": np.asarray([i // 10 for i in ids], dtype=np.int64),
        "ann_id": np.asarray(ids, dtype=np.int64),
        "box_score": np.ones(n),
        "area": np.ones(n),
    }


def test_gathering_keeps_every_sample_once_in_a_fixed_order():
    from pnfs.evaluate.runner import FIELDS, gather_predictions

    share = _share
    # a padded shard repeats samples 3 and 12; order on the ranks must not matter
    merged = gather_predictions(share([12, 3, 7, 3, 25, 12]), world_size=1)
    assert merged["ann_id"].tolist() == [3, 7, 12, 25]
    assert merged["keypoints"][:, 0, 0].tolist() == [3, 7, 12, 25]
    assert set(merged) == set(FIELDS)


def test_mpii_metrics_without_annotations_names_the_key():
    """The MPII refusal comes before anything is read, naming the key and the file it wants."""
    from pnfs.evaluate.runner import FIELDS, mpii_metrics

    cfg = load_config("demo", ["data.dataset=mpii", "data.val_annotations="])
    pred = {name: np.zeros(0) for name in FIELDS}
    message = (
        r"^data\.val_annotations: MPII evaluation needs the annotation json \(valid\.json\); it is empty$"
    )
    with pytest.raises(ValueError, match=message):
        mpii_metrics(pred, cfg)


def test_gathering_on_two_ranks_merges_what_each_rank_sends(monkeypatch):
    """world_size=2: this rank's own share goes to the all-gather, and every rank's share is in
    the result (the collective stands in for gloo here; the two-process test runs the real one)."""
    import pnfs.evaluate.runner as runner

    sent = []

    def all_gather(obj):
        sent.append(obj)
        return [obj, _share([4, 30, 7])]  # rank 1 holds 4, 30 and a padded 7

    monkeypatch.setattr(runner, "all_gather_objects", all_gather)
    mine = _share([7, 12])
    merged = runner.gather_predictions(mine, world_size=2)
    assert len(sent) == 1 and sent[0] is mine
    assert merged["ann_id"].tolist() == [4, 7, 12, 30]
    assert merged["keypoints"][:, 0, 0].tolist() == [4, 7, 12, 30]
    sent.clear()
    assert runner.gather_predictions(mine, world_size=1)["ann_id"].tolist() == [7, 12]
    assert sent == []  # one process calls no collective


def test_gathered_predictions_stay_on_rank_0(monkeypatch):
    """In a process group of two, rank 1 gets None and rank 0 the merged predictions."""
    import pnfs.evaluate.runner as runner

    monkeypatch.setattr(runner, "all_gather_objects", lambda obj: [obj, _share([4])])
    monkeypatch.setattr(runner.dist, "is_initialized", lambda: True)
    for rank, want in ((1, None), (0, [4, 7])):
        monkeypatch.setattr(runner.dist, "get_rank", lambda rank=rank: rank)
        merged = runner.gather_predictions(_share([7]), world_size=2)
        assert (merged if merged is None else merged["ann_id"].tolist()) == want, rank


def test_coco_metrics_without_annotations_names_the_key():
    from pnfs.evaluate.runner import FIELDS, coco_metrics

    cfg = load_config("demo", ["data.val_annotations="])
    pred = {name: np.zeros(0) for name in FIELDS}
    message = r"^data\.val_annotations: COCO evaluation needs the ground-truth json; it is empty$"
    with pytest.raises(ValueError, match=message):
        coco_metrics(pred, cfg)
