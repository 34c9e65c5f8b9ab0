"""evaluate_model over real shards: COCO AP and MPII PCKh, single and 2-process gloo runs; then fast
tests of each runner function over hand-made batches, a stand-in network and hand-made ground truth."""

from __future__ import annotations

import io
import json
import logging
import os
import re
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


# --------------------------------------------------------------------------- fast runner tests
# collect_predictions, _draw_crops, coco_metrics, mpii_metrics and evaluate_model over hand-made
# batches, a recording stand-in network and hand-made ground truth: no shards, no training, a
# few hundred ms each (the mutation selection of runner.py, docs/testing.md issue 26 part 6).

CROP_H, CROP_W = 32, 24  # input px; the stand-in's heatmaps are 8 x 6 (stride 4)
PEAK_X = [k % 6 for k in range(17)]  # heatmap px of joint k's single peak
PEAK_Y = [k // 6 for k in range(17)]
PEAK_VALUE = [0.1 + 0.05 * k for k in range(17)]  # 0.1 ... 0.9: the joint scores


class PeakNetwork(torch.nn.Module):
    """Heatmaps [N, K, H/4, W/4]: joint k has one peak PEAK_VALUE[k] at (PEAK_X[k], PEAK_Y[k]), zero
    elsewhere (``shoulders``: also 0.5x and 0.25x the peak one heatmap px right and left of it, so
    the sub-pixel refinement has something to fit). Records every input it is shown."""

    def __init__(self, num_joints: int = 17, shoulders: bool = False):
        super().__init__()
        self.num_joints, self.shoulders = num_joints, shoulders
        self.seen: list[dict] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(
            {
                "images": x.detach().clone(),
                "training": self.training,
                "channels_last": x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                "autocast": torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"),
            }
        )
        out = torch.zeros(x.shape[0], self.num_joints, x.shape[2] // 4, x.shape[3] // 4)
        for k in range(self.num_joints):
            x_k, y_k, v = PEAK_X[k % 17], PEAK_Y[k % 17], PEAK_VALUE[k % 17]
            out[:, k, y_k, x_k] = v
            if self.shoulders and 0 < x_k < out.shape[-1] - 1:
                out[:, k, y_k, x_k + 1], out[:, k, y_k, x_k - 1] = 0.5 * v, 0.25 * v
        return out


def _batch(image_ids, ann_ids, scores, affines, seed=0, size=(CROP_H, CROP_W)):
    from pnfs.data.batch import PoseBatch

    n = len(image_ids)
    return PoseBatch(
        image=torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed)),
        keypoints=torch.zeros(n, 17, 3),
        affine=torch.tensor(affines, dtype=torch.float32),
        image_id=torch.tensor(image_ids, dtype=torch.int64),
        ann_id=torch.tensor(ann_ids, dtype=torch.int64),
        score=torch.tensor(scores, dtype=torch.float32),
    )


FIELD_NAMES = ("image", "keypoints", "affine", "image_id", "ann_id", "score")  # PoseBatch's
SCALE = [[2.0, 0.0, 10.0], [0.0, 3.0, 20.0]]  # det 6
SHEAR = [[1.0, 2.0, 5.0], [3.0, 4.0, 7.0]]  # det 4 - 6 = -2
MIRROR = [[-1.0, 0.0, 100.0], [0.0, 1.0, 0.0]]  # det -1


def _on_image(affine) -> np.ndarray:
    """Each joint's peak (input px 4 * PEAK) through ``affine``, written out: x' = a x + b y + c."""
    (a, b, c), (d, e, f) = affine
    x, y = 4 * np.array(PEAK_X, dtype=np.float64), 4 * np.array(PEAK_Y, dtype=np.float64)
    return np.stack([a * x + b * y + c, d * x + e * y + f], -1)


def _demo(*extra: str):
    return load_config("demo", ["eval.flip_test=false", "train.channels_last=false", *extra])


