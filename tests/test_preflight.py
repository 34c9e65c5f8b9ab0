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


# --------------------------------------------------------------------------- preflight-mutant tests
# Issue 26 part 6 (docs/testing.md): each check called directly on hand-made shards, manifests,
# annotation and DeepSpeed files, every expected line written out by hand. In-process and quick,
# so that a mutation run of pnfs/preflight.py can afford them.


def _cfg(*overrides: str):
    return load_config("demo", list(overrides))


def _tar(path: Path, keys: list[str]) -> Path:
    """A shard with one ``<key>.json`` member per sample key."""
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key in keys:
            info = tarfile.TarInfo(f"{key}.json")
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    return path


def _manifest(folder: Path, split: str, samples: dict[str, int], **entry) -> Path:
    """``manifest.json`` of ``folder`` with one split: its shards' sample counts and ``entry``."""
    manifest = folder / "manifest.json"
    shards = [{"file": name, "samples": n} for name, n in samples.items()]
    manifest.write_text(json.dumps({"splits": {split: {"shards": shards, **entry}}}))
    return manifest


# the demo config: data.margin 1.25, data.scale_range [0.75, 1.25], data.input_size [128, 96]
COVERED = {"margin": 1.25, "max_scale": 1.25, "aspect_range": [0.75, 1.0]}


def test_a_problem_is_one_line_of_key_value_what_and_fix():
    from pnfs.preflight import problem

    assert (
        problem("data.scale_range", [1, 2], "is wrong", "fix it")
        == "data.scale_range=[1, 2]: is wrong; fix it"
    )
    assert problem("k", "v", "w", "f") == "k='v': w; f"


def test_coverage_names_a_scale_beyond_the_crops_with_the_max_scale_to_reshard_with():
    from pnfs.preflight import coverage_problems

    cfg, m = _cfg("data.margin=1.5"), Path("/data/train/manifest.json")
    # the augmentation reaches 1.5 x 1.25 = 1.875 of the box; the crops hold 1.25 x 1.4 = 1.75
    assert coverage_problems(cfg, "data.train_shards", m, {"margin": 1.25, "max_scale": 1.4}) == [
        "data.scale_range=[0.75, 1.25]: with data.margin=1.5 the augmentation reaches 1.88 x the box, but "
        "the crops of data.train_shards's shards (/data/train/manifest.json) hold margin 1.25 x max_scale "
        "1.4 = 1.75; lower data.scale_range / data.margin or re-shard with --max-scale 1.5"
    ]
    assert coverage_problems(cfg, "k", m, {"margin": 1.25, "max_scale": 1.5}) == []  # 1.875 exactly
    assert coverage_problems(cfg, "k", m, {"margin": 1.25, "max_scale": 1.5 * (1 - 5e-7)}) == []
    assert len(coverage_problems(cfg, "k", m, {"margin": 1.25, "max_scale": 1.5 * (1 - 5e-6)})) == 1
    # a reach at the tolerance exactly passes: 1.25000125 is the float 1.25 * (1 + 1e-6)
    at_edge = _cfg("data.margin=1.0", "data.scale_range=[0.75,1.25000125]")
    assert coverage_problems(at_edge, "k", m, {"margin": 1, "max_scale": 1.25}) == []
    # without both numbers there is nothing to compare
    assert coverage_problems(cfg, "k", m, {"max_scale": 1.0}) == []
    assert coverage_problems(cfg, "k", m, {"margin": 1.0}) == []
    assert coverage_problems(cfg, "k", m, {}) == []
    assert coverage_problems(_cfg(), "k", m, COVERED) == []


