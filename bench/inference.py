"""Images/s of PNFS inference on the CPU, four ways in one run, with ratios to the first.

    python bench/inference.py [--config mpii_mobilenetv2_p3_256] [--batch 8] [--reps 10]
        [--threads N] [--json FILE]

Cases, all on the same random batch [N, 3, H, W] of the config's input size, network only
(no decoding, no flip test):

1. ``training-eval``: the training model in eval mode, as evaluation ran it before freezing
   (channels_last model and images when ``train.channels_last``, float32);
2. ``frozen``: :func:`pnfs.deploy.freeze` (BN, alpha, beta folded; channels_last), float32;
3. ``frozen+bf16``: the frozen model under bfloat16 autocast (skipped, and said so, where the
   CPU has no native bf16: :func:`pnfs.inference.bf16_supported`);
4. ``onnxruntime``: the frozen model exported to ONNX (:func:`pnfs.deploy.export_file`, as
   ``launch/export.py`` does), run by onnxruntime's CPU provider with the same thread count.

Each case: 2 warm-up batches, then ``--reps`` timed batches; the median time per batch gives
images/s. One line per case with its ratio to ``training-eval`` measured in the same run;
``--json`` (default ``runs/bench/inference.json``) writes the lines and the machine. The model
is randomly initialised (the speed of a network does not depend on its weights).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def median_seconds(run: Callable[[], object], reps: int) -> float:
    for _ in range(2):
        run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="mpii_mobilenetv2_p3_256", help="config YAML or preset")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch/onnxruntime threads (default: torch's)")
    p.add_argument(
        "--json", default="runs/bench/inference.json", help="write the results here (default: %(default)s)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pnfs.config import load_config
    from pnfs.deploy import export_file, freeze
    from pnfs.inference import bf16_supported
    from pnfs.model import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cfg = load_config(args.config, ["model.backbone.weights=none"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    h, w = cfg.data.input_size
    images = torch.randn(args.batch, 3, h, w)
    train_images = images
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
        train_images = images.contiguous(memory_format=torch.channels_last)
    frozen = freeze(model)
    frozen_images = images.contiguous(memory_format=torch.channels_last)

    def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return fn()

        return run

    def bf16() -> object:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return frozen(frozen_images)

    cases: list[tuple[str, Callable[[], object] | None, str]] = [
        ("training-eval", no_grad(lambda: model(train_images)), "float32"),
        ("frozen", no_grad(lambda: frozen(frozen_images)), "float32"),
        ("frozen+bf16", no_grad(bf16) if bf16_supported(torch.device("cpu")) else None, "bfloat16 autocast"),
    ]
    import onnxruntime

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "frozen.onnx"
        export_file(frozen, (images,), ["images"], "onnx", path, dynamic=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"images": images.numpy()}
        cases.append(("onnxruntime", lambda: session.run(None, feed), "float32"))
        rows = []
        for name, run, dtype in cases:
            if run is None:
                print(f"{name:14s} skipped: this CPU has no native bfloat16")
                continue
            seconds = median_seconds(run, args.reps)
            rows.append(
                {
                    "case": name,
                    "dtype": dtype,
                    "seconds_per_batch": seconds,
                    "images_per_s": args.batch / seconds,
                }
            )
    base = rows[0]["images_per_s"]
    header = {
        "config": args.config,
        "batch": args.batch,
        "input_size": [h, w],
        "reps": args.reps,
        "threads": threads,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    print(f"{args.config}, batch {args.batch}, {h}x{w}, {threads} threads, median of {args.reps}")
    for row in rows:
        row["ratio"] = row["images_per_s"] / base
        print(
            f"{row['case']:14s} {row['images_per_s']:8.1f} images/s  "
            f"{1000 * row['seconds_per_batch']:8.1f} ms/batch  x{row['ratio']:.2f}  ({row['dtype']})"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**header, "cases": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