def test_collect_predictions_back_projects_each_kept_sample_in_loader_order(caplog):
    """Two batches; the sample with box score 0.25 is below eval.det_score_threshold=0.5 and
    dropped, the one at 0.5 exactly is kept. Keypoints are the peaks through each crop's affine,
    scores the peak heights, area |det| * 32 * 24 (6 * 768, 2 * 768, 1 * 768)."""
    from pnfs.evaluate.runner import collect_predictions

    loader = [
        _batch([7, 7], [71, 72], [0.5, 0.25], [SCALE, SHEAR]),
        _batch([3], [31], [0.75], [MIRROR], seed=1),
    ]
    net = PeakNetwork()
    cfg = _demo("eval.det_score_threshold=0.5")
    with caplog.at_level(logging.INFO, logger="pnfs.train"):
        got = collect_predictions(net, loader, cfg, torch.device("cpu"))
    assert list(got) == ["keypoints", "scores", "image_id", "ann_id", "box_score", "area"]
    assert got["image_id"].tolist() == [7, 3] and got["ann_id"].tolist() == [71, 31]
    assert got["image_id"].dtype == np.int64 and got["ann_id"].dtype == np.int64
    np.testing.assert_allclose(got["keypoints"], np.stack([_on_image(SCALE), _on_image(MIRROR)]), atol=1e-4)
    np.testing.assert_allclose(got["scores"], np.array([PEAK_VALUE, PEAK_VALUE]), rtol=1e-6)
    assert got["box_score"].tolist() == [0.5, 0.75]
    assert got["area"].dtype == np.float64 and got["area"].tolist() == [6.0 * 768, 1.0 * 768]
    assert len(net.seen) == 2 and [s["images"].shape[0] for s in net.seen] == [2, 1]  # no flip test
    torch.testing.assert_close(net.seen[1]["images"], loader[1].image, rtol=0, atol=0)
    assert not net.seen[0]["channels_last"] and net.seen[0]["autocast"] is False
    lines = [(r.name, r.getMessage()) for r in caplog.records]
    assert lines == [("pnfs.train", "inference: float32 on cpu (eval.amp=auto; eval.amp=bf16 for bfloat16)")]


def test_collect_predictions_moves_each_batch_to_the_device_without_blocking():
    """Each batch goes to the device asked for, as an asynchronous copy (a CUDA host's pinned
    batches overlap the copy with compute); recorded by a PoseBatch that notes its moves."""
    from pnfs.data.batch import PoseBatch
    from pnfs.evaluate.runner import collect_predictions

    moves = []

    class NotedBatch(PoseBatch):
        def to(self, device, non_blocking=False):
            moves.append((device, non_blocking))
            return super().to(device, non_blocking=non_blocking)

    batch = _batch([1], [1], [1.0], [SCALE])
    noted = NotedBatch(**{name: getattr(batch, name) for name in FIELD_NAMES})
    collect_predictions(PeakNetwork(), [noted, noted], _demo(), torch.device("cpu"))
    assert moves == [(torch.device("cpu"), True)] * 2


def test_collect_predictions_area_is_the_absolute_determinant_times_the_crop():
    from pnfs.evaluate.runner import collect_predictions

    loader = [_batch([1, 1], [1, 2], [1.0, 1.0], [SHEAR, MIRROR])]
    got = collect_predictions(PeakNetwork(), loader, _demo(), torch.device("cpu"))
    assert got["area"].tolist() == [2.0 * 768, 1.0 * 768]  # |4 - 6| and |-1|, times 32 * 24


def test_collect_predictions_of_an_empty_loader_are_empty_arrays_of_the_right_kind():
    from pnfs.evaluate.runner import collect_predictions

    got = collect_predictions(PeakNetwork(16), [], _demo("data.dataset=mpii"), torch.device("cpu"))
    shapes = {name: (v.shape, v.dtype) for name, v in got.items()}
    f, i = np.dtype(np.float64), np.dtype(np.int64)
    assert shapes == {
        "keypoints": ((0, 16, 2), f), "scores": ((0, 16), f), "image_id": ((0,), i),
        "ann_id": ((0,), i), "box_score": ((0,), f), "area": ((0,), f),
    }  # fmt: skip


@pytest.mark.parametrize("training", [True, False])
def test_collect_predictions_runs_in_eval_mode_and_restores_the_mode(training):
    from pnfs.evaluate.runner import collect_predictions

    net = PeakNetwork().train(training)
    collect_predictions(net, [_batch([1], [1], [1.0], [SCALE])], _demo(), torch.device("cpu"))
    assert [s["training"] for s in net.seen] == [False] and net.training is training


def test_collect_predictions_flip_test_shows_the_mirrored_crops_and_permutes_the_joints():
    """eval.flip_test: one forward of the crops and their mirror images (pnfs.inference's mirror),
    and the joints of predict() with the COCO flip permutation; without it the identity
    permutation would give other joints and scores."""
    from pnfs.evaluate.runner import collect_predictions
    from pnfs.inference import mirror_images, predict

    batch = _batch([5, 6], [50, 60], [1.0, 1.0], [SCALE, SHEAR])
    net = PeakNetwork()
    got = collect_predictions(net, [batch], _demo("eval.flip_test=true"), torch.device("cpu"))
    assert len(net.seen) == 1 and net.seen[0]["images"].shape[0] == 4
    torch.testing.assert_close(net.seen[0]["images"][:2], batch.image, rtol=0, atol=0)
    torch.testing.assert_close(net.seen[0]["images"][2:], mirror_images(batch.image), rtol=0, atol=0)
    perm = joint_set("coco").flip_permutation()
    want = predict(PeakNetwork(), batch.image, batch.affine, flip_permutation=perm)
    np.testing.assert_array_equal(got["keypoints"], want.keypoints.numpy())
    np.testing.assert_array_equal(got["scores"], want.scores.numpy())
    identity = predict(PeakNetwork(), batch.image, batch.affine, flip_permutation=list(range(17)))
    assert not np.array_equal(got["scores"], identity.scores.numpy())