def test_coverage_names_an_input_aspect_outside_the_crops_range():
    from pnfs.preflight import coverage_problems

    cfg, m = _cfg(), Path("/m.json")  # input W/H = 96 / 128 = 0.75
    assert coverage_problems(cfg, "data.val_shards", m, {"aspect_range": [0.8, 1.0]}) == [
        "data.input_size=[128, 96]: input aspect W/H=0.75 lies outside the crops' aspect range 0.8..1.0 of "
        "data.val_shards's shards (/m.json); re-shard with --aspect-range covering 0.75"
    ]
    (line,) = coverage_problems(cfg, "k", m, {"aspect_range": [1, 2]})
    assert "aspect range 1.0..2.0 of k's shards" in line
    assert coverage_problems(cfg, "k", m, {"aspect_range": [0.75, 1.0]}) == []
    assert coverage_problems(cfg, "k", m, {"aspect_range": [0.5, 0.75]}) == []  # H/W would be 1.33
    assert coverage_problems(cfg, "k", m, {"aspect_range": [0.75 * (1 + 5e-7), 1.0]}) == []
    assert coverage_problems(cfg, "k", m, {"aspect_range": [0.5, 0.75 * (1 - 5e-7)]}) == []
    assert len(coverage_problems(cfg, "k", m, {"aspect_range": [0.75 * (1 + 5e-6), 1.0]})) == 1
    # aspects at the tolerance exactly pass: these floats times 1 -/+ 1e-6 are 0.75 exactly
    assert coverage_problems(cfg, "k", m, {"aspect_range": [0.7500007500007501, 1.0]}) == []
    assert coverage_problems(cfg, "k", m, {"aspect_range": [0.5, 0.7499992500007501]}) == []
    assert len(coverage_problems(cfg, "k", m, {"aspect_range": [0.5, 0.75 * (1 - 5e-6)]})) == 1
    both = coverage_problems(cfg, "k", m, {"margin": 1.0, "max_scale": 1.0, "aspect_range": [0.8, 1.0]})
    assert [p.split("=", 1)[0] for p in both] == ["data.scale_range", "data.input_size"]


def test_local_shards_that_agree_with_their_manifest_give_their_paths_and_counts(tmp_path):
    from pnfs.preflight import ShardFacts, shard_problems

    folder = tmp_path / "shards"
    p0 = _tar(folder / "train-000000.tar", ["1_1", "1_2", "2_3"])
    p1 = _tar(folder / "train-000001.tar", ["3_4", "4_5"])
    _tar(folder / "val-000000.tar", ["9_9"])  # another split's shard in the same folder
    samples = {"train-000000.tar": 3, "train-000001.tar": 2}
    _manifest(folder, "train", samples, joint_set="coco", options=COVERED)
    cfg = _cfg(f"data.train_shards={folder}", "data.on_error=raise")
    assert shard_problems(cfg, "train") == ([], ShardFacts([str(p0), str(p1)], [3, 2]))


def test_a_shard_that_differs_from_its_manifest_stops_the_run_only_under_on_error_raise(tmp_path):
    from pnfs.preflight import shard_problems

    folder = tmp_path / "shards"
    p0 = _tar(folder / "train-000000.tar", ["1_1", "1_2", "2_3"])
    manifest = _manifest(folder, "train", {"train-000000.tar": 4})
    problems, facts = shard_problems(_cfg(f"data.train_shards={folder}", "data.on_error=raise"), "train")
    assert problems == [
        f"data.train_shards='{folder}': {p0}: 3 samples, {manifest} lists 4; "
        "re-shard or copy the shards again"
    ]
    assert facts.counts == [3]
    assert shard_problems(_cfg(f"data.train_shards={folder}"), "train")[0] == []  # on_error=skip


def test_the_preflight_checks_shard_sizes_and_counts_but_hashes_nothing(tmp_path):
    """sha256 is data.verify_shards' check at the loader's start (pnfs.data.shards.manifest),
    not the preflight's: it would read every shard twice."""
    from pnfs.preflight import shard_problems

    folder = tmp_path / "shards"
    p0 = _tar(folder / "train-000000.tar", ["1_1", "1_2"])
    entry = {"file": p0.name, "samples": 2, "bytes": p0.stat().st_size, "sha256": "0" * 64}
    (folder / "manifest.json").write_text(json.dumps({"splits": {"train": {"shards": [entry]}}}))
    cfg = _cfg(f"data.train_shards={folder}", "data.on_error=raise", "data.verify_shards=true")
    assert shard_problems(cfg, "train")[0] == []
    entry["bytes"] += 1
    (folder / "manifest.json").write_text(json.dumps({"splits": {"train": {"shards": [entry]}}}))
    (line,) = shard_problems(cfg, "train")[0]
    assert line.endswith(
        f"{p0}: {entry['bytes'] - 1} bytes, {folder / 'manifest.json'} lists {entry['bytes']}; "
        "re-shard or copy the shards again"
    )


