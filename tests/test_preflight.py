"""The preflight of launch/train.py: every problem a run would meet is named in its first
seconds (key, value, what to do), all at once, exit code 2, no traceback, no step taken;
a clean config passes and ``--check`` prints the plan. Also under torchrun: one line, once."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from pnfs.config import load_config
from pnfs.preflight import checkpoint_bytes, preflight
from pnfs.run_plan import cpu_cores, threads_per_process
from tests.support.engine import PY, REPO, TINY_OVERRIDES, free_port, tiny_dataset, worker_env

FAST = 60  # seconds: the checks take a few; the margin is for a loaded 2-core CI machine
OVERRIDES = [o for o in TINY_OVERRIDES if not o.startswith("train.eval_every")] + ["train.eval_every=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


def train(
    data: dict, out: Path, *extra: str, timeout: float = 120
) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [
        PY,
        "launch/train.py",
        "--config",
        "demo",
        *OVERRIDES,
        *data["overrides"],
        "--out",
        str(out),
        *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - start


def assert_refused(proc, seconds: float, out: Path, *needles: str) -> None:
    """Exit 2 quickly, one ``error:`` block naming every needle, no traceback, nothing trained."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert seconds < FAST, seconds
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("error: ") == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)
    assert not (out / "checkpoints").exists() and not (out / "train.log").exists()


def test_missing_val_shards(data, tmp_path):
    proc, s = train(data, tmp_path / "run", f"data.val_shards={tmp_path / 'nope'}")
    assert_refused(proc, s, tmp_path / "run", f"data.val_shards='{tmp_path / 'nope'}'", "shard not found")


def test_an_index_file_given_as_the_train_shards_is_named(data, tmp_path):
    index = sorted((data["shards"] / "train").glob("train-*.idx"))[0]
    proc, s = train(data, tmp_path / "run", f"data.train_shards={index}", "--check")
    assert_refused(proc, s, tmp_path / "run", f"data.train_shards='{index}'", "is not a .tar shard")


def test_train_annotations_with_the_val_shards_are_named(data, tmp_path):
    wrong = data["raw"] / "annotations" / "person_keypoints_train.json"
    proc, s = train(data, tmp_path / "run", f"data.val_annotations={wrong}")
    assert_refused(
        proc, s, tmp_path / "run", f"data.val_annotations='{wrong}'", "show images it does not have"
    )


def test_a_shard_pattern_that_matches_nothing_names_the_pattern(data, tmp_path):
    from pnfs.data.shards.reader import expand_shards

    pattern = str(data["shards"] / "val-*.tar")  # one folder above the shards
    with pytest.raises(FileNotFoundError, match=r"no file matches the pattern .*val-\*\.tar") as e:
        expand_shards(pattern, "val")
    assert "val/val-000000.tar" in str(e.value)  # where the shards are
    with pytest.raises(FileNotFoundError, match=r"the folder .*nowhere does not exist"):
        expand_shards(str(tmp_path / "nowhere" / "val-*.tar"), "val")


def test_missing_val_annotations(data, tmp_path):
    proc, s = train(data, tmp_path / "run", f"data.val_annotations={tmp_path / 'gone.json'}")
    assert_refused(
        proc, s, tmp_path / "run", f"data.val_annotations='{tmp_path / 'gone.json'}'", "no such file"
    )


def test_mpii_without_head_boxes(data, shared_data, tmp_path):
    valid = shared_data / "mpii_sample" / "test_mpii.json"  # HRNet layout: no head boxes
    proc, s = train(data, tmp_path / "run", "data.dataset=mpii", f"data.val_annotations={valid}")
    assert_refused(proc, s, tmp_path / "run", "data.val_head_sizes=''", "no head boxes", "gt_valid.mat")


def test_coco_annotations_for_an_mpii_config_are_named(data, tmp_path):
    proc, s = train(data, tmp_path / "run", "data.dataset=mpii")
    ann = data["overrides"][2].split("=", 1)[1]
    assert_refused(
        proc, s, tmp_path / "run", f"data.val_annotations='{ann}'", "COCO-style", "joint set 'coco'"
    )


def test_crops_that_cannot_cover_the_augmentation(data, tmp_path):
    # the shards were cut for margin 1.25 x max_scale 1.3 and aspects 0.75..1.0
    proc, s = train(data, tmp_path / "run", "data.scale_range=[0.7,1.5]", "data.input_size=[64,96]")
    assert_refused(
        proc,
        s,
        tmp_path / "run",
        "data.scale_range=[0.7, 1.5]",
        "--max-scale 1.5",
        "data.input_size=[64, 96]",
    )