def test_collect_predictions_decodes_with_eval_refine_and_flip_shift():
    from pnfs.evaluate.runner import collect_predictions
    from pnfs.inference import predict

    batch = _batch([5], [50], [1.0], [SCALE])
    perm = joint_set("coco").flip_permutation()
    net = PeakNetwork(shoulders=True)
    for refine, shift in (("gaussian", True), ("gaussian", False), ("quarter", True)):
        cfg = _demo("eval.flip_test=true", f"eval.refine={refine}", f"eval.flip_shift={str(shift).lower()}")
        got = collect_predictions(net, [batch], cfg, torch.device("cpu"))
        want = predict(net, batch.image, batch.affine, flip_permutation=perm, flip_shift=shift, refine=refine)
        np.testing.assert_array_equal(got["keypoints"], want.keypoints.numpy())
        plain = predict(net, batch.image, batch.affine, flip_permutation=perm)  # quarter, no shift
        assert not np.array_equal(got["keypoints"], plain.keypoints.numpy()), (refine, shift)


@pytest.mark.parametrize("channels_last", [True, False])
def test_collect_predictions_hands_the_network_channels_last_crops_when_asked(channels_last):
    from pnfs.evaluate.runner import collect_predictions

    net = PeakNetwork()
    cfg = _demo(f"train.channels_last={str(channels_last).lower()}")
    collect_predictions(net, [_batch([1, 2], [1, 2], [1.0, 1.0], [SCALE, SCALE])], cfg, torch.device("cpu"))
    assert net.seen[0]["channels_last"] is channels_last


def test_collect_predictions_runs_under_the_autocast_that_eval_amp_gives(monkeypatch, caplog):
    """inference_amp is asked with eval.amp and the device; its dtype reaches the forward's
    autocast and its line the "pnfs.train" logger (stand-in: CPUs without bfloat16 give None)."""
    import pnfs.evaluate.runner as runner

    asked = []

    def amp(setting, device):
        asked.append((setting, device))
        return torch.bfloat16, "the inference line"

    monkeypatch.setattr(runner, "inference_amp", amp)
    net = PeakNetwork()
    with caplog.at_level(logging.INFO, logger="pnfs.train"):
        runner.collect_predictions(net, [_batch([1], [1], [1.0], [SCALE])], _demo("eval.amp=bf16"), "cpu")
    assert asked == [("bf16", "cpu")] and net.seen[0]["autocast"] == torch.bfloat16
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("pnfs.train", "INFO", "the inference line")
    ]


def test_collect_predictions_freezes_a_posenfs_and_leaves_it_as_it_was(monkeypatch):
    import pnfs.evaluate.runner as runner
    from pnfs.deploy import freeze
    from pnfs.model import build_model
    from pnfs.model.pnfs import PoseNFS

    cfg = _demo("data.input_size=[32,32]")
    model = build_model(cfg).train()
    crops = [_batch([1], [1], [1.0], [SCALE], size=(32, 32))]
    assert isinstance(model, PoseNFS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = []
    monkeypatch.setattr(runner, "freeze", lambda m: frozen.append(m) or freeze(m))
    got = runner.collect_predictions(model, crops, cfg, torch.device("cpu"))
    assert frozen == [model] and model.training and np.isfinite(got["keypoints"]).all()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and set(before) == set(after)
    frozen.clear()
    runner.collect_predictions(PeakNetwork(), [_batch([1], [1], [1.0], [SCALE])], cfg, torch.device("cpu"))
    assert frozen == []  # another network is run as it is


def test_collect_predictions_draws_the_first_eval_overlays_crops(tmp_path):
    """eval.overlays=3 over three batches of 2: the first three samples' PNGs, each the crop with
    the peaks drawn at eval.rescore_threshold (joints 0-7 score under 0.5 and are left out)."""
    from pnfs.evaluate.runner import collect_predictions
    from pnfs.keypoints import COCO
    from pnfs.visualize import denormalize, draw_poses, read_rgb

    loader = [
        _batch([10 + b, 10 + b], [2 * b, 2 * b + 1], [1.0, 1.0], [SCALE, SCALE], seed=b) for b in range(3)
    ]
    cfg = _demo("eval.overlays=3", "eval.rescore_threshold=0.5")
    collect_predictions(PeakNetwork(), loader, cfg, torch.device("cpu"), tmp_path / "overlays")
    names = sorted(p.name for p in (tmp_path / "overlays").iterdir())
    assert names == ["10_0.png", "10_1.png", "11_2.png"]
    peaks = np.stack([4 * np.array(PEAK_X), 4 * np.array(PEAK_Y)], -1).astype(np.float32)
    for name, image in (("10_0.png", loader[0].image[0]), ("11_2.png", loader[1].image[0])):
        want = draw_poses(denormalize(image), peaks, COCO, np.array(PEAK_VALUE, np.float32), 0.5)
        assert np.array_equal(read_rgb(tmp_path / "overlays" / name), want), name
    assert not np.array_equal(want, draw_poses(denormalize(image), peaks, COCO, np.array(PEAK_VALUE), 0.2))
    collect_predictions(PeakNetwork(), loader, cfg, torch.device("cpu"))  # no folder: nothing drawn
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["10_0.png", "10_1.png", "11_2.png", "overlays"]


def _coco_people() -> list[tuple[int, int, list[float]]]:
    """(ann_id, image_id, box) of three people in two images; boxes 100 x 120 px (large, for COCO)."""
    return [
        (11, 1, [10.0, 20.0, 100.0, 120.0]),
        (12, 1, [300.0, 40.0, 100.0, 120.0]),
        (21, 2, [50.0, 60.0, 100.0, 120.0]),
    ]


def _joints_in(box, num_joints: int) -> np.ndarray:
    """[K, 2] joint k at (x0 + 5 + 5k, y0 + 10 + 6k): inside the 100 x 120 box for K <= 17."""
    k = np.arange(num_joints, dtype=np.float64)
    return np.stack([box[0] + 5 + 5 * k, box[1] + 10 + 6 * k], -1)


def _coco_ground_truth(tmp_path, num_joints: int = 17) -> Path:
    annotations = []
    for ann_id, image_id, box in _coco_people():
        kps = np.concatenate([_joints_in(box, num_joints), np.full((num_joints, 1), 2.0)], 1)
        annotations.append(
            {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": box, "area": box[2] * box[3],
             "iscrowd": 0, "keypoints": kps.ravel().tolist(), "num_keypoints": num_joints}
        )  # fmt: skip
    gt = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in (1, 2)],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path