def test_shards_of_another_joint_set_are_named_with_the_manifest(tmp_path):
    from pnfs.preflight import shard_problems

    folder = tmp_path / "shards"
    # a split name with dashes: the manifest's split is the file name up to its last dash
    _tar(folder / "coco-train-000000.tar", ["1_1"])
    _tar(folder / "coco-train-000001.tar", ["2_2"])
    manifest = _manifest(folder, "coco-train", {}, joint_set="mpii")
    problems, facts = shard_problems(_cfg(f"data.train_shards={folder}"), "train")
    assert problems == [
        f"data.train_shards='{folder}': the shards hold joint set 'mpii' ({manifest}), the config trains "
        "'coco' (data.dataset='coco', data.keypoints=None); point at shards of the configured dataset or fix "
        "data.dataset / data.keypoints"
    ]
    assert facts.counts == [1, 1]
    _manifest(folder, "coco-train", {}, joint_set="coco")
    assert shard_problems(_cfg(f"data.train_shards={folder}"), "train")[0] == []
    _manifest(folder, "coco-train", {})  # a manifest without a joint set
    assert shard_problems(_cfg(f"data.train_shards={folder}"), "train")[0] == []


def test_the_manifests_coverage_options_are_checked_under_the_shards_key(tmp_path):
    from pnfs.preflight import shard_problems

    folder = tmp_path / "shards"
    _tar(folder / "train-000000.tar", ["1_1"])
    manifest = _manifest(folder, "train", {}, options={"margin": 1.25, "max_scale": 1.0})
    (line,) = shard_problems(_cfg(f"data.train_shards={folder}"), "train")[0]
    assert line.startswith("data.scale_range=[0.75, 1.25]: with data.margin=1.25 the augmentation reaches")
    assert f"the crops of data.train_shards's shards ({manifest}) hold" in line
    assert line.endswith("re-shard with --max-scale 1.25")


def test_an_unusable_manifest_is_passed_over(tmp_path):
    from pnfs.preflight import ShardFacts, shard_problems

    folder = tmp_path / "shards"
    p0 = _tar(folder / "train-000000.tar", ["1_1", "2_2"])
    cfg = _cfg(f"data.train_shards={folder}")
    for text in ("{not json", "[1, 2]", json.dumps({"splits": {"train": "shards"}}), '{"other": 1}'):
        (folder / "manifest.json").write_text(text)
        assert shard_problems(cfg, "train") == ([], ShardFacts([str(p0)], [2])), text


def test_a_shard_whose_index_does_not_parse_is_named_and_counts_nothing(tmp_path):
    from pnfs.preflight import ShardFacts, shard_problems

    folder = tmp_path / "shards"
    p0 = _tar(folder / "train-000000.tar", ["1_1"])
    (folder / "train-000000.idx").write_text("v1.2 1\nbad line\n")
    problems, facts = shard_problems(_cfg(f"data.train_shards={folder}"), "train")
    (line,) = problems
    assert line.startswith(f"data.train_shards='{folder}': a shard cannot be indexed (")
    assert "expected groups of 'ext offset size name'" in line and line.endswith("); re-shard it")
    assert facts == ShardFacts([str(p0)], None)


def test_empty_missing_and_wrong_shard_paths_are_named_with_what_to_do(tmp_path):
    from pnfs.preflight import shard_problems

    assert shard_problems(_cfg("data.val_shards="), "val") == (
        ["data.val_shards='': is empty; give the val shards (a folder, brace pattern or URL)"],
        None,
    )
    fix = "; fix the path (shard with data_prep/shard_coco.py or shard_mpii.py)"
    gone = tmp_path / "gone" / "train-{000000..000001}.tar"
    (line,), facts = shard_problems(_cfg(f"data.train_shards={gone}"), "train")
    assert line.startswith(f"data.train_shards='{gone}': ") and line.endswith(fix) and facts is None
    assert "does not exist" in line  # the reader's FileNotFoundError
    index = _tar(tmp_path / "train-000000.tar", ["1_1"]).with_suffix(".idx")
    index.write_text("v1.2 0\n")
    (line,), facts = shard_problems(_cfg(f"data.train_shards={index}"), "train")
    assert line.startswith(f"data.train_shards='{index}': {index} is not a .tar shard")  # its ValueError
    assert line.endswith(fix) and facts is None


def test_a_url_shard_gives_its_paths_and_no_counts(tmp_path):
    from pnfs.preflight import ShardFacts, shard_problems

    val = _tar(tmp_path / "val-000000.tar", ["1_1"])
    assert shard_problems(_cfg(f"data.val_shards=pipe:cat {val}"), "val") == (
        [],
        ShardFacts([f"pipe:cat {val}"], None),
    )
    gone = tmp_path / "gone.tar"
    (line,), facts = shard_problems(_cfg(f"data.val_shards=pipe:cat {gone}"), "val")
    assert line.startswith(
        f"data.val_shards='pipe:cat {gone}': the first shard pipe:cat {gone} does not open ("
    )
    assert line.endswith("); fix the URL") and "\n" not in line and facts is None


