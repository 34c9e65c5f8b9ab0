"""Images/s and peak memory of one PNFS training step, four ways in one run.

    python bench/train_step.py [--config CFG] [--batch N] [--device cpu|cuda] [--json FILE]

The step is the engine's (:func:`pnfs.loss.batch_loss`: the model in the memory
format of ``train.channels_last``, bf16 autocast on CUDA, Gaussian targets on the device,
weighted MSE) plus backward and an Adam step over weights and alpha/beta (the synchronous
search). Batches are random tensors of the config's input size, so data loading is not
measured. Cases: ``PNFS_KERNELS=torch`` (PyTorch references) and ``auto`` (Triton on CUDA;
on CPU ``auto`` also runs the references), each eager and under ``torch.compile``. Each case
runs in its own process, so its peak memory (``torch.cuda.max_memory_allocated`` on CUDA,
the process's peak RSS on CPU) and its compile caches are its own. One line per case with
its ratio to the baseline, kernels=torch eager, measured in the same run. On a shared CPU the
process CPU time per step (``cpu_ms_per_step``) is the figure that load does not inflate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

CASES = (("torch", False), ("auto", False), ("torch", True), ("auto", True))


def random_batch(n: int, num_joints: int, size: tuple[int, int], device: torch.device):
    """A PoseBatch of ``n`` random images [n, 3, H, W] with random labelled keypoints [n, K, 3]."""
    from pnfs.data.batch import PoseBatch

    h, w = size
    g = torch.Generator().manual_seed(0)
    kp = torch.rand(n, num_joints, 3, generator=g)
    kp[..., 0] *= w - 1
    kp[..., 1] *= h - 1
    kp[..., 2] = 1.0
    return PoseBatch(
        image=torch.randn(n, 3, h, w, generator=g),
        keypoints=kp,
        affine=torch.eye(2, 3).expand(n, 2, 3).clone(),
        image_id=torch.arange(n),
        ann_id=torch.arange(n),
        score=torch.ones(n),
    ).to(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(args: argparse.Namespace, kernels: str, compiled: bool) -> dict:
    """One case in this process (``PNFS_KERNELS`` is set by the parent before torch starts)."""
    from pnfs.config import load_config
    from pnfs.engine.runtime import amp_dtype
    from pnfs.engine.strategies import build_optimizers
    from pnfs.loss import batch_loss, loss_setup
    from pnfs.model import build_model

    device = torch.device(args.device)
    cfg = load_config(args.config, [*args.overrides, f"train.device={args.device}"])
    n = args.batch or cfg.train.batch_size
    batch = random_batch(n, cfg.num_joints, tuple(cfg.data.input_size), device)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizers(model, cfg).weights
    forward = torch.compile(model) if compiled else model
    dtype = amp_dtype(cfg, device)
    setup = loss_setup(model, cfg.data.sigma, device, dtype, cfg.train.channels_last)

    def train_step() -> float:
        loss = batch_loss(forward, batch, setup)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # synchronises

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        train_step()
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times = [], []
    for _ in range(args.steps):
        t, c = time.perf_counter(), time.process_time()
        train_step()
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    median = statistics.median(times)
    return {
        "kernels": kernels,
        "compiled": compiled,
        "batch": n,
        "img_per_s": n / median,
        "step_ms": 1000 * median,
        "cpu_ms_per_step": 1000 * statistics.median(cpu_times),
        "peak_memory_mb": peak_memory_mb(device),
        "warmup_s": warm_s,
        "dtype": str(dtype or torch.float32),
        "input_size": cfg.data.input_size,
    }


def run_case(argv: list[str], kernels: str, compiled: bool) -> dict:
    """``measure`` in a child process; its last stdout line is the row as JSON."""
    case = f"{kernels}:{'compiled' if compiled else 'eager'}"
    env = {**os.environ, "PNFS_KERNELS": kernels}
    proc = subprocess.run(
        [sys.executable, __file__, *argv, "--case", case], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="mpii_mobilenetv2_p3_256")
    p.add_argument("--batch", type=int, default=None, help="default: train.batch_size of the config")
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps per case (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its row
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.amp=none")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    if args.case:
        kernels, mode = args.case.split(":")
        print(json.dumps(measure(args, kernels, mode == "compiled")))
        return 0

    rows = []
    for kernels, compiled in CASES:
        if compiled and args.no_compile:
            continue
        row = run_case(argv, kernels, compiled)
        row["ratio_vs_torch_eager"] = row["img_per_s"] / rows[0]["img_per_s"] if rows else 1.0
        rows.append(row)
        mode = "compiled" if compiled else "eager"
        print(
            f"kernels={kernels:5s} {mode:8s} {row['img_per_s']:9.1f} img/s {row['step_ms']:9.1f} ms/step"
            f" (CPU {row['cpu_ms_per_step']:9.1f} ms)  peak {row['peak_memory_mb']:8.0f} MB"
            f"  x{row['ratio_vs_torch_eager']:.2f} vs torch/eager",
            flush=True,
        )
    device = torch.device(args.device)
    report = {
        "config": str(args.config),
        "overrides": args.overrides,
        "batch": rows[0]["batch"],
        "input_size": rows[0]["input_size"],
        "dtype": rows[0]["dtype"],
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