def _coco_predictions(num_joints: int = 17, offset: float = 0.0) -> dict[str, np.ndarray]:
    """The three people's ground-truth joints (``offset`` px to the right), joint scores 1."""
    people = _coco_people()
    return {
        "keypoints": np.stack(
            [_joints_in(box, num_joints) + np.array([offset, 0.0]) for _, _, box in people]
        ),
        "scores": np.ones((3, num_joints)),
        "image_id": np.array([1, 1, 2], dtype=np.int64),
        "ann_id": np.array([11, 12, 21], dtype=np.int64),
        "box_score": np.ones(3),
        "area": np.full(3, 12000.0),
    }


def test_coco_metrics_of_exact_predictions_is_ap_1_and_prints_the_table(tmp_path, capsys):
    from pnfs.evaluate.coco import STAT_KEYS, format_table
    from pnfs.evaluate.runner import coco_metrics

    cfg = _demo(f"data.val_annotations={_coco_ground_truth(tmp_path)}")
    capsys.readouterr()
    stats, results = coco_metrics(_coco_predictions(), cfg)
    assert list(stats) == [*STAT_KEYS, "score"]
    assert stats["AP"] == 1.0 and stats["score"] == 1.0 and stats["AR"] == 1.0
    assert capsys.readouterr().out == format_table(stats) + "\n"
    assert [(r["image_id"], r["score"]) for r in results] == [(1, 1.0), (1, 1.0), (2, 1.0)]
    assert results[2]["keypoints"][:6] == [55.0, 70.0, 1.0, 60.0, 76.0, 1.0]


def test_coco_metrics_rescores_and_suppresses_with_the_eval_thresholds(tmp_path):
    """Person 11's joints score 0.9 (9 of them) and 0.5 (8): instance score 12.1 / 17 at the
    default 0.2, 0.9 above eval.rescore_threshold=0.6. A copy of person 11 one px to the right
    with box score 0.5 overlaps it at OKS ~0.995: above the default 0.9 (suppressed), below
    eval.oks_nms_threshold=0.999 (kept, scored 0.5 x the same mean)."""
    from pnfs.evaluate.runner import coco_metrics

    pred = _coco_predictions()
    pred["scores"][0] = [0.9] * 9 + [0.5] * 8
    copy = {name: np.concatenate([v, v[:1]]) for name, v in pred.items()}
    copy["keypoints"][3] += [1.0, 0.0]
    copy["box_score"][3] = 0.5
    path = _coco_ground_truth(tmp_path)
    _, results = coco_metrics(copy, _demo(f"data.val_annotations={path}"))
    assert [(r["image_id"], round(r["score"], 12)) for r in results] == [
        (1, 1.0),
        (1, round(12.1 / 17, 12)),
        (2, 1.0),
    ]  # fmt: skip  (best first within an image)
    assert results[1]["keypoints"][:3] == [15.0, 30.0, 0.9] and results[1]["keypoints"][-3:] == [
        95.0,
        126.0,
        0.5,
    ]
    cfg = _demo(f"data.val_annotations={path}", "eval.rescore_threshold=0.6", "eval.oks_nms_threshold=0.999")
    _, results = coco_metrics(copy, cfg)
    assert [(r["image_id"], round(r["score"], 12)) for r in results] == [
        (1, 1.0), (1, 0.9), (1, 0.45), (2, 1.0)
    ]  # fmt: skip