def test_opening_a_url_reads_one_tar_header_and_names_the_first_line_of_the_error(monkeypatch):
    import webdataset

    from pnfs.preflight import _open_first_url

    reads = []

    class Stream:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, n=-1):
            reads.append(n)
            return b""

    def gopen(url, mode):
        if url == "good":
            assert mode == "rb"
            return Stream()
        raise {"two": OSError(" first line\nsecond line"), "blank": OSError("  \n ")}[url]

    monkeypatch.setattr(webdataset, "gopen", gopen)
    assert _open_first_url("good") is None and reads == [512]
    assert _open_first_url("two") == "first line"
    assert _open_first_url("blank") == "OSError"


def test_annotation_problems_name_the_file_and_the_kind_it_is(tmp_path):
    from pnfs.preflight import annotation_problems

    def check(path, *extra):
        return annotation_problems(_cfg(f"data.val_annotations={path}", *extra))

    assert check("") == ["data.val_annotations='': is empty; give the validation annotations"]
    gone = tmp_path / "gone.json"
    assert check(gone) == [f"data.val_annotations='{gone}': no such file; fix the path"]
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    (line,) = check(bad)
    assert line.startswith(f"data.val_annotations='{bad}': not readable JSON (")
    assert line.endswith("); give the annotation json")
    coco, listed, images_only, anns_only = (tmp_path / f"{n}.json" for n in ("c", "l", "i", "a"))
    coco.write_text(json.dumps({"images": [], "annotations": []}))
    listed.write_text("[]")
    images_only.write_text(json.dumps({"images": []}))
    anns_only.write_text(json.dumps({"annotations": []}))
    assert check(coco) == []
    assert check(listed) == [
        f"data.val_annotations='{listed}': is an MPII-style list of persons, but data.dataset='coco'; "
        "give person_keypoints_val*.json or set data.dataset"
    ]
    for path in (images_only, anns_only):
        assert check(path) == [
            f"data.val_annotations='{path}': is not a COCO keypoint file, but data.dataset='coco'; "
            "give person_keypoints_val*.json or set data.dataset"
        ]
    assert check(coco, "data.dataset=mpii") == [
        f"data.val_annotations='{coco}': is a COCO-style file, but data.dataset='mpii'; "
        "give annot/valid.json or set data.dataset"
    ]
    assert check(images_only, "data.dataset=mpii") == [
        f"data.val_annotations='{images_only}': is not an MPII valid.json, but data.dataset='mpii'; "
        "give annot/valid.json or set data.dataset"
    ]


def _mpii_person(**extra) -> dict:
    joints = [[10.0 + j, 20.0 + j] for j in range(16)]
    return {"joints": joints, "joints_vis": [1] * 16, "image": "a.jpg", **extra}


def test_mpii_annotations_need_head_sizes_from_boxes_or_a_file(tmp_path):
    from pnfs.preflight import annotation_problems

    boxed, bare, broken = tmp_path / "boxed.json", tmp_path / "bare.json", tmp_path / "broken.json"
    boxed.write_text(json.dumps([_mpii_person(headbox=[0, 0, 30, 40])]))
    bare.write_text(json.dumps([_mpii_person()]))
    broken.write_text(json.dumps([{"image": "a.jpg"}]))

    def check(path, heads=""):
        return annotation_problems(
            _cfg("data.dataset=mpii", f"data.val_annotations={path}", f"data.val_head_sizes={heads}")
        )

    assert check(boxed) == []
    assert check(bare) == [
        f"data.val_head_sizes='': MPII PCKh needs head sizes and {bare} has no head boxes; set "
        "data.val_head_sizes to HRNet's annot/gt_valid.mat (or a head-size json)"
    ]
    gone = tmp_path / "gt_valid.mat"
    assert check(bare, gone) == [
        f"data.val_head_sizes='{gone}': no such file; fix the path (HRNet's annot/gt_valid.mat)"
    ]
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps([{"image": "a.jpg", "head_size": 30.0}]))
    assert check(bare, heads) == []
    heads.write_text(json.dumps([{"head_size": 30.0}, {"head_size": 31.0}]))  # two sizes, one person
    (line,) = check(bare, heads)
    assert line.startswith(f"data.val_head_sizes='{heads}': {heads}: expected a list of 1 head sizes")
    assert line.endswith("; fix the file")
    (line,) = check(broken)  # another refusal of the reader, no head-size file: the annotations' key
    assert line.startswith(f"data.val_annotations='{broken}': {broken}: person 0 is malformed")
    assert line.endswith("; fix the file")


