"""Input-pipeline throughput: each pnfs loader against an HRNet-style baseline, one run.

    python bench/pipeline.py [--images DIR --annotations FILE] [--workers 2] [--json out.json]

Data: ``--images``/``--annotations`` if given, else the real COCO sample in
``../shared/data/coco_sample`` when present, else a synthetic COCO-format set drawn first
(``data_prep/make_synthetic.py``). A small set's annotations are tiled (``--min-samples``)
so that every contender runs full batches over the same people. Every contender produces
the same thing from the same people with the same augmentation distribution (scale
0.7-1.3, rotation ±45°, flip 0.5) and the same number of DataLoader workers: a normalised
RGB batch [N, 3, H, W], keypoints in input pixels and Gaussian targets [N, K, H/4, W/4]
with weights.

* ``hrnet_baseline``: per sample, read the whole image file, cv2 decode, cv2.warpAffine,
  keypoints moved one by one, one Gaussian per joint in numpy (the HRNet/PNFS lineage);
* ``torch``/``dali``/``gpu``: WebDataset crops through :func:`pnfs.data.build_loader`,
  targets from :func:`pnfs.data.gaussian_targets` on the batch. ``dali`` runs its
  CPU graph without CUDA; ``gpu`` (nvJPEG + batched grid_sample) is timed only with CUDA
  unless named in ``--loaders``;
* ``torch_http``: the ``torch`` loader on the same shards streamed from a local HTTP server
  (``http://127.0.0.1:PORT/train-{000000..N}.tar``, ``http.server`` in this process), with a
  fresh ``data.cache_dir`` every epoch, so each epoch pays the whole download: the cost of
  streaming against ``torch`` reading the local folder (``x local`` in the output).

Prints samples/s (wall clock, median of interleaved rounds) and CPU milliseconds per sample
(main process + reaped DataLoader workers + DALI threads), each with its ratio to the
baseline: on a machine shared with other jobs the CPU figure is the stable one, and on a
dedicated, CPU-bound machine throughput scales with its inverse. Writes all numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
COCO_SAMPLE = REPO.parent / "shared" / "data" / "coco_sample"

from pnfs.config import load_config  # noqa: E402
from pnfs.data import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augment,
    SkipReport,
    box_to_region,
    build_loader,
    gaussian_targets,
    read_coco_persons,
    region_to_input,
    worker_init,
)
from pnfs.keypoints import COCO  # noqa: E402


class HRNetStyleDataset(torch.utils.data.Dataset):
    """The per-sample pipeline of the HRNet lineage (JointsDataset.__getitem__), in RGB."""

    def __init__(self, records, image_dir: Path, input_size, sigma: float, seed: int, margin: float = 1.25):
        self.records, self.image_dir = records, image_dir
        self.input_size, self.sigma, self.margin = tuple(input_size), sigma, margin
        self.aug = Augment.sample(np.random.default_rng(seed), len(records))
        self.perm = COCO.flip_permutation()
        self.mean = np.asarray(IMAGENET_MEAN, np.float32)
        self.std = np.asarray(IMAGENET_STD, np.float32)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        rec = self.records[i]
        image = cv2.imread(
            str(self.image_dir / rec.image_file), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
        )
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        h, w = self.input_size
        a = self.aug[i]
        centre, size = box_to_region(rec.bbox, w / h, self.margin)
        trans = region_to_input(centre, size, self.input_size, a.scale, a.rotation, a.flip)
        crop = cv2.warpAffine(image, trans, (w, h), flags=cv2.INTER_LINEAR)
        tensor = torch.from_numpy(
            ((crop.astype(np.float32) / 255.0 - self.mean) / self.std).transpose(2, 0, 1)
        )
        joints = rec.keypoints.copy()
        if a.flip:
            joints = joints[self.perm]
        for j in range(len(joints)):  # one joint at a time, as the reference code does
            if joints[j, 2] > 0:
                joints[j, :2] = trans @ np.array([joints[j, 0], joints[j, 1], 1.0])
        target, weight = self.generate_target(joints)
        return tensor, torch.from_numpy(joints).float(), torch.from_numpy(target), torch.from_numpy(weight)

    def generate_target(self, joints: np.ndarray):
        """Per-joint Gaussian in a 3σ window (HRNet ``generate_target``, unrounded centre)."""
        h, w = self.input_size
        hh, hw = h // 4, w // 4
        target = np.zeros((len(joints), hh, hw), np.float32)
        weight = np.zeros(len(joints), np.float32)
        radius = self.sigma * 3
        for j, (x, y, v) in enumerate(joints):
            u, vv = x / 4, y / 4
            if v <= 0 or not (-0.5 <= u < hw - 0.5 and -0.5 <= vv < hh - 0.5):
                continue
            weight[j] = 1
            x0, x1 = max(0, int(u - radius)), min(hw, int(u + radius) + 2)
            y0, y1 = max(0, int(vv - radius)), min(hh, int(vv + radius) + 2)
            xs = np.arange(x0, x1, dtype=np.float32)
            ys = np.arange(y0, y1, dtype=np.float32)[:, None]
            target[j, y0:y1, x0:x1] = np.exp(-((xs - u) ** 2 + (ys - vv) ** 2) / (2 * self.sigma**2))
        return target, weight


class ShardServer:
    """``http.server`` serving a shard folder on 127.0.0.1 at a free port, in a daemon thread."""

    def __init__(self, folder: Path):
        import functools
        import http.server
        import threading

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        handler = functools.partial(Quiet, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def pattern(self, names: list[str]) -> str:
        """The brace pattern of ``train-000000.tar`` .. ``train-<n-1>.tar`` on this server."""
        return f"{self.url}/train-{{000000..{len(names) - 1:06d}}}.tar"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and of its reaped children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_epochs(make_batches, targets_fn=None, passes: int = 1) -> tuple[int, float, float]:
    """(samples, wall seconds, CPU seconds) of ``passes`` epochs, each with a fresh iterator
    (non-persistent workers, as in training; they are reaped at the end of each epoch)."""
    n = 0
    start, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(passes):
        for batch in make_batches():
            if targets_fn is not None:
                targets_fn(batch)
            n += batch[0].shape[0] if isinstance(batch, (list, tuple)) else len(batch)
    return n, time.perf_counter() - start, cpu_seconds() - cpu


def summarise(runs: list[tuple[int, float, float]]) -> dict:
    rates = [n / s for n, s, _ in runs]
    cpu_ms = [c / n * 1e3 for n, _, c in runs]
    return {
        "samples_per_s": round(float(np.median(rates)), 1),
        "samples_per_s_each_round": [round(r, 1) for r in rates],
        "cpu_ms_per_sample": round(float(np.median(cpu_ms)), 3),
        "cpu_ms_per_sample_each_round": [round(c, 3) for c in cpu_ms],
        "samples": sum(n for n, _, _ in runs),
        "seconds": round(sum(s for _, s, _ in runs), 3),
    }


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "data_prep" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def prepare_data(args, work: Path) -> tuple[Path, Path, str]:
    """(image folder, annotation json, data set name) of the data to time."""
    if args.images and args.annotations:
        return Path(args.images), Path(args.annotations), str(args.annotations)
    if (COCO_SAMPLE / "test_coco.json").is_file():
        return COCO_SAMPLE, COCO_SAMPLE / "test_coco.json", str(COCO_SAMPLE)
    _script("make_synthetic").main(
        ["--out", str(work / "raw"), "--train", str(args.min_samples), "--val", "0", "--seed", "0"]
    )
    raw = work / "raw"
    return raw / "images" / "train", raw / "annotations" / "person_keypoints_train.json", "synthetic"


def tile_annotations(data: dict, min_people: int) -> tuple[dict, int]:
    """The annotations repeated (new unique ids) until at least ``min_people`` people pass the
    COCO filter; returns (data, repeats)."""
    people = len(read_coco_persons(data, SkipReport(), SkipReport()))
    if people == 0:
        raise SystemExit("no person in the annotations passes the filter: nothing to time")
    repeats = max(1, -(-min_people // people))
    stride = max(a["id"] for a in data["annotations"]) + 1
    tiled = [{**a, "id": a["id"] + k * stride} for k in range(repeats) for a in data["annotations"]]
    return {**data, "annotations": tiled}, repeats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", help="image folder of a COCO-format set (default: synthetic)")
    p.add_argument("--annotations", help="its person-keypoint json")
    p.add_argument("--min-samples", type=int, default=480, help="tile a small set up to this many people")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--input-size", type=int, nargs=2, default=[256, 192], metavar=("H", "W"))
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    p.add_argument("--passes", type=int, default=1, help="epochs per round (small data sets)")
    p.add_argument(
        "--loaders", default=None, help="comma-separated pnfs loaders (default torch,torch_http,dali[,gpu])"
    )
    p.add_argument("--json", default="runs/bench/pipeline.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the DataLoader workers own the cores
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        image_dir, ann_file, data_name = prepare_data(args, work)
        data, repeats = tile_annotations(json.loads(ann_file.read_text()), args.min_samples)
        ann_file = work / "person_keypoints_bench.json"
        ann_file.write_text(json.dumps(data))
        records = read_coco_persons(data, SkipReport(), SkipReport())
        shard_dir = work / "shards"
        _script("shard_coco").main(
            ["--images", str(image_dir), "--annotations", str(ann_file), "--out", str(shard_dir),
             "--split", "train", "--shard-size", "64", "--workers", str(args.workers), "--no-progress"]
        )  # fmt: skip
        h, w = args.input_size
        results: dict[str, dict] = {}

        base = HRNetStyleDataset(records, image_dir, (h, w), sigma=2.0, seed=0)

        def baseline_batches():
            return torch.utils.data.DataLoader(
                base,
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=args.workers,
                worker_init_fn=worker_init,
                drop_last=True,
            )

        contenders = {"hrnet_baseline": (baseline_batches, None)}
        kinds = args.loaders or ("torch,torch_http,dali" + (",gpu" if torch.cuda.is_available() else ""))
        server = None
        for kind in [k for k in kinds.split(",") if k]:
            shards = str(shard_dir)
            if kind == "torch_http":
                server = server or ShardServer(shard_dir)
                shards = server.pattern(sorted(p.name for p in shard_dir.glob("train-*.tar")))
            cfg = load_config(
                None,
                [
                    f"data.train_shards={shards}",
                    f"data.loader={kind.removesuffix('_http')}",
                    f"data.num_workers={args.workers}",
                    f"data.input_size=[{h}, {w}]",
                    f"train.batch_size={args.batch_size}",
                ],
            )

            def batches(cfg=cfg, epoch=[0], cold=kind == "torch_http"):  # noqa: B006 - a counter across calls
                epoch[0] += 1
                if cold:  # a new cache folder: this epoch downloads every shard
                    cfg.data.cache_dir = str(work / f"cache-{epoch[0]}")
                return build_loader(cfg, "train", epoch=epoch[0])

            def targets(batch, hw=(h // 4, w // 4)):
                return gaussian_targets(batch.keypoints, hw, sigma=2.0)

            contenders[kind] = (batches, targets)
        # Rounds interleave the contenders so that load from other processes on a shared
        # machine hits all of them alike; the median round is reported.
        runs: dict[str, list] = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, (make, targets_fn) in contenders.items():
                if name in results:
                    continue
                try:
                    runs[name].append(time_epochs(make, targets_fn, args.passes))
                except Exception as e:  # one unavailable back-end must not hide the others
                    results[name] = {"error": f"{type(e).__name__}: {e}"}
        for name, r in runs.items():
            if name not in results:
                results[name] = summarise(r)
        if server is not None:
            server.stop()
    base_rate = results["hrnet_baseline"]["samples_per_s"]
    base_cpu = results["hrnet_baseline"]["cpu_ms_per_sample"]
    print(f"{'loader':16s} {'samples/s':>10s} {'x baseline':>11s} {'CPU ms/sample':>14s} {'x baseline':>11s}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:16s} {'-':>10s} {'-':>11s}  ({r['error']})")
            continue
        r["ratio_to_baseline"] = round(r["samples_per_s"] / base_rate, 2)
        r["cpu_efficiency_ratio_to_baseline"] = round(base_cpu / r["cpu_ms_per_sample"], 2)
        local = ""
        if name.endswith("_http") and "samples_per_s" in results.get(name.removesuffix("_http"), {}):
            r["ratio_to_local"] = round(
                r["samples_per_s"] / results[name.removesuffix("_http")]["samples_per_s"], 2
            )
            local = f"  ({r['ratio_to_local']:.2f}x local)"
        print(
            f"{name:16s} {r['samples_per_s']:10.1f} {r['ratio_to_baseline']:10.2f}x "
            f"{r['cpu_ms_per_sample']:14.2f} {r['cpu_efficiency_ratio_to_baseline']:10.2f}x{local}"
        )
    report = {
        "config": {
            "people": len(records),
            "annotation_repeats": repeats,
            "workers": args.workers,
            "batch_size": args.batch_size,
            "input_size": [h, w],
            "rounds": args.rounds,
            "passes": args.passes,
            "data": data_name,
            "loadavg_1min_at_end": round(os.getloadavg()[0], 2),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
            "python": platform.python_version(),
        },
        "results": results,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