def test_coco_metrics_scores_with_eval_sigmas(tmp_path):
    """Joints 8 px off: with COCO's sigmas the nose's OKS is exp(-64 / (2 * 0.026)^2 / 12000 / 2),
    ~0.37, so AP < 1; with eval.sigmas of 0.5 every OKS is exp(-64 / 1 / 24000) > 0.99: AP 1."""
    from pnfs.evaluate.coco import crowdpose_ground_truth, evaluate_keypoints
    from pnfs.evaluate.runner import coco_metrics

    path = _coco_ground_truth(tmp_path)
    pred = _coco_predictions(offset=8.0)
    coco, results = coco_metrics(pred, _demo(f"data.val_annotations={path}"))
    wide, _ = coco_metrics(pred, _demo(f"data.val_annotations={path}", f"eval.sigmas={[0.5] * 17}"))
    assert coco["AP"] < 0.9 and wide["AP"] == 1.0 and wide["score"] == 1.0
    # COCO persons are scored at the file's areas (CrowdPose's 0.53 w h would give another AP)
    assert coco == {**evaluate_keypoints(str(path), results, verbose=False), "score": coco["AP"]}
    assert coco["AP"] != evaluate_keypoints(crowdpose_ground_truth(str(path)), results, verbose=False)["AP"]


def test_coco_metrics_of_a_joint_set_without_sigmas_is_pck_of_the_box(tmp_path, capsys):
    """MPII's 16 joints on COCO-format annotations: no OKS sigmas, so PCK@eval.pck_alpha of the box
    (120 px: radius 24 px at 0.2, 36 px at 0.3). Person 12's first joint is 30 px off: 63 of the
    64 joints of four predictions at 0.2, all at 0.3. No NMS: an exact copy of person 11 stays, and
    the instance scores are the mean of the joints above eval.rescore_threshold."""
    from pnfs.evaluate.runner import coco_metrics

    path = _coco_ground_truth(tmp_path, 16)
    pred = _coco_predictions(16)
    pred["keypoints"][1, 0] += [30.0, 0.0]
    pred["scores"][0] = [0.9] * 8 + [0.3] * 8
    copy = {name: np.concatenate([v, v[:1]]) for name, v in pred.items()}
    capsys.readouterr()
    stats, results = coco_metrics(copy, _demo("data.keypoints=mpii", f"data.val_annotations={path}"))
    assert stats["PCK"] == 63 / 64 and stats["score"] == stats["PCK"] and stats["alpha"] == 0.2
    assert "AP" not in stats and stats["PCK/head_top"] == 3 / 4
    assert capsys.readouterr().out == "mpii has no OKS sigmas: PCK@0.2 of the box = 0.9844\n"
    assert [(r["image_id"], round(r["score"], 12)) for r in results] == [
        (1, 0.6),
        (1, 1.0),
        (1, 0.6),
        (2, 1.0),
    ]
    cfg = _demo(
        "data.keypoints=mpii",
        f"data.val_annotations={path}",
        "eval.pck_alpha=0.3",
        "eval.rescore_threshold=0.5",
    )
    stats, results = coco_metrics(copy, cfg)
    assert stats["PCK"] == 1.0 and stats["alpha"] == 0.3
    assert capsys.readouterr().out == "mpii has no OKS sigmas: PCK@0.3 of the box = 1.0000\n"
    assert [(r["image_id"], round(r["score"], 12)) for r in results] == [
        (1, 0.9),
        (1, 1.0),
        (1, 0.9),
        (2, 1.0),
    ]


def test_coco_metrics_of_a_joint_set_without_sigmas_but_eval_sigmas_is_oks_ap(tmp_path):
    from pnfs.evaluate.runner import coco_metrics

    path = _coco_ground_truth(tmp_path, 16)
    stats, _ = coco_metrics(
        _coco_predictions(16),
        _demo("data.keypoints=mpii", f"data.val_annotations={path}", f"eval.sigmas={[0.1] * 16}"),
    )
    assert stats["AP"] == 1.0 and stats["score"] == 1.0 and "PCK" not in stats