def test_shard_image_ids_are_the_digits_before_the_first_underscore(tmp_path):
    from pnfs.preflight import ShardFacts, shard_image_ids

    a = _tar(tmp_path / "val-000000.tar", ["12_5", "12_6_1", "x_1"])
    b = _tar(tmp_path / "val-000001.tar", ["7_1", "30"])
    assert shard_image_ids(ShardFacts([str(a), str(b)], [3, 2])) == [12, 12, 7, 30]


def test_val_shards_with_images_the_annotations_lack_are_named(tmp_path):
    from pnfs.preflight import ShardFacts, annotation_match_problems

    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 7}, {"id": "12"}], "annotations": []}))
    a = _tar(tmp_path / "val" / "val-000000.tar", ["7_1", "30_2", "30_3"])
    b = _tar(tmp_path / "val" / "val-000001.tar", ["31_4", "32_5", "40_6", "12_7"])
    folder = tmp_path / "val"
    cfg = _cfg(f"data.val_annotations={ann}", f"data.val_shards={folder}")
    facts = ShardFacts([str(a), str(b)], [3, 4])
    assert annotation_match_problems(cfg, facts) == [
        f"data.val_annotations='{ann}': 5 of the 7 samples of data.val_shards='{folder}' show images it "
        "does not have (image ids 30, 31, 32, ...); give the annotation file the val shards were written "
        "from (their manifest.json names it)"
    ]
    _tar(b, ["31_4", "32_5", "12_7"])
    (line,) = annotation_match_problems(cfg, ShardFacts([str(a), str(b)], [3, 3]))
    assert "4 of the 6 samples" in line and "(image ids 30, 31, 32);" in line
    _tar(a, ["7_1"])
    _tar(b, ["12_7", "12_8"])
    assert annotation_match_problems(cfg, ShardFacts([str(a), str(b)], [1, 2])) == []
    _tar(a, ["99_1"])  # an image the annotations lack, where nothing is checked:
    assert annotation_match_problems(_cfg("data.dataset=mpii", f"data.val_annotations={ann}"), facts) == []
    assert annotation_match_problems(cfg, None) == []
    assert annotation_match_problems(cfg, ShardFacts([str(a)], None)) == []  # URLs
    for text in (
        "{",
        json.dumps({"annotations": []}),
        json.dumps({"images": [None]}),
        json.dumps({"images": [{"id": "x"}]}),
    ):
        ann.write_text(text)  # annotation_problems names these
        assert annotation_match_problems(cfg, facts) == [], text
    ann.unlink()
    assert annotation_match_problems(cfg, facts) == []


def test_detection_problems_name_the_file_and_what_it_should_hold(tmp_path):
    from pnfs.preflight import detection_problems

    def check(path):
        return detection_problems(_cfg(f"eval.detections={path}"))

    assert detection_problems(_cfg()) == [] and check("") == []
    gone = tmp_path / "gone.json"
    assert check(gone) == [
        f"eval.detections='{gone}': no such file; fix the path or leave it unset for ground-truth boxes"
    ]
    dets = tmp_path / "dets.json"
    for bad in ("{", None):
        if bad is None:
            dets.unlink()
            dets.mkdir()  # a folder: an OSError that is not FileNotFoundError
        else:
            dets.write_text(bad)
        (line,) = check(dets)
        assert line.startswith(f"eval.detections='{dets}': not readable JSON (")
        assert line.endswith("); give a COCO detection-result json")
    dets = tmp_path / "d.json"
    box = {"image_id": 1, "bbox": [0, 0, 4, 4], "score": 0.5}
    for good in ([], [box], [{**box, "category_id": 1}]):
        dets.write_text(json.dumps(good))
        assert check(dets) == [], good
    for bad in ({"0": box}, [1], [box, {"image_id": 2, "bbox": [0, 0, 4, 4]}]):
        dets.write_text(json.dumps(bad))
        assert check(dets) == [
            f"eval.detections='{dets}': is not a list of {{image_id, bbox, score}}; "
            "give a COCO detection-result json"
        ], bad


def _small_module():
    """Weights 32 B trained + 8 B frozen, buffers 40 B: 1.05 x (40 + 40 + 2 x 32) = 151.2 B."""
    import torch

    module = torch.nn.Linear(3, 2)  # 6 + 2 float32
    module.frozen = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16), requires_grad=False)
    module.register_buffer("stat", torch.zeros(5, dtype=torch.float64))
    return module


