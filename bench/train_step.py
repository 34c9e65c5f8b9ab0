"""Images/s, peak memory and operators per PNFS training step: the step as it was and the
lean step of docs/design.md §7, in one run.

    python bench/train_step.py [--config CFG] [--batch N] [--device cpu|cuda] [--json FILE]
                               [--steps N] [--block N] [--no-compile] [--baseline] [overrides]

Steps (``--step``, each case in its own process, so its peak memory and compile caches are its own):

* ``baseline``: the step before issue 12 -- scores, then the eager loss over them; two host
  syncs per step (``loss.item()`` for the finite check, ``bool(isfinite(norm))``) and
  PyTorch's default (unfused) Adam stepped on the host's decision.
* ``lean``: :func:`pnfs.engine.step.weight_step` -- the fused squash-MSE loss straight from the
  vectors where parts map one-to-one onto joints, no host sync, the skip decision inside fused
  Adam; the host reads the :class:`~pnfs.engine.guard.StepRecord` once per block.

Cases: baseline and lean with ``PNFS_KERNELS=torch`` (PyTorch references), lean with ``auto``
(Triton on CUDA; on CPU ``auto`` is the references again), and, unless ``--no-compile``, the
model under ``torch.compile`` for both steps as ``train.compile`` runs it (``compile_forward``: its
fabric cells, ``reduce-overhead`` on CUDA; ``lean-compiled-model``: the whole model); last,
baseline and lean (torch, eager) once more in one process with their blocks interleaved, the
ratio least moved by a changing load.
On the CPU a last child times, by process CPU time, the pieces in which the two steps differ
(loss forward+backward from the vectors, the Adam update, the gradient norm, the two host syncs,
and the update and norm over flat buffers; ``measure_parts``): what the lean step can save there at most.
``--baseline`` runs only the baseline case. Steps
run in blocks of ``--block`` (the log interval); a block ends with one read (and a device sync),
the median block time / block is the step time. ``ops_per_step`` counts the ``aten::`` events
the torch profiler records in one step (every operator dispatched, nested ones included): the
proxy for kernel launches on a GPU. Batches are random tensors of the config's input size
(data loading is not measured). One line per case with its ratio to the baseline of the same
run. On a shared CPU the process CPU time per step (``cpu_ms_per_step``) is the figure that
load inflates least.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch


@dataclass(frozen=True)
class Case:
    """One measured case: which step, which kernels (``PNFS_KERNELS``), the model under
    ``torch.compile`` or not, and config overrides of its own (a variant the config selects)."""

    name: str
    step: str  # "baseline" or "lean"
    kernels: str  # PNFS_KERNELS: "torch" (the references) or "auto"
    compiled: bool = False
    overrides: tuple[str, ...] = ()
    graphed: bool = False  # the whole lean step replayed from a CUDA graph (train.cuda_graph; CUDA only)


# The cases, in the order a run without --cases takes them; a new variant is one more line.
CASES = (
    Case("baseline", "baseline", "torch"),
    Case("lean", "lean", "torch"),
    Case("lean-auto", "lean", "auto"),
    Case("baseline-compiled", "baseline", "torch", compiled=True),
    Case("lean-compiled", "lean", "torch", compiled=True),
    Case("lean-auto-compiled", "lean", "auto", compiled=True),
    Case("lean-compiled-model", "lean", "torch", compiled=True, overrides=("train.compile_scope=model",)),
    Case("lean-graphed", "lean", "torch", graphed=True),
    Case("lean-auto-graphed", "lean", "auto", graphed=True),
    Case("lean-per-part", "lean", "torch", overrides=("model.batched_parts=false",)),
    Case("lean-batched", "lean", "torch", overrides=("model.batched_parts=true",)),
    Case(
        "lean-batched-per-tensor",
        "lean",
        "torch",
        overrides=("model.batched_parts=true", "train.flat_params=false"),
    ),
)
# Measurements of their own, by name in --cases: both eager steps interleaved in one process, and
# (CPU only) the pieces in which the two steps differ.
EXTRA_CASES = ("interleaved", "parts")


def random_batch(n: int, num_joints: int, size: tuple[int, int], device: torch.device):
    """A PoseBatch of ``n`` random images [n, 3, H, W] with random labelled keypoints [n, K, 3]."""
    from pnfs.data import PoseBatch

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


def baseline_loss(model, batch, cfg, device, dtype) -> torch.Tensor:
    """The loss as the step before issue 12 computed it: scores, then ``pose_loss`` over them."""
    from pnfs.data import gaussian_targets
    from pnfs.loss import pose_loss

    images = batch.image.to(device, non_blocking=True)
    if cfg.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
        scores = model(images)
    targets, weights = gaussian_targets(batch.keypoints.to(device), tuple(scores.shape[-2:]), cfg.data.sigma)
    return pose_loss(scores.float(), targets, weights)


def baseline_step(model, batch, cfg, device, dtype, opt, params):
    """The step as it was before issue 12 (pnfs.engine.trainer of commit f106563), host syncs included."""
    loss = baseline_loss(model, batch, cfg, device, dtype)
    finite = math.isfinite(loss.detach().float().item())  # sync 1 (and an all-reduce under DDP)
    loss.backward()
    max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
    if finite and bool(torch.isfinite(norm)):  # sync 2
        opt.step()
    model.zero_grad(set_to_none=True)


def build_case(
    args: argparse.Namespace,
    step: str,
    compiled: bool,
    overrides: tuple[str, ...] = (),
    graphed: bool = False,
):
    """(one_step, block, probe, setup, cfg, batch size, autocast dtype) of one case, in this process.

    ``block()`` runs ``--block`` steps and returns (host s, wall s): the host time to enqueue them
    (until the last step's Python returns) and the time until the device finished them (after the
    log read and a device sync). ``probe()`` is a forward and backward of the case's loss on the
    batch with no update: (loss, gradient norm) in float64, the same numbers on every path."""
    from pnfs.config import load_config
    from pnfs.engine.compilation import compile_forward
    from pnfs.engine.guard import NonFiniteGuard, StepRecord
    from pnfs.engine.runtime import amp_dtype
    from pnfs.engine.step import StepParts, weight_step
    from pnfs.engine.strategies import build_optimizers
    from pnfs.loss import batch_loss, loss_setup
    from pnfs.model import build_model

    device = torch.device(args.device)
    cfg = load_config(args.config, [*args.overrides, *overrides, f"train.device={args.device}"])
    n = args.batch or cfg.train.batch_size
    batch = random_batch(n, cfg.num_joints, tuple(cfg.data.input_size), device)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    lean = step == "lean"
    opt = build_optimizers(model, cfg, fused_weights=lean, flat=lean and cfg.train.flat_params).weights
    params = [p for g in opt.param_groups for p in g["params"]]
    forward = compile_forward(model, model, cfg.train.compile_scope, device)[0] if compiled else model
    dtype = amp_dtype(cfg, device)
    record = StepRecord(NonFiniteGuard(cfg.train.max_bad_steps), device)
    setup = loss_setup(model, cfg.data.sigma, device, dtype, cfg.train.channels_last)
    parts = StepParts(forward, model, opt, params, setup, record, cfg.train.grad_clip)
    lean_step = partial(weight_step, parts)
    if graphed:
        if device.type != "cuda" or step != "lean":
            raise SystemExit("error: a graphed case replays the lean step from a CUDA graph: --device cuda")
        from pnfs.engine.graph import WARMUP_STEPS, GraphedStep, cuda_graph_capture
        from pnfs.engine.strategies import make_capturable

        make_capturable(opt, device)
        lean_step = GraphedStep(
            lean_step, device, WARMUP_STEPS, cuda_graph_capture(torch.cuda.graph_pool_handle())
        )

    def one_step() -> None:
        if step == "baseline":
            baseline_step(forward, batch, cfg, device, dtype, opt, params)
        else:
            lean_step(batch)

    def block() -> tuple[float, float]:
        t0 = time.perf_counter()
        for _ in range(args.block):
            one_step()
        host = time.perf_counter() - t0
        record.read(step=0, lr=cfg.train.lr, world_size=1)  # the log read (a no-op record for baseline)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return host, time.perf_counter() - t0

    def probe() -> tuple[float, float]:
        if step == "baseline":
            loss = baseline_loss(forward, batch, cfg, device, dtype)
        else:
            loss = batch_loss(forward, batch, setup)
        loss.backward()
        grads = [p.grad.detach().double().norm() for p in params if p.grad is not None]
        norm = torch.stack(grads).norm().item()
        model.zero_grad(set_to_none=True)
        return loss.detach().double().item(), norm

    return one_step, block, probe, setup, cfg, n, dtype


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace, case: Case) -> dict:
    """One case in this process (``PNFS_KERNELS`` is set by the parent before torch starts).

    Before timing: the probe (the first forward and backward: compilation, Triton's JIT), then the
    first step and the other warm-up steps, each timed apart from the steps that follow."""
    device = torch.device(args.device)
    one_step, block, probe, setup, cfg, n, dtype = build_case(
        args, case.step, case.compiled, case.overrides, case.graphed
    )
    t0 = time.perf_counter()
    loss, grad_norm = probe()
    synchronize(device)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    one_step()
    synchronize(device)
    first_step_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.warmup - 1):
        one_step()
    block()
    warm_s = time.perf_counter() - t0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        one_step()
    ops = sum(1 for e in prof.events() if e.name.startswith("aten::"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, host_times, cpu_times = [], [], []
    for _ in range(max(1, args.steps // args.block)):
        c = time.process_time()
        host, wall = block()
        times.append(wall / args.block)
        host_times.append(host / args.block)
        cpu_times.append((time.process_time() - c) / args.block)
    median = statistics.median(times)
    return {
        "case": case.name,
        "step": case.step,
        "kernels": case.kernels,
        "compiled": case.compiled,
        "graphed": case.graphed,
        "case_overrides": list(case.overrides),
        "batch": n,
        "img_per_s": n / median,
        "step_ms": 1000 * median,
        "host_ms_per_step": 1000 * statistics.median(host_times),
        "cpu_ms_per_step": 1000 * statistics.median(cpu_times),
        "first_fwd_bwd_s": first_s,
        "first_step_s": first_step_s,
        "probe_loss": loss,
        "probe_grad_norm": grad_norm,
        "ops_per_step": ops,
        "fused_loss": setup.vector_joints is not None,
        "peak_memory_mb": peak_memory_mb(device),
        "warmup_s": warm_s,
        "dtype": str(dtype or torch.float32),
        "input_size": cfg.data.input_size,
    }


def measure_interleaved(args: argparse.Namespace) -> dict:
    """Baseline and lean step (eager) in one process, their blocks alternating (the order flips
    every round), so that a load that changes over the run hits both alike: the median over
    rounds of the per-round time ratio."""
    cases = {step: build_case(args, step, compiled=False) for step in ("baseline", "lean")}
    for one_step, block, _probe, *_ in cases.values():
        for _ in range(args.warmup):
            one_step()
        block()
    wall, cpu = [], []
    for r in range(max(2, args.steps // args.block)):
        spent = {}
        for step in ("baseline", "lean") if r % 2 == 0 else ("lean", "baseline"):
            t, c = time.perf_counter(), time.process_time()
            cases[step][1]()
            spent[step] = (time.perf_counter() - t, time.process_time() - c)
        wall.append(spent["baseline"][0] / spent["lean"][0])
        cpu.append(spent["baseline"][1] / spent["lean"][1])
    return {"rounds": len(wall), "wall_ratio": statistics.median(wall), "cpu_ratio": statistics.median(cpu)}


def measure_parts(args: argparse.Namespace, reps: int = 7) -> dict:
    """Process CPU ms (median of ``reps``) of the pieces in which the two steps differ, on the
    config's model with the gradients of one batch (CPU only: there every operator runs
    synchronously, so the host time of a piece is its cost). The loss pieces run forward and
    backward from the head's vectors (a detached copy): ``squash_score`` then ``pose_loss`` (the
    baseline's path, less its per-part ``index_add``) against ``pose_loss`` of the vectors (the
    fused loss's reference)."""
    from pnfs.config import load_config
    from pnfs.data import gaussian_targets
    from pnfs.engine.flat import FlatAdam, FlatParameters
    from pnfs.engine.step import clipped_norm, fused_adam_update
    from pnfs.kernels import squash_score
    from pnfs.loss import JointVectors, pose_loss
    from pnfs.model import build_model

    cfg = load_config(args.config, [*args.overrides, "train.device=cpu"])
    n = args.batch or cfg.train.batch_size
    batch = random_batch(n, cfg.num_joints, tuple(cfg.data.input_size), torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(cfg).to(memory_format=torch.channels_last)
    images = batch.image.contiguous(memory_format=torch.channels_last)
    vectors = model(images, vectors=True)
    vectors.square().mean().backward()
    vectors = vectors.detach()
    targets, weights = gaussian_targets(batch.keypoints, tuple(vectors.shape[-2:]), cfg.data.sigma)
    targets = targets.index_select(1, torch.tensor(model.vector_joints))
    weights = weights.index_select(1, torch.tensor(model.vector_joints))
    d = model.vector_dim
    params = [p for p in model.parameters() if p.grad is not None]
    loop_adam = torch.optim.Adam(params, lr=cfg.train.lr)  # PyTorch's default on the CPU: for-loop
    fused_adam = torch.optim.Adam(params, lr=cfg.train.lr, fused=True)
    loop_adam.step()
    fused_adam.step()
    no_inf = torch.zeros(())
    # the same update and norm over flat buffers (train.flat_params); the parameters become views
    # of them, which the per-tensor pieces above step alike
    flat_adam = FlatAdam(FlatParameters([params]), lr=cfg.train.lr)
    flat_adam.apply(no_inf)
    max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
    loss, norm = torch.ones(()), torch.ones(())

    def loss_backward(prediction) -> None:
        v = vectors.clone().requires_grad_()
        pose_loss(prediction(v), targets, weights).backward()

    pieces = {
        "loss_scores": lambda: loss_backward(lambda v: squash_score(v, d).float()),
        "loss_vectors": lambda: loss_backward(lambda v: JointVectors(v, d)),
        "adam_for_loop": loop_adam.step,
        "adam_fused_update": lambda: fused_adam_update(fused_adam, no_inf),
        "clip_grad_norm": lambda: torch.nn.utils.clip_grad_norm_(params, max_norm),
        "clipped_norm": lambda: clipped_norm(params, cfg.train.grad_clip),
        "flat_adam_update": lambda: flat_adam.apply(no_inf),
        "flat_clipped_norm": lambda: flat_adam.flat.clipped_norm(cfg.train.grad_clip),
        "two_host_syncs": lambda: math.isfinite(loss.item()) and bool(torch.isfinite(norm)),
    }
    ms = {}
    for name, piece in pieces.items():
        piece()
        times = []
        for _ in range(reps):
            c = time.process_time()
            piece()
            times.append(time.process_time() - c)
        ms[name] = 1000 * statistics.median(times)
    return {"reps": reps, "params": len(params), "numel": sum(p.numel() for p in params), "cpu_ms": ms}


def source_commit() -> str:
    """HEAD of the checkout the script runs from, ``+dirty`` with uncommitted changes; ``PNFS_COMMIT``
    where it is not a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        code = ["pnfs", "kernels", "bench/train_step.py"]
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *code],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("PNFS_COMMIT", "unknown")
    return head + ("+dirty" if dirty else "")


def run_case(argv: list[str], name: str, kernels: str) -> dict:
    """One case in a child process (``PNFS_KERNELS=kernels``); its last stdout line is the row as
    JSON. A case that fails gives ``{"case": name, "error": ...}`` and the run goes on."""
    env = {**os.environ, "PNFS_KERNELS": kernels}
    proc = subprocess.run(
        [sys.executable, __file__, *argv, "--case", name], env=env, capture_output=True, text=True
    )
    if proc.returncode < 0:  # e.g. the kernel's OOM killer: the last stderr line would not say so
        return {"case": name, "error": f"killed by signal {-proc.returncode}: {proc.stderr[-3000:]}"}
    if proc.returncode != 0:
        return {"case": name, "error": f"exit code {proc.returncode}: {proc.stderr[-3000:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="mpii_mobilenetv2_p3_256")
    p.add_argument("--batch", type=int, default=None, help="default: train.batch_size of the config")
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps per case (in blocks, see --block)")
    p.add_argument(
        "--block", type=int, default=5, help="steps between two reads of the device (a log interval)"
    )
    p.add_argument(
        "--cases",
        help="comma-separated case names, run in this order (instead of --baseline/--no-compile): "
        + ", ".join([c.name for c in CASES] + list(EXTRA_CASES)),
    )
    p.add_argument("--baseline", action="store_true", help="run only the step as it was before issue 12")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    p.add_argument("--json", type=Path, help="write the report here, again after every case")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its row
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.amp=none")
    args = p.parse_intermixed_args(argv)
    args.selected = selected_cases(args, p)
    return args


def selected_cases(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The case names this run measures, in order: ``--cases`` exactly, else the table less what
    ``--no-compile``/``--baseline`` leave out, then the interleaved pair and (CPU) the parts."""
    known = [c.name for c in CASES] + list(EXTRA_CASES)
    if args.cases:
        wanted = [name for name in args.cases.split(",") if name]
        unknown = [name for name in wanted if name not in known]
        if unknown or not wanted or len(set(wanted)) != len(wanted):
            parser.error(
                f"--cases {args.cases}: {'unknown ' + ', '.join(unknown) if unknown else 'empty or repeated'}"
                f" (known: {', '.join(known)})"
            )
        return wanted
    picked = [
        c.name
        for c in CASES
        if not (c.compiled and args.no_compile)
        and not (args.baseline and c.step != "baseline")
        and not (c.graphed and args.device != "cuda")  # a CUDA graph needs CUDA
    ]
    if not args.baseline:
        picked += ["interleaved"] + (["parts"] if args.device == "cpu" else [])
    return picked


def compare(row: dict, rows: list[dict]) -> None:
    """Add to ``row`` its ratios to the baseline of its compile mode (else the first case run) and
    how far its probe's loss and gradient norm are from the first case's (the same batch, seed and
    weights on every path: they must agree within the dtype's rounding)."""
    done = [r for r in rows if "error" not in r]
    if not done:
        row.update(ratio_reference=row["case"], ratio_vs_baseline=1.0, cpu_ratio_vs_baseline=1.0)
        row.update(loss_rel_diff=0.0, grad_norm_rel_diff=0.0, agreement_reference=row["case"])
        return
    base = next((r for r in done if r["step"] == "baseline" and r["compiled"] == row["compiled"]), done[0])
    row["ratio_reference"] = base["case"]
    row["ratio_vs_baseline"] = row["img_per_s"] / base["img_per_s"]
    row["cpu_ratio_vs_baseline"] = base["cpu_ms_per_step"] / row["cpu_ms_per_step"]
    first = done[0]
    row["agreement_reference"] = first["case"]
    for key, diff in (("probe_loss", "loss_rel_diff"), ("probe_grad_norm", "grad_norm_rel_diff")):
        row[diff] = abs(row[key] - first[key]) / max(abs(first[key]), 1e-30)


def row_line(row: dict) -> str:
    if "error" in row:
        how = row["error"].split(":", 1)[0]  # "exit code N" or "killed by signal N"
        last = (row["error"].strip().splitlines() or [""])[-1]
        return f"{row['case']:18s} FAILED ({how}): {last.removeprefix(how + ': ')}"
    return (
        f"{row['case']:18s} {row['img_per_s']:8.1f} img/s {row['step_ms']:8.1f} ms/step"
        f" (host {row['host_ms_per_step']:7.1f} ms, CPU {row['cpu_ms_per_step']:7.1f} ms)"
        f" first fwd+bwd {row['first_fwd_bwd_s']:6.1f} s {row['ops_per_step']:6d} ops/step"
        f" peak {row['peak_memory_mb']:6.0f} MB  x{row['ratio_vs_baseline']:.2f} vs {row['ratio_reference']}"
        f" (CPU time x{row['cpu_ratio_vs_baseline']:.2f}); loss {row['probe_loss']:.6g},"
        f" grad norm {row['probe_grad_norm']:.6g} (rel. diff vs {row['agreement_reference']}"
        f" {row['loss_rel_diff']:.1e}, {row['grad_norm_rel_diff']:.1e})"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    if args.case:
        if args.case == "interleaved":
            row = measure_interleaved(args)
        elif args.case == "parts":
            row = measure_parts(args)
        else:
            row = measure(args, next(c for c in CASES if c.name == args.case))
        print(json.dumps(row))
        return 0

    load_before, commit = os.getloadavg(), source_commit()  # at the start: others may commit meanwhile
    device = torch.device(args.device)
    report = {
        "config": str(args.config),
        "overrides": args.overrides,
        "cases": args.selected,
        "batch": None,
        "input_size": None,
        "dtype": None,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "commit": commit,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_1min_before_after": [load_before[0], None],
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "block": args.block,
        "rows": [],
        "interleaved": None,
        "parts": None,
    }
    rows, failed = report["rows"], 0
    for name in args.selected:
        if name == "interleaved":
            inter = report["interleaved"] = run_case(argv, name, "torch")
            if "error" in inter:
                failed += 1
                print(f"interleaved FAILED: {inter['error'][-500:]}", flush=True)
            else:
                print(
                    f"lean vs baseline, kernels=torch eager, interleaved in one process"
                    f" ({inter['rounds']} rounds):"
                    f" x{inter['wall_ratio']:.2f} wall, x{inter['cpu_ratio']:.2f} CPU time",
                    flush=True,
                )
        elif name == "parts":
            if args.device != "cpu":
                print("parts: CPU only (process CPU time is the cost of a piece only there); skipped")
                continue
            parts = report["parts"] = run_case(argv, name, "torch")
            if "error" in parts:
                failed += 1
                print(f"parts FAILED: {parts['error'][-500:]}", flush=True)
            else:
                ms = parts["cpu_ms"]
                print(
                    "CPU ms of the pieces that differ (baseline -> lean):"
                    f" loss fwd+bwd {ms['loss_scores']:.1f} -> {ms['loss_vectors']:.1f},"
                    f" Adam {ms['adam_for_loop']:.1f} -> {ms['adam_fused_update']:.1f},"
                    f" norm {ms['clip_grad_norm']:.1f} -> {ms['clipped_norm']:.1f},"
                    f" host syncs {ms['two_host_syncs']:.2f} -> 0",
                    flush=True,
                )
        else:
            case = next(c for c in CASES if c.name == name)
            row = run_case(argv, name, case.kernels)
            if "error" in row:
                failed += 1
            else:
                compare(row, rows)
                for key in ("batch", "input_size", "dtype"):
                    report[key] = report[key] or row[key]
            rows.append(row)
            print(row_line(row), flush=True)
        report["loadavg_1min_before_after"][1] = os.getloadavg()[0]
        if args.json:  # after every case: a run cut short keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1))
    if args.json:
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