def test_coco_metrics_of_crowdpose_scores_with_its_areas_and_splits_by_crowd_index(tmp_path, capsys):
    """CrowdPose (tests/test_crowdpose.py's ground truth, image 3's people 20 px off): the ten stats
    are COCOeval's against the toolkit's areas (0.53 w h, not the file's w h, which give another
    AP here), plus AP_easy/medium/hard of crowd_split_stats; the table of the ten is printed."""
    from pnfs.evaluate.coco import (
        STAT_KEYS,
        crowd_split_stats,
        crowdpose_ground_truth,
        evaluate_keypoints,
        format_table,
    )
    from pnfs.evaluate.oks import joint_sigmas
    from pnfs.evaluate.runner import coco_metrics
    from pnfs.keypoints import CROWDPOSE
    from tests.test_crowdpose import write_ground_truth_and_results

    gt_path, res_path = write_ground_truth_and_results(tmp_path, shift=20.0)
    anns = json.loads(gt_path.read_text())["annotations"]
    res = json.loads(res_path.read_text())
    pred = {
        "keypoints": np.array([r["keypoints"] for r in res]).reshape(-1, 14, 3)[..., :2],
        "scores": np.ones((len(res), 14)),
        "image_id": np.array([a["image_id"] for a in anns], dtype=np.int64),
        "ann_id": np.array([a["id"] for a in anns], dtype=np.int64),
        "box_score": np.ones(len(res)),
        "area": np.full(len(res), 80000.0),
    }
    capsys.readouterr()
    stats, results = coco_metrics(pred, _demo("data.keypoints=crowdpose", f"data.val_annotations={gt_path}"))
    sigmas = joint_sigmas(CROWDPOSE)
    want = evaluate_keypoints(crowdpose_ground_truth(gt_path), results, sigmas=sigmas, verbose=False)
    assert {k: stats[k] for k in STAT_KEYS} == want
    assert want["AP"] != evaluate_keypoints(str(gt_path), results, sigmas=sigmas, verbose=False)["AP"]
    split = crowd_split_stats(gt_path, results, sigmas, verbose=False)
    assert {k: stats[k] for k in ("AP_easy", "AP_medium", "AP_hard")} == {
        k: split[k] for k in ("AP_easy", "AP_medium", "AP_hard")
    }
    assert split["AP_easy"] == 1.0 and split["AP_hard"] < 1.0 and stats["score"] == stats["AP"]
    assert capsys.readouterr().out == format_table(want) + "\n"


HEAD_SIZES = (10.0, 20.0, 30.0)


def _mpii_ground_truth(tmp_path) -> tuple[Path, Path]:
    """valid.json of three persons (raw joint r of person p at MATLAB px (100 p + 10 r + 1,
    7 r + 21), all visible) and the head sizes 10, 20, 30 px."""
    entries = [
        {
            "image": f"p{p}.jpg",
            "joints": [[100 * p + 10 * r + 1, 7 * r + 21] for r in range(16)],
            "joints_vis": [1] * 16,
        }
        for p in range(3)
    ]
    valid, heads = tmp_path / "valid.json", tmp_path / "heads.json"
    valid.write_text(json.dumps(entries))
    heads.write_text(json.dumps([{"image": f"p{p}.jpg", "head_size": s} for p, s in enumerate(HEAD_SIZES)]))
    return valid, heads


def _mpii_truth(p: int) -> np.ndarray:
    """Person p's joints in our order, 0-based px: ours[i] = raw[MPII_FROM_RAW[i]] - 1."""
    from pnfs.keypoints import MPII_FROM_RAW

    raw = np.array(MPII_FROM_RAW, dtype=np.float64)
    return np.stack([100 * p + 10 * raw, 7 * raw + 20], -1)


def _mpii_predictions(rows, offsets) -> dict[str, np.ndarray]:
    """Rows ``rows`` (ann_id = annotation row), each person's truth ``offsets`` px to the right,
    joint scores 1/3, image ids 40 + row."""
    n = len(rows)
    return {
        "keypoints": np.array([_mpii_truth(r) + np.array([dx, 0.0]) for r, dx in zip(rows, offsets)]).reshape(
            n, 16, 2
        ),
        "scores": np.full((n, 16), 1 / 3),
        "image_id": np.array([40 + r for r in rows], dtype=np.int64),
        "ann_id": np.array(rows, dtype=np.int64),
        "box_score": np.ones(n),
        "area": np.ones(n),
    }


def _mpii_config(valid: Path, heads: Path, *extra: str):
    return _demo("data.dataset=mpii", f"data.val_annotations={valid}", f"data.val_head_sizes={heads}", *extra)