def test_checkpoint_bytes_count_weights_buffers_and_adams_moments_of_the_trained_ones():
    import torch

    assert checkpoint_bytes(_small_module()) == 151
    big = torch.nn.Module()
    big.w = torch.nn.Parameter(torch.zeros(2**20))  # 4 MiB: 1.05 x 3 x 4 MiB
    assert checkpoint_bytes(big) == int(1.05 * 12 * 2**20)


def test_backbone_weights_are_loaded_only_from_a_file(tmp_path):
    import torch

    from pnfs.model import build_model
    from pnfs.preflight import weights_problems

    for name in ("none", "imagenet"):  # resolved when training starts, not loaded here
        cfg = _cfg()
        cfg.model.backbone.weights = name  # the demo's fabric has no ImageNet weights: set past validation
        assert weights_problems(cfg, None) == []
    assert weights_problems(_cfg(), None) == []  # the demo's null
    # the reader's own prefix "model.backbone.weights: " twice in its message: only the first is
    # the key, the second is in the file name
    gone = tmp_path / "model.backbone.weights: w.pth"
    cfg = _cfg(*TINY_OVERRIDES)
    model = build_model(cfg)
    cfg.model.backbone.weights = str(gone)  # an override would read "a: b" as a YAML mapping
    assert weights_problems(cfg, model) == [f"model.backbone.weights='{gone}': '{gone}' does not exist"]
    good = tmp_path / "good.pth"
    torch.save(model.backbone.state_dict(), good)
    assert weights_problems(_cfg(*TINY_OVERRIDES, f"model.backbone.weights={good}"), model) == []


def test_the_run_folder_is_made_and_written_to(tmp_path):
    from pnfs.preflight import run_folder_problems

    out = tmp_path / "a" / "b" / "run"
    assert run_folder_problems(_cfg(f"train.out_dir={out}"), _small_module()) == []
    assert out.is_dir() and list(out.iterdir()) == []  # the probe file is gone
    (tmp_path / "file").write_text("")
    below = tmp_path / "file" / "run"
    assert run_folder_problems(_cfg(f"train.out_dir={below}"), _small_module()) == [
        f"train.out_dir='{below}': not writable (Not a directory); choose another --out"
    ]


def test_a_run_folder_that_refuses_files_is_named(tmp_path, monkeypatch):
    """The probe file goes into the run folder itself: one that exists but takes no files (read
    only; root writes anywhere, so the refusal is made here) is named."""
    import errno
    import tempfile

    from pnfs.preflight import run_folder_problems

    real = tempfile.NamedTemporaryFile
    out = tmp_path / "read-only"

    def probe(*args, **kwargs):
        if kwargs.get("dir") is not None and Path(kwargs["dir"]) == out:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", probe)
    assert run_folder_problems(_cfg(f"train.out_dir={out}"), _small_module()) == [
        f"train.out_dir='{out}': not writable (Permission denied); choose another --out"
    ]


def test_the_run_folder_needs_room_for_keep_last_plus_one_checkpoints(tmp_path, monkeypatch):
    import shutil
    from types import SimpleNamespace

    import torch

    from pnfs.preflight import run_folder_problems

    asked, free = [], [0]

    def disk_usage(path):
        asked.append(Path(path))
        return SimpleNamespace(total=2 * free[0], used=free[0], free=free[0])

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    cfg = _cfg(f"train.out_dir={tmp_path}")  # train.keep_last=3: 4 checkpoints of 151 B
    free[0] = 604
    assert run_folder_problems(cfg, _small_module()) == [] and asked == [tmp_path]
    free[0] = 603
    assert len(run_folder_problems(cfg, _small_module())) == 1
    big = torch.nn.Module()
    big.w = torch.nn.Parameter(torch.zeros(2**20))  # 12.6 MiB a checkpoint, 50.4 MiB for 4
    free[0] = 10 * 2**20
    assert run_folder_problems(cfg, big) == [
        f"train.out_dir='{tmp_path}': 10 MiB free, 4 checkpoints (train.keep_last=3 + 1) need about 50 MiB; "
        "free disk space, choose another --out or lower train.keep_last"
    ]