def test_unwritable_run_folder(data, tmp_path):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "run"  # a folder below a file cannot be made, not even by root
    proc, s = train(data, out, timeout=120)
    assert_refused(proc, s, out, f"train.out_dir='{out}'", "not writable")


def test_bad_deepspeed_json(data, tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 1},')
    proc, s = train(data, tmp_path / "run", "--deepspeed", str(bad))
    assert_refused(proc, s, tmp_path / "run", f"--deepspeed='{bad}'", "not valid JSON")


def test_all_problems_are_listed_at_once(data, tmp_path):
    (tmp_path / "a-file").write_text("")
    proc, s = train(
        data,
        tmp_path / "a-file" / "run",
        f"data.val_shards={tmp_path / 'nope'}",
        "data.scale_range=[0.7,1.9]",
    )
    assert_refused(proc, s, tmp_path / "a-file" / "run", "3 problems", "data.val_shards", "train.out_dir")
    assert proc.stderr.count("\n  - ") == 3, proc.stderr


def test_deepspeed_batch_fields_must_agree(data, tmp_path):
    cfg = load_config("demo", [*OVERRIDES, *data["overrides"], f"train.out_dir={tmp_path}"])
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "train_batch_size": 16}))
    problems = preflight(cfg, world_size=2, deepspeed_config=str(ds))
    assert len(problems) == 2 and all(p.startswith(f"--deepspeed='{ds}'") for p in problems), problems
    assert "train.batch_size=4" in problems[0] and "4 x 1 x 2 = 8" in problems[1]
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "train_batch_size": 8}))
    assert preflight(cfg, world_size=2, deepspeed_config=str(ds)) == []


def test_too_few_samples_for_one_step(data, tmp_path):
    cfg = load_config(
        "demo", [*OVERRIDES, *data["overrides"], f"train.out_dir={tmp_path}", "train.batch_size=30"]
    )
    (problem,) = preflight(cfg, world_size=2)
    assert problem.startswith("train.batch_size=30: 48 training samples over 2 process(es)"), problem
    assert preflight(cfg, world_size=1) == []


def test_backbone_weights_file_that_does_not_fit(data, tmp_path):
    import torch

    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "w.pth")
    cfg = load_config(
        "demo",
        [
            *OVERRIDES,
            *data["overrides"],
            f"train.out_dir={tmp_path}",
            f"model.backbone.weights={tmp_path / 'w.pth'}",
        ],
    )
    (problem,) = preflight(cfg)
    assert problem.startswith(f"model.backbone.weights='{tmp_path / 'w.pth'}'") and "does not fit" in problem