def test_mpii_metrics_sorts_rows_into_annotation_order_and_warns_of_missing_persons(tmp_path, capsys):
    """Rows 2 and 0 (in that order), row 1 missing: results come in annotation order with the
    image names, [x, y, s] rounded to 4 places; the warning names the count; PCKh 100."""
    from pnfs.evaluate.runner import mpii_metrics

    valid, heads = _mpii_ground_truth(tmp_path)
    capsys.readouterr()
    metrics, results = mpii_metrics(_mpii_predictions([2, 0], [1 / 3, 1 / 3]), _mpii_config(valid, heads))
    out, err = capsys.readouterr()
    assert err == "warning: 1 of 3 MPII persons have no prediction; scored without them\n"
    assert out.splitlines()[0] == "PCKh@0.5" and len(out.splitlines()) == 3
    assert metrics["missing"] == 1 and metrics["PCKh"] == 100.0 and metrics["score"] == 100.0
    assert metrics["PCKh@0.1"] == 100.0 and metrics["Head"] == 100.0
    assert [(r["ann_id"], r["image_id"], r["image"]) for r in results] == [
        (0, 40, "p0.jpg"),
        (2, 42, "p2.jpg"),
    ]
    assert results[0]["keypoints"][0] == [90.3333, 83.0, 0.3333]  # head_top: raw joint 9
    assert results[1]["keypoints"][15] == [260.3333, 62.0, 0.3333]  # pelvis: raw joint 6
    assert all(len(r["keypoints"]) == 16 for r in results)


def test_mpii_metrics_with_every_person_warns_of_none(tmp_path, capsys):
    from pnfs.evaluate.runner import mpii_metrics

    valid, heads = _mpii_ground_truth(tmp_path)
    capsys.readouterr()
    metrics, results = mpii_metrics(_mpii_predictions([1, 2, 0], [0.0] * 3), _mpii_config(valid, heads))
    assert capsys.readouterr().err == "" and metrics["missing"] == 0 and len(results) == 3
    metrics, results = mpii_metrics(_mpii_predictions([], []), _mpii_config(valid, heads))
    assert metrics["missing"] == 3 and results == []
    assert capsys.readouterr().err == "warning: 3 of 3 MPII persons have no prediction; scored without them\n"


@pytest.mark.parametrize("rows", [[0, 3], [-1, 2], [3]])
def test_mpii_metrics_refuses_rows_outside_the_annotations(tmp_path, rows):
    from pnfs.evaluate.runner import mpii_metrics

    valid, heads = _mpii_ground_truth(tmp_path)
    message = (
        f"predictions name MPII rows outside 0..2 of {valid}: are the shards from another annotation file?"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        mpii_metrics(_mpii_predictions(rows, [0.0] * len(rows)), _mpii_config(valid, heads))


def test_mpii_metrics_scores_at_eval_pckh_threshold_and_hrnet_compat(tmp_path, capsys):
    """Every joint 0.105 head sizes off (1.05, 2.1, 3.15 px): inside PCKh@0.5, outside 0.1, inside
    HRNet's 0.11; at eval.pckh_threshold=0.1 nothing is correct."""
    from pnfs.evaluate.runner import mpii_metrics

    valid, heads = _mpii_ground_truth(tmp_path)
    pred = _mpii_predictions([0, 1, 2], [0.105 * s for s in HEAD_SIZES])
    capsys.readouterr()
    plain, _ = mpii_metrics(pred, _mpii_config(valid, heads))
    assert (plain["PCKh"], plain["PCKh@0.1"]) == (100.0, 0.0)
    compat, _ = mpii_metrics(pred, _mpii_config(valid, heads, "eval.hrnet_compat=true"))
    assert (compat["PCKh"], compat["PCKh@0.1"]) == (100.0, 100.0)
    strict, _ = mpii_metrics(pred, _mpii_config(valid, heads, "eval.pckh_threshold=0.1"))
    assert strict["PCKh"] == 0.0 and strict["score"] == 0.0
    tables = capsys.readouterr().out.split("PCKh@")[1:]
    assert [t.splitlines()[0] for t in tables] == ["0.5", "0.5", "0.1"]
    assert "Mean@0.1 (at 0.11, HRNet-compat)" in tables[1] and "HRNet" not in tables[0]


class _Recorder:
    """Stand-in for coco_metrics / mpii_metrics: records the predictions it is given."""

    def __init__(self, name: str):
        self.name, self.calls, self.configs = name, [], []

    def __call__(self, pred, cfg):
        self.calls.append(pred)
        self.configs.append(cfg)
        return {"AP": float("nan"), "score": 0.5, "by": self.name}, [{"image_id": 1, "score": 0.5}]


def _patched_metrics(monkeypatch):
    import pnfs.evaluate.runner as runner

    coco, mpii = _Recorder("coco"), _Recorder("mpii")
    monkeypatch.setattr(runner, "coco_metrics", coco)
    monkeypatch.setattr(runner, "mpii_metrics", mpii)
    return coco, mpii


def _three_samples():
    return [_batch([2, 1], [20, 10], [1.0, 1.0], [SCALE, SCALE]), _batch([1], [11], [1.0], [MIRROR], seed=1)]


@pytest.mark.parametrize("dataset", ["coco", "mpii"])
def test_evaluate_model_dispatches_by_dataset_and_writes_strict_json(monkeypatch, tmp_path, dataset):
    """The gathered predictions (sorted by image and annotation) go to the dataset's metrics;
    results.json is their results, metrics.json the metrics with num_samples, NaN as null."""
    from pnfs.evaluate.runner import evaluate_model

    coco, mpii = _patched_metrics(monkeypatch)
    cfg = _demo(f"data.dataset={dataset}", "eval.overlays=2")
    net = PeakNetwork(cfg.num_joints)
    metrics = evaluate_model(net, _three_samples(), cfg, device="cpu", out_dir=tmp_path / "a" / "b")
    called, other = (coco, mpii) if dataset == "coco" else (mpii, coco)
    assert other.calls == [] and len(called.calls) == 1 and called.configs == [cfg]
    assert called.calls[0]["ann_id"].tolist() == [10, 11, 20]
    assert metrics["by"] == dataset and metrics["num_samples"] == 3
    out = tmp_path / "a" / "b"
    assert (out / "results.json").read_text() == '[{"image_id": 1, "score": 0.5}]'
    assert (out / "metrics.json").read_text() == (
        f'{{\n "AP": null,\n "score": 0.5,\n "by": "{dataset}",\n "num_samples": 3\n}}'
    )
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["1_10.png", "2_20.png"]


def test_evaluate_model_writes_into_an_existing_folder_and_nothing_without_one(monkeypatch, tmp_path):
    import pnfs.evaluate.runner as runner
    from pnfs.evaluate.runner import evaluate_model

    _patched_metrics(monkeypatch)
    worlds, gather = [], runner.gather_predictions
    monkeypatch.setattr(runner, "gather_predictions", lambda local, n: worlds.append(n) or gather(local, n))
    cfg = _demo("eval.overlays=0")
    metrics = evaluate_model(PeakNetwork(), _three_samples(), cfg, device="cpu", out_dir=str(tmp_path))
    assert worlds == [1]  # one process by default: no collective
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "results.json"]
    assert json.loads((tmp_path / "metrics.json").read_text())["num_samples"] == metrics["num_samples"] == 3
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    cfg = _demo("eval.overlays=3")
    assert evaluate_model(PeakNetwork(), _three_samples(), cfg, device="cpu")["num_samples"] == 3
    assert list(Path().iterdir()) == [] and len(list(tmp_path.rglob("*"))) == 3  # no out_dir: no file