def test_deepspeed_problems_name_the_file_and_each_field_that_disagrees(tmp_path):
    from pnfs.preflight import deepspeed_problems

    cfg = _cfg()  # train.batch_size=8
    assert deepspeed_problems(cfg, None, 2) == []
    gone = tmp_path / "gone.json"
    assert deepspeed_problems(cfg, str(gone), 1) == [
        f"--deepspeed='{gone}': no such file; fix the path (e.g. launch/deepspeed_zero1.json)"
    ]
    ds = tmp_path / "ds.json"
    ds.write_text("{")
    (line,) = deepspeed_problems(cfg, str(ds), 1)
    assert line.startswith(f"--deepspeed='{ds}': not valid JSON (") and line.endswith("); fix the json")
    (line,) = deepspeed_problems(cfg, str(tmp_path), 1)  # a folder
    assert line.startswith(f"--deepspeed='{tmp_path}': not valid JSON (") and line.endswith("); fix the json")

    def check(obj, world_size=2):
        ds.write_text(json.dumps(obj))
        return deepspeed_problems(cfg, str(ds), world_size)

    assert check([1]) == [f"--deepspeed='{ds}': is not a JSON object; fix the json"]
    for good in (
        {},
        {"zero_optimization": None},
        {"zero_optimization": {"stage": 0}},
        {"zero_optimization": {"stage": 1}},
        {"zero_optimization": {}},
        {"train_micro_batch_size_per_gpu": 8, "train_batch_size": 16},
        {"gradient_accumulation_steps": 2, "train_batch_size": 32},
        {"gradient_accumulation_steps": 0, "train_batch_size": 16},
        {"gradient_accumulation_steps": None, "train_batch_size": 16},
    ):
        assert check(good) == [], good
    assert check({"train_batch_size": 8}, world_size=1) == []
    assert check(
        {
            "zero_optimization": {"stage": 2},
            "train_micro_batch_size_per_gpu": 4,
            "train_batch_size": 16,
            "gradient_accumulation_steps": 2,
        }
    ) == [
        f"--deepspeed='{ds}': zero_optimization.stage=2; pnfs supports 0 and 1; use stage 0 or 1",
        f"--deepspeed='{ds}': train_micro_batch_size_per_gpu=4 but train.batch_size=8; drop the field "
        "(pnfs fills it) or make them equal",
        f"--deepspeed='{ds}': train_batch_size=16 but train.batch_size x gradient_accumulation_steps x world "
        "size = 8 x 2 x 2 = 32; drop the field (pnfs fills it) or make them agree",
    ]
    (line,) = check({"zero_optimization": {"stage": "3"}})
    assert "zero_optimization.stage='3';" in line


def test_training_counts_leave_out_darts1s_architecture_shards():
    from pnfs.preflight import ShardFacts, training_counts

    paths = [f"train-{i:06d}.tar" for i in range(6)]
    assert training_counts(_cfg(), ShardFacts(paths[:2], [3, 4])) == [3, 4]
    assert training_counts(_cfg(), ShardFacts(paths[:2], None)) == []
    # search.arch_split [2, 1]: shards 2 and 5 train the architecture
    darts1 = _cfg("search.strategy=darts1")
    assert training_counts(darts1, ShardFacts(paths, [1, 2, 3, 4, 5, 6])) == [1, 2, 4, 5]


def test_steps_per_epoch_are_whole_batches_per_rank_up_to_max_steps_per_epoch():
    from pnfs.preflight import steps_per_epoch

    cfg = _cfg("train.batch_size=4")
    assert steps_per_epoch(cfg, [5, 6, 7], 1) == (16, 4)  # 18 // 4 = 4 batches
    assert steps_per_epoch(cfg, [5, 6, 7], 2) == (8, 2)  # 18 // 2 = 9 a rank, 9 // 4 = 2
    assert steps_per_epoch(_cfg("train.batch_size=4", "train.max_steps_per_epoch=3"), [5, 6, 7], 1) == (16, 3)
    assert steps_per_epoch(_cfg("train.batch_size=4", "train.max_steps_per_epoch=5"), [5, 6, 7], 1) == (16, 4)


def test_batch_problems_name_an_epoch_without_a_step_and_darts1s_shard_count():
    from pnfs.preflight import ShardFacts, batch_problems

    cfg = _cfg("train.batch_size=30")
    facts = ShardFacts(["train-000000.tar", "train-000001.tar"], [24, 24])
    assert batch_problems(cfg, facts, 2) == [
        "train.batch_size=30: 48 training samples over 2 process(es) give no full step per epoch; "
        "lower train.batch_size or use fewer processes"
    ]
    assert batch_problems(cfg, facts, 1) == []  # one step
    assert batch_problems(cfg, None, 2) == [] and batch_problems(cfg, ShardFacts(facts.paths, None), 2) == []
    assert batch_problems(_cfg("search.strategy=darts1"), facts, 1) == [
        "search.arch_split: [2, 1] needs at least 3 training shards to hold a fixed part out for the "
        "architecture step; data.train_shards gives 2"
    ]


