"""Every shell command of README.md and docs/*.md runs as written, or is listed here with the
reason it cannot run in ``make test``.

The commands are cut out of the pages' ``bash``/``sh``/``console`` blocks by
``tests/support/doc_commands.py``. Each one is either in ``RUN`` (it runs here, in under a minute) or in
``SKIP`` with its reason; a command in neither fails ``test_every_command_is_classified``, so a
new command in the docs must be classified by whoever adds it, and an entry no page holds any
more fails ``test_no_stale_entries``.

The ``RUN`` commands run with bash in a workspace laid out as the docs assume: a checkout
(``launch/``, ``data_prep/``, ``pnfs/``, ``bench/`` of this repository, linked) after the demo
ran. The demo is made at the paths ``make demo`` uses
(``data/demo/raw-seed0``, ``data/demo/shards-seed0/{train,val}``, ``runs/demo`` with
``checkpoints/best.pt``), by the demo's own steps, only smaller: 64 train and 16 val people,
one epoch, one process (``make_demo``). The
virtual environment's ``bin/`` comes first on ``PATH``, which is what
``source .venv/bin/activate`` does; nothing in the commands is rewritten.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.doc_commands import broken_links, documented_commands, untagged_command_lines

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINKED = ("launch", "data_prep", "pnfs", "bench", "kernels")
COMMAND_TIMEOUT = 240  # s; each RUN command takes under a minute on two free cores

TOUR_PREDICT = (
    "python launch/predict.py --checkpoint runs/demo/checkpoints/best.pt "
    "--image data/demo/raw-seed0/images/val/000001000000.jpg "
    "--box 41,94,79,161 --box 213,126,79,129 --out runs/predict"
)
MAKE_SYNTHETIC = "python data_prep/make_synthetic.py --out data/synthetic --train 200 --val 50 --seed 0"

# command -> the command it needs to have run first in the same workspace (None: only the demo)
RUN: dict[str, str | None] = {
    TOUR_PREDICT: None,
    "python launch/predict.py --checkpoint runs/demo/checkpoints/best.pt "
    "--image data/demo/raw-seed0/images/val --detector none --out runs/predict": None,
    "python launch/export.py --checkpoint runs/demo/checkpoints/best.pt --format onnx "
    "--out runs/demo/pose.onnx --decode --flip": None,
    "python launch/evaluate.py --checkpoint runs/demo/checkpoints/best.pt "
    "--data 'data/demo/shards-seed0/val/val-*.tar' --out runs/demo/eval": None,
    "python -m pnfs.evaluate.coco --annotations data/demo/raw-seed0/annotations/person_keypoints_val.json "
    "--results runs/demo/eval/results.json --json": None,
    "python -m pnfs.summary demo": None,
    "python -m pnfs.summary mpii_mobilenetv2_p3_256 model.vector_dim=4 --json": None,
    "python -m pnfs.tradeoff runs/demo --out runs/tradeoff.png": None,
    "python launch/train.py --config demo --check": None,
    MAKE_SYNTHETIC: None,
    "python data_prep/shard_coco.py --images data/synthetic/images/val "
    "--annotations data/synthetic/annotations/person_keypoints_val.json "
    "--out data/synthetic/shards/val --split val --shard-size 256": MAKE_SYNTHETIC,
}

MINUTES = "takes minutes on two cores"
COCO = "needs the COCO 2017 download (docs/data.md)"
MPII = "needs the MPII download (docs/data.md)"
GPUS = "trains a paper preset on GPUs for days"
SKIP: dict[str, str] = {
    "make demo": f"{MINUTES} (about 10); tests/launch/test_demo.py runs a shortened demo",
    "make test": "runs this suite",
    "source .venv/bin/activate": "the test puts the venv's bin/ first on PATH, which is what activating does",
    "python launch/demo.py train.epochs=1": f"{MINUTES} (about 3); the workspace's demo runs the same script "
    "with 64 train / 16 val people",
    "python launch/demo.py --seed 1": (
        f"{MINUTES} (about 10); tests/launch/test_demo.py runs seed 1 shortened"
    ),
    "python launch/predict.py --checkpoint runs/demo/checkpoints/best.pt "
    "--image photo.jpg --out runs/predict": (
        "photo.jpg is the reader's own photo, and the default detector downloads its weights; "
        "the --box form above runs"
    ),
    "python launch/predict.py --checkpoint runs/coco_mobilenetv2_p3_384x288/checkpoints/best.pt "
    "--image coco/val2017 "
    "--boxes coco/person_detection_results/COCO_val2017_detections_AP_H_56_person.json": (
        f"{COCO} and a trained COCO model"
    ),
    "python launch/predict.py --checkpoint runs/demo/checkpoints/best.pt --video clip.mp4 "
    "--box 280,40,220,380 --out runs/predict": (
        "clip.mp4 is the reader's own video; tests/launch/test_predict.py runs predict on a video"
    ),
    "python bench/kernels.py --quick": "a benchmark (torch.compile of every reference, 1-2 min); "
    "tests/kernels/test_kernels.py runs it under the slow marker",
    "torchrun --nproc_per_node=1 launch/train.py --config mpii_mobilenetv2_p3_256 "
    "data.val_annotations=mpii/annot/valid.json "
    "data.val_head_sizes=mpii/annot/gt_valid.mat": f"{MPII}; {GPUS}",
    "torchrun --nproc_per_node=2 launch/evaluate.py --checkpoint runs/demo/checkpoints/best.pt "
    "--data 'data/demo/shards-seed0/val/val-*.tar' --out runs/demo/eval": (
        "two processes; tests/launch/test_evaluate.py runs evaluation on two gloo processes"
    ),
    "python launch/export.py --checkpoint runs/demo/checkpoints/best.pt --format exported-program "
    "--out runs/demo/pose.pt2": "20-50 s; the same command line is tests/launch/test_export.py::"
    "test_exported_program_of_the_score_maps, which also checks the file's scores",
    "python launch/export.py --checkpoint runs/demo/checkpoints/best.pt --format torchscript "
    "--out runs/demo/pose.ts --decode": (
        "20-25 s; tests/launch/test_export.py::test_torchscript_with_decoding "
        "runs it (with --flip) and checks the file's keypoints"
    ),
    # docs/data.md: real data sets
    "python data_prep/shard_coco.py --images coco/train2017 "
    "--annotations coco/annotations/person_keypoints_train2017.json "
    "--out data/coco --workers 8 --verify": COCO,
    "python data_prep/shard_coco.py --images coco/val2017 "
    "--annotations coco/annotations/person_keypoints_val2017.json --out data/coco --workers 8 --verify": COCO,
    "python data_prep/shard_coco.py --images coco/val2017 "
    "--annotations coco/annotations/person_keypoints_val2017.json "
    "--detections coco/person_detection_results/COCO_val2017_detections_AP_H_56_person.json "
    "--split val_det --out data/coco --workers 8": COCO,
    "python data_prep/shard_mpii.py --images mpii/images --annotations mpii/annot/train.json "
    "--out data/mpii --workers 8": MPII,
    "python data_prep/shard_mpii.py --images mpii/images --annotations mpii/annot/valid.json "
    "--out data/mpii --workers 8": MPII,
    "python launch/train.py --config coco_resnet50_p3_384x288 "
    "'data.train_shards=https://data.example.org/coco/train-{000000..000293}.tar' "
    "data.cache_dir=/scratch/pnfs": "an example URL, and a full COCO training run; "
    "tests/data/shards/test_reader.py trains from a local http.server",
    "python launch/train.py --config coco_resnet50_p3_384x288 "
    "'data.train_shards=pipe:aws s3 cp s3://bucket/coco/train-{000000..000293}.tar -' "
    "data.cache_dir=/scratch/pnfs": "an example bucket, and a full COCO training run; "
    "tests/data/shards/test_reader.py reads through pipe:cat",
    "python data_prep/shard_coco.py --images hands/train --annotations hands/train.json "
    "--out data/hands/train --keypoints hand5.yaml": "the reader's own hand data set; "
    "tests/test_keypoints.py shards a YAML keypoint set",
    "python launch/train.py --config coco_mobilenetv2_p3_384x288 data.keypoints=hand5.yaml model.num_parts=2 "
    "data.train_shards=data/hands/train data.val_shards=data/hands/val data.val_annotations=hands/val.json": (
        "the reader's own hand data set; tests/test_keypoints.py trains on a YAML keypoint set"
    ),
    "python data_prep/shard_coco.py --images crowdpose/images "
    "--annotations crowdpose/json/crowdpose_trainval.json --out data/crowdpose/train --keypoints crowdpose": (
        "needs the CrowdPose download"
    ),
    "python -m pnfs.evaluate.coco --annotations crowdpose/json/crowdpose_test.json --results res.json "
    "--keypoints crowdpose --json": "needs the CrowdPose download and a model's results",
    "python data_prep/shard_coco.py --images ochuman/images "
    "--annotations ochuman/ochuman_coco_format_val_range_0.00_1.00.json --out data/ochuman/val --split val": (
        "needs the OCHuman download"
    ),
    "python launch/evaluate.py --checkpoint runs/coco_mobilenetv2_p3_384x288/checkpoints/best.pt "
    "--data 'data/ochuman/val/val-*.tar' --annotations ochuman/ochuman_coco_format_val_range_0.00_1.00.json "
    "--out runs/ochuman-val": "needs the OCHuman download and a trained COCO model",
    # docs/inference.md: real data sets
    "python launch/evaluate.py --checkpoint runs/coco_mobilenetv2_p3_384x288/checkpoints/best.pt "
    "--detections coco/person_detection_results/COCO_val2017_detections_AP_H_56_person.json "
    "--images coco/val2017 --annotations coco/annotations/person_keypoints_val2017.json": (
        f"{COCO} and a trained COCO model"
    ),
    "python -m pnfs.evaluate.mpii --annotations mpii/annot/valid.json --head-sizes mpii/annot/gt_valid.mat "
    "--predictions runs/mpii_mobilenetv2_p3_256/eval/results.json --json": f"{MPII} and a trained MPII "
    "model; tests/evaluate/test_mpii_gt_valid_mat.py runs this line on the MPII sample",
    # docs/training.md: the paper's runs
    'DATA_MPII="data.train_shards=data/mpii/train-*.tar data.val_shards=data/mpii/val-*.tar '
    'data.val_annotations=mpii/annot/valid.json data.val_head_sizes=mpii/annot/gt_valid.mat"': (
        f"sets a variable for the MPII commands that follow; {MPII}; "
        "tests/evaluate/test_mpii_gt_valid_mat.py loads the preset with it on the MPII sample"
    ),
    'DATA_COCO="data.train_shards=data/coco/train-*.tar data.val_shards=data/coco/val-*.tar '
    'data.val_annotations=coco/annotations/person_keypoints_val2017.json"': (
        f"sets a variable for the COCO commands that follow; {COCO}"
    ),
    "python launch/train.py --config mpii_mobilenetv2_p3_256 $DATA_MPII --check": MPII,
    "torchrun --nproc_per_node=1 launch/train.py --config mpii_mobilenetv2_p3_256 $DATA_MPII "
    "model.backbone.weights=weights/mobilenet_v2.pth --out runs/mpii_sync": f"{MPII}; {GPUS}",
    "torchrun --nproc_per_node=8 launch/train.py --config coco_mobilenetv2_p3_384x288 $DATA_COCO "
    "model.backbone.weights=weights/mobilenet_v2.pth --out runs/coco_ours1": f"{COCO}; {GPUS}",
    "torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=node0:29500 "
    "--rdzv_id=pnfs-mpii --max-restarts=3 launch/train.py --config mpii_mobilenetv2_p3_256 $DATA_MPII "
    "--out /shared/runs/mpii --resume auto": f"two nodes; {MPII}; tests/engine/test_distributed.py runs two "
    "'nodes' and an elastic restart on one machine",
    "torchrun --nproc_per_node=8 launch/train.py --config mpii_mobilenetv2_p3_256 $DATA_MPII "
    "--deepspeed launch/deepspeed_zero1.json": (
        f"{MPII}; {GPUS}; tests/engine/test_distributed.py runs DeepSpeed ZeRO-1 on two CPU processes"
    ),
    "for s in 0 1 2 3 4; do\n"
    "torchrun --nproc_per_node=1 launch/train.py --config mpii_mobilenetv2_p3_256 $DATA_MPII "
    "--strategy random search.seed=$s --out runs/mpii_random_$s\n"
    "done": f"{MPII}; {GPUS}, five times",
    "torchrun --nproc_per_node=8 launch/train.py --config mpii_mobilenetv2_p3_256 $DATA_MPII "
    "--out runs/x --resume auto": f"{MPII}; {GPUS}; tests/engine/test_trainer.py resumes runs",
    "torchrun --nproc_per_node=8 launch/train.py --config mpii_mobilenetv2_p3_256 $DATA_MPII "
    "--out runs/x --resume runs/x/checkpoints/step-00012000.pt": f"{MPII}; {GPUS}; "
    "tests/engine/test_trainer.py resumes runs",
}


def commands_in_docs() -> dict[str, list[str]]:
    """command text -> ["doc:line", ...] where it appears."""
    found: dict[str, list[str]] = {}
    for command in documented_commands(DOCS, REPO):
        found.setdefault(command.text, []).append(f"{command.doc}:{command.line}")
    return found


DOCUMENTED = commands_in_docs()


def test_commands_are_cut_out_as_a_reader_types_them(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        textwrap.dedent(
            """\
            Text.
            ```bash
            # a whole-line comment
            python a.py --x 1 \\
                --y 'a # b'   # a trailing comment
            for s in 0 1; do
              echo $s
            done
            ```
            ```console
            $ make demo
            the output
            ```
            ```text
            python hidden.py
            ```
            """
        )
    )
    commands = documented_commands([page], tmp_path)
    assert [(c.line, c.text) for c in commands] == [
        (4, "python a.py --x 1 --y 'a # b'"),
        (6, "for s in 0 1; do\necho $s\ndone"),
        (11, "make demo"),
    ]
    assert untagged_command_lines([page], tmp_path) == ["page.md:15: python hidden.py"]


def test_every_command_is_classified():
    unclassified = [f"{where[0]}: {text!r}" for text, where in DOCUMENTED.items() if text not in RUN | SKIP]
    assert not unclassified, (
        "documented commands that tests/docs/test_docs_commands.py neither runs (RUN) nor skips with a "
        "reason (SKIP):\n" + "\n".join(unclassified)
    )


def test_no_stale_entries():
    stale = sorted((set(RUN) | set(SKIP)) - set(DOCUMENTED))
    assert not stale, "classified commands that no page holds any more:\n" + "\n".join(stale)
    assert not set(RUN) & set(SKIP), "a command is both run and skipped"


def test_no_command_hides_in_an_untagged_block():
    hidden = untagged_command_lines(DOCS, REPO)
    assert not hidden, "command lines in a fenced block without a bash tag:\n" + "\n".join(hidden)


def test_links_between_the_pages_resolve():
    broken = broken_links(DOCS, REPO)
    assert not broken, "links to a missing file or heading:\n" + "\n".join(broken)


def test_the_tour_runs_first_in_the_readme():
    """The README's first commands are the two a newcomer runs, and the tour comes before the
    first training command."""
    readme = [text for text, where in DOCUMENTED.items() if any(w.startswith("README.md:") for w in where)]
    assert readme[:2] == ["make demo", "make test"]
    assert readme.index(TOUR_PREDICT) < readme.index("python launch/train.py --config demo --check")


# --------------------------------------------------------------------------- running them


def bash_env() -> dict[str, str]:
    """The caller's environment with the venv's bin/ first on PATH (as activating it does), no
    torchrun rank variables, one intra-op thread per process (make test's two cores)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return env


class Workspace:
    """A checkout after the demo, in a temporary folder; runs documented commands in it once."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[str, subprocess.CompletedProcess] = {}

    def run(self, command: str) -> subprocess.CompletedProcess:
        if command not in self.done:
            needed = RUN.get(command)
            if needed is not None:
                first = self.run(needed)
                assert first.returncode == 0, f"{needed!r}, needed first, failed:\n{first.stdout[-3000:]}"
            self.done[command] = subprocess.run(
                ["bash", "-c", command],
                cwd=self.root,
                env=bash_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=COMMAND_TIMEOUT,
            )
        return self.done[command]


def make_demo(root: Path) -> None:
    """The steps of launch/demo.py at its paths under ``root``, smaller: 64 train and 16 val
    people, one epoch in one process with one thread (the demo's own thread count assumes
    two free cores, and a loaded CI machine has none to spare)."""
    raw, shards = Path("data/demo/raw-seed0"), Path("data/demo/shards-seed0")
    steps = [
        ["data_prep/make_synthetic.py", "--out", str(raw), "--train", "64", "--val", "16", "--seed", "0"],
        *(
            [
                "data_prep/shard_coco.py",
                "--images",
                str(raw / "images" / split),
                "--annotations",
                str(raw / "annotations" / f"person_keypoints_{split}.json"),
                "--out",
                str(shards / split),
                "--split",
                split,
                "--no-progress",
            ]
            for split in ("train", "val")
        ),
        # the demo preset reads the shards and annotations above; launch/demo.py's overrides
        [
            "launch/train.py",
            "--config",
            "demo",
            "--out",
            "runs/demo",
            "train.epochs=1",
            "train.device=cpu",
            "eval.refine=gaussian",
            "data.num_workers=0",
        ],
    ]
    for step in steps:
        proc = subprocess.run(
            [sys.executable, *step], cwd=root, env=bash_env(), capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"{step}:\n{(proc.stdout + proc.stderr)[-4000:]}"


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("docs-workspace")
    for name in LINKED:
        (root / name).symlink_to(REPO / name, target_is_directory=True)
    make_demo(root)
    assert (root / "runs" / "demo" / "checkpoints" / "best.pt").is_file()
    return Workspace(root)


@pytest.mark.timeout(COMMAND_TIMEOUT * 2 + 1200)  # the first one also makes the demo
@pytest.mark.parametrize("command", list(RUN), ids=[DOCUMENTED.get(c, ["not documented"])[0] for c in RUN])
def test_documented_command_runs_as_written(workspace, command):
    assert command in DOCUMENTED, f"not in any page: {command!r}"
    started = time.perf_counter()
    proc = workspace.run(command)
    assert proc.returncode == 0, (
        f"{DOCUMENTED[command][0]}: exit code {proc.returncode} after {time.perf_counter() - started:.0f} s "
        f"for\n  {command}\n{proc.stdout[-4000:]}"
    )