def test_evaluate_model_draws_overlays_on_rank_0_only(monkeypatch, tmp_path):
    """rank=1 in a world of one (gathering keeps its predictions): results in a new nested
    folder, no overlays (eval.overlays is 8)."""
    from pnfs.evaluate.runner import evaluate_model

    _patched_metrics(monkeypatch)
    cfg = _demo("eval.overlays=8")
    out = tmp_path / "new" / "folder"
    metrics = evaluate_model(PeakNetwork(), _three_samples(), cfg, device="cpu", out_dir=out, rank=1)
    assert metrics["num_samples"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "results.json"]


def test_evaluate_model_returns_nothing_where_gathering_keeps_nothing(monkeypatch, tmp_path):
    """A rank whose gather_predictions gives None (not rank 0 of a group) returns {} and writes
    nothing; the world size reaches the gathering."""
    import pnfs.evaluate.runner as runner

    coco, _ = _patched_metrics(monkeypatch)
    worlds = []
    monkeypatch.setattr(runner, "gather_predictions", lambda local, world_size: worlds.append(world_size))
    got = runner.evaluate_model(
        PeakNetwork(), _three_samples(), _demo(), device="cpu", out_dir=tmp_path / "out", rank=1, world_size=2
    )
    assert got == {} and worlds == [2] and coco.calls == [] and not (tmp_path / "out").exists()


class _NotedStream(io.StringIO):
    """stdout that notes, at each flush, how much had been written."""

    def __init__(self):
        super().__init__()
        self.flushed_at: list[int] = []

    def flush(self):
        self.flushed_at.append(len(self.getvalue()))
        super().flush()


def test_the_metric_tables_are_flushed_as_soon_as_printed(monkeypatch, tmp_path):
    """A piped log (tee, a scheduler's file) shows the table when it is printed, not at the
    next buffer flush: stdout is flushed right after the table's last line."""
    from pnfs.evaluate.runner import coco_metrics, mpii_metrics

    valid, heads = _mpii_ground_truth(tmp_path)
    runs = (
        (coco_metrics, _coco_predictions(), _demo(f"data.val_annotations={_coco_ground_truth(tmp_path)}")),
        (mpii_metrics, _mpii_predictions([0, 1, 2], [0.0] * 3), _mpii_config(valid, heads)),
    )
    for metrics, pred, cfg in runs:
        stream = _NotedStream()
        monkeypatch.setattr(sys, "stdout", stream)
        metrics(pred, cfg)
        monkeypatch.undo()
        assert stream.getvalue().endswith("\n") and len(stream.getvalue()) in stream.flushed_at, (
            metrics.__name__
        )