def test_evaluation_problems_list_shards_annotations_and_detections_in_order(tmp_path):
    from pnfs.preflight import evaluation_problems

    gone = tmp_path / "gone"
    cfg = _cfg(f"data.val_shards={gone}", f"data.val_annotations={gone}.json", f"eval.detections={gone}.d")
    keys = [p.split("=", 1)[0] for p in evaluation_problems(cfg)]
    assert keys == ["data.val_shards", "data.val_annotations", "eval.detections"]
    keys = [p.split("=", 1)[0] for p in evaluation_problems(cfg, shards=False)]
    assert keys == ["data.val_annotations", "eval.detections"]
    # annotations that parse but lack the val shards' images
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    _tar(tmp_path / "val" / "val-000000.tar", ["2_1"])
    cfg = _cfg(f"data.val_shards={tmp_path / 'val'}", f"data.val_annotations={ann}")
    (line,) = evaluation_problems(cfg)
    assert line.startswith(f"data.val_annotations='{ann}': 1 of the 1 samples")
    assert evaluation_problems(cfg, shards=False) == []


def test_preflight_runs_every_check_and_the_evaluations_when_the_run_evaluates(tmp_path):
    from pnfs.preflight import preflight

    _tar(tmp_path / "train" / "train-000000.tar", [f"{i}_{i}" for i in range(6)])
    (tmp_path / "file").write_text("")
    base = [
        *TINY_OVERRIDES,
        f"data.train_shards={tmp_path / 'train'}",
        f"data.val_shards={tmp_path / 'gone'}",
    ]
    base += [f"data.val_annotations={tmp_path / 'gone.json'}", f"train.out_dir={tmp_path / 'run'}"]
    assert preflight(_cfg(*base, "train.eval_every=0")) == []  # no evaluation: its inputs unchecked
    assert preflight(_cfg(*base, "train.eval_every=1"), evaluates=False) == []
    evaluation = ["data.val_shards", "data.val_annotations"]
    for cfg, evaluates in (
        (_cfg(*base, "train.eval_every=1"), None),
        (_cfg(*base, "train.eval_every=0"), True),
    ):
        assert [p.split("=", 1)[0] for p in preflight(cfg, evaluates=evaluates)] == evaluation
    (tmp_path / "w.pth").write_text("not a state dict")
    wrong = _cfg(
        *base,
        f"model.backbone.weights={tmp_path / 'w.pth'}",
        f"train.out_dir={tmp_path / 'file' / 'run'}",
    )
    keys = [
        p.split("=", 1)[0]
        for p in preflight(wrong, world_size=2, deepspeed_config=str(tmp_path / "ds"), evaluates=True)
    ]
    # 6 samples over 2 processes: 3 a rank, no batch of 4
    assert keys == [*evaluation, "train.batch_size", "--deepspeed", "model.backbone.weights", "train.out_dir"]
    # the train shards' problem stays first when the evaluation's are added
    gone = _cfg(*base, f"data.train_shards={tmp_path / 'nothing'}")
    keys = [p.split("=", 1)[0] for p in preflight(gone, evaluates=True)]
    assert keys == ["data.train_shards", *evaluation]
    # the DeepSpeed json is checked against this config's batch and the world size given
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "train_batch_size": 4}))
    ok = _cfg(*base, f"data.train_shards={tmp_path / 'train'}")
    assert preflight(ok, world_size=1, deepspeed_config=str(ds)) == []
    _tar(tmp_path / "train" / "train-000001.tar", [f"{i}_{i}" for i in range(6, 12)])
    assert preflight(ok, world_size=2, deepspeed_config=str(ds)) == [
        f"--deepspeed='{ds}': train_batch_size=4 but train.batch_size x gradient_accumulation_steps x world "
        "size = 4 x 1 x 2 = 8; drop the field (pnfs fills it) or make them agree"
    ]


def test_the_world_size_comes_from_torchruns_environment(monkeypatch):
    from pnfs.preflight import world_size_from_env

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world_size_from_env() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert world_size_from_env() == 4
    monkeypatch.setenv("WORLD_SIZE", "")
    assert world_size_from_env() == 1
