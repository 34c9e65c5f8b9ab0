"""``make demo``: a real PNFS search on a synthetic data set, end to end, on a CPU.

    python launch/demo.py [--seed S] [--out runs/demo] [--nproc 2] [--train N --val N] [key=value ...]

1. ``data_prep/make_synthetic.py``: procedurally drawn people in COCO format
   (``<data>/raw-seed<S>``);
2. ``data_prep/shard_coco.py`` for train and val (``<data>/shards-seed<S>/{train,val}``);
3. ``torchrun --nproc_per_node=2 launch/train.py --config pnfs/configs/demo.yaml`` on the CPU
   (synchronous search: weights, alpha and beta in one Adam; one intra-op thread per core
   and process), evaluated through pnfs.evaluate (COCO keypoint AP, OKS, flip test, peaks
   refined by a log-Gaussian fit) after every epoch;
4. prints ``demo AP=<value>`` and writes ``<out>/metrics.json`` (the final model's COCO
   metrics), ``<out>/architecture.png`` (+ .json) and pose overlays in ``<out>/eval/overlays``.

The seed drives both the synthetic data and the training, so different seeds are
different experiments. Extra ``key=value`` arguments go to the training config. The
folders of this seed under ``--data`` and the ``--out`` folder are deleted and rewritten.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pnfs.errors import EXIT_USER_ERROR, PnfsUserError, run_main

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
CONFIG = REPO / "pnfs" / "configs" / "demo.yaml"


def step(title: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
    print(f"\n== {title}\n$ {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode == EXIT_USER_ERROR:  # the step printed its own one-line error
        raise PnfsUserError(f"demo: '{title}' stopped on the error above (exit code {EXIT_USER_ERROR})")
    if proc.returncode != 0:
        raise SystemExit(f"demo: '{title}' failed with exit code {proc.returncode}")
    print(f"== {title}: {time.perf_counter() - started:.0f} s", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and of the training")
    p.add_argument("--out", default="runs/demo", help="run folder")
    p.add_argument("--data", default="data/demo", help="where the synthetic set and its shards go")
    p.add_argument("--train", type=int, default=2000, help="people in the synthetic train split")
    p.add_argument("--val", type=int, default=300, help="people in the synthetic val split")
    p.add_argument("--nproc", type=int, default=2, help="training processes (torchrun --nproc_per_node)")
    p.add_argument("overrides", nargs="*", help="training config overrides, e.g. train.epochs=3")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    data, out = (REPO / args.data).resolve(), (REPO / args.out).resolve()
    raw, shards = data / f"raw-seed{args.seed}", data / f"shards-seed{args.seed}"
    for folder in (raw, shards, out):
        shutil.rmtree(folder, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    # one intra-op thread per core and training process (``make`` exports OMP_NUM_THREADS=2)
    train_env = {**env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, args.nproc)))}
    step(
        "synthetic data",
        [
            PY,
            "data_prep/make_synthetic.py",
            "--out",
            str(raw),
            "--train",
            str(args.train),
            "--val",
            str(args.val),
            "--seed",
            str(args.seed),
        ],
        env,
    )
    for split in ("train", "val"):
        step(
            f"shards ({split})",
            [
                PY,
                "data_prep/shard_coco.py",
                "--images",
                str(raw / "images" / split),
                "--annotations",
                str(raw / "annotations" / f"person_keypoints_{split}.json"),
                "--out",
                str(shards / split),
                "--split",
                split,
                "--shard-size",
                "256",
                "--workers",
                str(max(1, args.nproc)),
                "--no-progress",
            ],
            env,
        )
    overrides = [
        f"data.train_shards={shards / 'train'}",
        f"data.val_shards={shards / 'val'}",
        f"data.val_annotations={raw / 'annotations' / 'person_keypoints_val.json'}",
        f"train.seed={args.seed}",
        "train.device=cpu",
        # a log-Gaussian fit of the peak: the quarter offset's 1 input px error costs AP at 32x24 maps
        "eval.refine=gaussian",
        *args.overrides,
    ]
    launcher = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    if args.nproc == 1:
        launcher = [PY]
    step(
        "search (torchrun, CPU)",
        [*launcher, "launch/train.py", "--config", str(CONFIG), "--out", str(out), *overrides],
        train_env,
    )

    result = json.loads((out / "result.json").read_text())
    metrics = result["metrics"]
    if "AP" not in metrics:
        raise SystemExit(f"demo: the run in {out} finished without an evaluation (metrics: {metrics})")
    for suffix in ("png", "json"):
        shutil.copyfile(out / "architecture" / f"final.{suffix}", out / f"architecture.{suffix}")
    minutes = round((time.perf_counter() - started) / 60, 2)
    metrics = {**metrics, "seed": args.seed, "epochs": result["epoch"], "minutes": minutes}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    overlays = sorted((out / "eval" / "overlays").glob("*.png"))
    print(f"\nrun folder {out}: metrics.json, architecture.png, {len(overlays)} overlays in eval/overlays")
    print(f"demo AP={metrics['AP']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
