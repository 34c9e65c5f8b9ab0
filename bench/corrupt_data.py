"""Clean vs corrupt: the same short demo training on the synthetic shards and on a copy with
one garbled JPEG and one truncated shard (issue 13's "done when").

    python bench/corrupt_data.py [--work runs/corrupt-bench] [--train 600] [--val 100] [--epochs 3] \
        [--seeds 0,1,2] [--json FILE]

1. ``data_prep/make_synthetic.py`` + ``data_prep/shard_coco.py`` (shards of 75 people);
2. a copy of the train shards where sample 2 of ``train-000001.tar`` has a quarter of its JPEG
   zeroed in the middle (the decoder's "Corrupt JPEG data") and ``train-000003.tar`` is cut in
   the middle of its third-to-last sample's JPEG (an upload cut short: its last 3 samples are
   lost);
3. ``launch/train.py --config pnfs/configs/demo.yaml`` on each, for every training seed of
   ``--seeds`` (one process, the demo's model at ``--epochs`` epochs, evaluated once at the
   end; ``data.max_bad_samples=10``, as the default, 0.1% of an epoch, would stop this run at
   its second bad sample);
4. prints one line per seed (clean and corrupt AP / AR, steps, the corrupt - clean AP) and, with
   several seeds, the clean runs' AP range: the noise the corrupt runs' difference is set
   against; then one JSON line with all of it and each corrupt run's bad-sample report
   (reason, shard, key per sample, counts), as ``result.json`` holds them (``--json`` writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pnfs.data import ShardSet  # noqa: E402

PY = sys.executable
GARBLED = ("train-000001.tar", 2)
TRUNCATED = ("train-000003.tar", -3)  # cut in its third-to-last sample: 3 samples lost


def run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )


def build(work: Path, train: int, val: int) -> tuple[Path, Path]:
    """(raw folder, shard folder) of a fresh synthetic set."""
    raw, shards = work / "raw", work / "shards"
    run([PY, "data_prep/make_synthetic.py", "--out", str(raw), "--train", str(train), "--val", str(val)])
    for split in ("train", "val"):
        run([
            PY, "data_prep/shard_coco.py", "--images", str(raw / "images" / split),
            "--annotations", str(raw / "annotations" / f"person_keypoints_{split}.json"),
            "--out", str(shards / split), "--split", split, "--shard-size", "75", "--no-progress",
        ])  # fmt: skip
    return raw, shards


def corrupt(clean: Path, folder: Path) -> None:
    """Copy ``clean`` to ``folder`` with the garbled JPEG and the truncated shard above."""
    shutil.copytree(clean, folder)
    _, comps = ShardSet.open([str(folder / GARBLED[0])]).index[0][GARBLED[1]]
    off, size = comps["jpg"]
    with open(folder / GARBLED[0], "r+b") as f:
        f.seek(off + size // 3)
        f.write(bytes(size // 4))
    _, comps = ShardSet.open([str(folder / TRUNCATED[0])]).index[0][TRUNCATED[1]]
    off, size = comps["jpg"]
    with open(folder / TRUNCATED[0], "r+b") as f:
        f.truncate(off + size // 2)


def train(raw: Path, shards: Path, val: Path, out: Path, epochs: int, seed: int) -> dict:
    run([
        PY, "launch/train.py", "--config", "pnfs/configs/demo.yaml", "--out", str(out),
        f"data.train_shards={shards}", f"data.val_shards={val}",
        f"data.val_annotations={raw / 'annotations' / 'person_keypoints_val.json'}",
        f"train.seed={seed}", "train.device=cpu", "eval.refine=gaussian", f"train.epochs={epochs}",
        f"train.lr_milestones=[{epochs - 1}]", f"train.eval_every={epochs}", "data.max_bad_samples=10",
    ])  # fmt: skip
    return json.loads((out / "result.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--work", default="runs/corrupt-bench", help="folder for the data and both runs (rewritten)"
    )
    p.add_argument("--train", type=int, default=600, help="people in the synthetic train split")
    p.add_argument("--val", type=int, default=100, help="people in the synthetic val split")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", default="0", help="training seeds, comma-separated (the data stay the same)")
    p.add_argument("--json", help="also write the JSON line to this file")
    args = p.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    work = (REPO / args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    raw, shards = build(work, args.train, args.val)
    corrupt(shards / "train", work / "corrupt-train")
    runs = []
    for seed in seeds:
        row: dict = {"seed": seed}
        for name, folder in (("clean", shards / "train"), ("corrupt", work / "corrupt-train")):
            result = train(raw, folder, shards / "val", work / f"run-{name}-seed{seed}", args.epochs, seed)
            row[name] = {k: result["metrics"][k] for k in ("AP", "AR") if k in result["metrics"]}
            row[name]["global_step"] = result["global_step"]
            row[name]["bad_samples"] = result.get("bad_samples", [])
        row["corrupt_minus_clean_AP"] = row["corrupt"]["AP"] - row["clean"]["AP"]
        runs.append(row)
        print(
            f"seed {seed}: clean AP {row['clean']['AP']:.4f} AR {row['clean']['AR']:.3f} "
            f"({row['clean']['global_step']} steps) | corrupt AP {row['corrupt']['AP']:.4f} "
            f"AR {row['corrupt']['AR']:.3f} ({row['corrupt']['global_step']} steps) | "
            f"corrupt - clean AP {row['corrupt_minus_clean_AP']:+.4f}",
            flush=True,
        )
    out: dict = {"runs": runs}
    if len(runs) > 1:
        clean = [r["clean"]["AP"] for r in runs]
        out["clean_AP_range"] = max(clean) - min(clean)
        print(f"clean AP over {len(runs)} seeds: {min(clean):.4f} .. {max(clean):.4f} "
              f"(range {out['clean_AP_range']:.4f})")  # fmt: skip
    line = json.dumps(out)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")


if __name__ == "__main__":
    main()