def test_checkpoint_estimate_is_close_to_a_real_checkpoint(data, tmp_path):
    """The disk check rests on this estimate: within 25% of what the trainer writes."""
    proc, _ = train(
        data, tmp_path / "run", "train.epochs=1", "train.max_steps_per_epoch=1", "train.eval_every=0"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (written,) = (tmp_path / "run" / "checkpoints").glob("step-*.pt")
    from pnfs.model import build_model

    cfg = load_config("demo", [*OVERRIDES, *data["overrides"]])
    estimate = checkpoint_bytes(build_model(cfg))
    assert 0.75 < estimate / written.stat().st_size < 1.25, (estimate, written.stat().st_size)


def test_a_clean_config_passes(data, tmp_path):
    cfg = load_config("demo", [*OVERRIDES, *data["overrides"], f"train.out_dir={tmp_path}"])
    assert preflight(cfg, world_size=2) == []


def test_check_prints_the_plan_and_trains_nothing(data, tmp_path):
    proc, _ = train(data, tmp_path / "run", "train.epochs=3", "train.lr_milestones=[2]", "--check")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "preflight: ok" in out
    assert "samples per epoch per rank: 48" in out and "steps per epoch per rank:   12" in out
    assert "global batch: 4" in out and "total steps: 36" in out
    assert "learning rate: epochs 0-1: 0.003, epoch 2: 0.00075" in out
    assert f"checkpoints: {tmp_path / 'run' / 'checkpoints'}" in out
    assert "processes: 1, global batch: 4" in out
    assert "wall time (estimate for 1 process(es) of 1 thread(s) each, from 6 timed steps" in out
    assert " s/step -> " in out and "--check --nproc N" in out
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_check_nproc_plans_and_times_that_many_processes_with_a_thread_per_core(data, tmp_path):
    """``--check --nproc 2`` from one process is the check of the two-process run: its steps and
    batch, timed in two processes under torchrun, each with the threads training gives it."""
    cmd = [PY, "launch/train.py", "--config", "demo", *OVERRIDES, *data["overrides"],
           "--out", str(tmp_path / "run"), "--check", "--nproc", "2"]  # fmt: skip
    env = {k: v for k, v in worker_env().items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    threads = threads_per_process(2, {})
    assert proc.stdout.count("preflight: ok") == 1
    assert "steps per epoch per rank:   6" in proc.stdout and "processes: 2, global batch: 8" in proc.stdout
    # 6 batches per epoch and rank: two warm-up steps leave 4 to time
    assert f"estimate for 2 process(es) of {threads} thread(s) each, from 4 timed steps" in proc.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_threads_per_process_share_the_cores_unless_omp_num_threads_says():
    cores = cpu_cores()
    assert threads_per_process(1, {}) == cores
    assert threads_per_process(2, {}) == max(1, cores // 2)
    assert threads_per_process(4 * cores, {}) == 1
    assert threads_per_process(2, {"OMP_NUM_THREADS": "3"}) == 3


def test_nproc_without_check_is_refused(data, tmp_path):
    proc, s = train(data, tmp_path / "run", "--nproc", "2")
    assert_refused(proc, s, tmp_path / "run", "--nproc goes with --check")


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_torchrun_bad_val_path_one_error_line(data, tmp_path):
    cmd = [
        PY, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        "launch/train.py", "--config", "demo", *OVERRIDES, *data["overrides"],
        f"data.val_shards={tmp_path / 'nope'}", "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=180)
    both = proc.stdout + proc.stderr
    assert both.count("error: ") == 1, both
    assert f"data.val_shards='{tmp_path / 'nope'}'" in both
    assert "Traceback" not in both.split("error: ")[0]  # nothing from the workers before it
    assert "exitcode  : 2" in both, both  # torchrun's summary carries the workers' exit code
    assert proc.returncode != 0


def test_a_url_shard_is_checked_by_opening_the_first_one(data, tmp_path):
    from pnfs.preflight import shard_problems

    val = sorted((data["shards"] / "val").glob("val-*.tar"))[0]
    good = load_config("demo", [f"data.val_shards=pipe:cat {val}"])
    assert shard_problems(good, "val")[0] == []
    bad = load_config("demo", [f"data.val_shards=pipe:cat {tmp_path / 'val-000000.tar'}"])
    (problem,) = shard_problems(bad, "val")[0]
    assert problem.startswith(f"data.val_shards='pipe:cat {tmp_path / 'val-000000.tar'}': the first shard")
    assert "does not open" in problem


def test_detections_file_is_parsed_when_given(data, tmp_path):
    from pnfs.preflight import detection_problems

    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9}]))
    assert detection_problems(load_config("demo", [f"eval.detections={dets}"])) == []
    dets.write_text(json.dumps([{"image_id": 1, "box": [0, 0, 10, 10]}]))
    (problem,) = detection_problems(load_config("demo", [f"eval.detections={dets}"]))
    assert problem.startswith(f"eval.detections='{dets}': is not a list of {{image_id, bbox, score}}")
    (problem,) = detection_problems(load_config("demo", [f"eval.detections={tmp_path / 'none.json'}"]))
    assert "no such file" in problem


def test_evaluation_needs_mpii_head_sizes_and_takes_the_mat(shared_data, tmp_path):
    from pnfs.preflight import evaluation_problems
    from tests.evaluate.test_mpii_gt_valid_mat import write_gt_valid_mat

    root = shared_data / "mpii_sample"
    persons = json.loads((root / "test_mpii.json").read_text())
    sizes = [
        h["head_size"] for h in json.loads((root / "mpii_headsizes_pose-hg-train_valid_h5.json").read_text())
    ]
    write_gt_valid_mat(tmp_path / "gt_valid.mat", persons, sizes)
    base = ["data.dataset=mpii", f"data.val_annotations={root / 'test_mpii.json'}"]
    (problem,) = evaluation_problems(load_config("demo", base), shards=False)
    assert problem.startswith("data.val_head_sizes='': MPII PCKh needs head sizes")
    cfg = load_config("demo", [*base, f"data.val_head_sizes={tmp_path / 'gt_valid.mat'}"])
    assert evaluation_problems(cfg, shards=False) == []
