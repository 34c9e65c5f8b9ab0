"""Speed of the fused kernels against their PyTorch references, at PNFS shapes.

    python bench/kernels.py [--device cuda|cpu] [--json FILE] [--quick] [--reps N] [--dtypes fp32,bf16]
                            [--no-compiled]
    python bench/kernels.py --aot [--json FILE]   (the AOT resource report: bench/kernels_aot.py)

Cases (batch 32; 1/4-resolution maps 64x64 and 96x72, i.e. 256x256 and 384x288 inputs):

* ``weighted_sum``: [32, C*4, H, W] for C = 10, 16; K = 3 with ReLU (the input node, 3 softmax(beta))
  and K = 4, 10 without (hidden nodes: edges x non-zero ops, |O| softmax(alpha)).
* ``squash_score``: vectors [32, J*8, H, W] -> scores [32, J, H, W], J = 16 (MPII), 17 (COCO), d = 8.
* ``squash_mse_loss``: the same vectors, targets [32, J, H, W] fp32, weights [32, J] -> scalar.
* ``argmax_decode`` on scores [32, J, H, W].

each in fp32 and bf16 (one after the other for each shape, so a cut-short run has both), ``fwd``
and ``fwd+bwd`` (the decoder has no backward). Per case, each implementation is first called once
outside timing (``compile_s``: Triton's JIT, ``torch.compile``'s compilation of this case's
graphs), warmed up, then timed: the median of ``--reps`` runs (CUDA events on a GPU,
``time.perf_counter`` on the CPU); ``recompiled_while_timed`` says whether dynamo compiled
anything during the timed runs (it should not). The bandwidth from the bytes the kernel must
move (every input read once, every output written once, see ``min_bytes``), its share of the
device's peak (``PEAK_TBPS``), and the speed-ups of the measured implementation over the eager
reference and ``torch.compile``d reference. On CUDA the measured implementation is the Triton
kernel (``PNFS_KERNELS=triton``); on the CPU, where there is no Triton, it is
``torch.compile(reference)`` against the eager reference, so the script always runs.
``--no-compiled`` leaves ``torch.compile`` out (the GPU acceptance run does: its compilations
cost more than all the timed runs together; ``speedup_vs_compiled`` is then null). One line
per case with the cases done and an estimate of the time left; the JSON (``--json``, default
``runs/bench/kernels.json``) is rewritten after every case.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("pnfs") is None:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

# Peak DRAM bandwidth, TB/s (vendor figures); the first key found in the device name applies.
PEAK_TBPS = {"H200": 4.8, "H100": 3.35, "A100": 2.04}
PEAK_NOTE = "H100 SXM 3.35 TB/s, H200 4.8 TB/s, A100 2.04 TB/s (vendor peak DRAM bandwidth)"

BATCH = 32
MAPS = ((64, 64), (96, 72))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    kernel: str
    mode: str  # "fwd" or "fwd+bwd"
    shape: tuple[int, ...]  # of the big input (each weighted-sum term, the vectors, the scores)
    dtype: str
    k: int = 0  # weighted_sum terms
    relu: bool = False
    d: int = 1  # vector length (squash)

    @property
    def label(self) -> str:
        extra = f" K={self.k}{' relu' if self.relu else ''}" if self.kernel == "weighted_sum" else ""
        extra += f" d={self.d}" if self.d > 1 else ""
        return f"{self.kernel:22s} {self.mode:7s} {self.dtype} {'x'.join(map(str, self.shape))}{extra}"


def cases(quick: bool, dtypes: tuple[str, ...] | None = None) -> list[Case]:
    """Every case, the dtypes of one shape next to each other (``dtypes``: default fp32 and bf16,
    fp32 alone with ``quick``)."""
    batch, maps, channels, ks, joints = BATCH, MAPS, (10, 16), (3, 4, 10), (16, 17)
    if quick:  # a smoke test: small shapes
        batch, maps, channels, ks, joints = 2, ((16, 12),), (10,), (3, 10), (17,)
    dtypes = dtypes or (("fp32",) if quick else tuple(DTYPES))
    out = []
    for h, w in maps:
        for c in channels:
            for k in ks:
                for mode in ("fwd", "fwd+bwd"):
                    for dtype in dtypes:
                        out.append(Case("weighted_sum", mode, (batch, 4 * c, h, w), dtype, k=k, relu=k == 3))
        for j in joints:
            for dtype in dtypes:
                for mode in ("fwd", "fwd+bwd"):
                    out.append(Case("squash_score", mode, (batch, 8 * j, h, w), dtype, d=8))
                out.append(Case("squash_mse_loss", "fwd+bwd", (batch, 8 * j, h, w), dtype, d=8))
                out.append(Case("argmax_decode", "fwd", (batch, j, h, w), dtype))
    return out


def min_bytes(case: Case) -> int:
    """Bytes the kernel must move: each input read once, each output written once."""
    es = DTYPES[case.dtype].itemsize
    numel = 1
    for s in case.shape:
        numel *= s
    maps = numel // case.d  # score-map elements [N, J, H, W]
    if case.kernel == "weighted_sum":
        fwd = (case.k + 1) * numel * es  # read K terms, write out
        # read g (and out for the ReLU mask), read K terms (dw), write K dx
        bwd = (1 + case.relu + 2 * case.k) * numel * es
        return fwd + (bwd if case.mode == "fwd+bwd" else 0)
    if case.kernel == "squash_score":
        fwd = numel * es + maps * es  # read v, write scores
        bwd = 2 * numel * es + maps * es  # read v and g, write dv
        return fwd + (bwd if case.mode == "fwd+bwd" else 0)
    if case.kernel == "squash_mse_loss":
        return 2 * numel * es + maps * 4  # read v and fp32 targets, write dv (one fused pass)
    return numel * es  # the decoder reads the maps once; outputs are [N, J, 3]


def inputs_for(case: Case, device: torch.device) -> tuple[list[torch.Tensor], Callable, Callable]:
    """(leaf tensors that take gradients, reference fn, kernel fn); both fns map the leaves to outputs."""
    from pnfs import kernels as K

    dtype = DTYPES[case.dtype]
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    grad = case.mode == "fwd+bwd"
    if case.kernel == "weighted_sum":
        xs = [rand(*case.shape).requires_grad_(grad) for _ in range(case.k)]
        w = torch.softmax(torch.randn(case.k, generator=g), 0).to(device).requires_grad_(grad)
        relu = case.relu
        return (
            [*xs, w],
            lambda *t: K.weighted_sum_reference(list(t[:-1]), t[-1], relu),
            lambda *t: K.weighted_sum(list(t[:-1]), t[-1], relu),
        )
    if case.kernel == "squash_score":
        v = rand(*case.shape, scale=0.5).requires_grad_(grad)
        d = case.d
        return [v], lambda v: K.squash_score_reference(v, d), lambda v: K.squash_score(v, d)
    if case.kernel == "squash_mse_loss":
        n, c, h, w = case.shape
        v = rand(*case.shape, scale=0.5).requires_grad_(grad)
        t = torch.rand(n, c // case.d, h, w, generator=g).to(device)
        wt = (torch.rand(n, c // case.d, generator=g) > 0.2).float().to(device)
        d = case.d
        return (
            [v],
            lambda v: K.squash_mse_loss_reference(v, d, t, wt),
            lambda v: K.squash_mse_loss(v, d, t, wt),
        )
    s = torch.rand(*case.shape, generator=g).to(device=device, dtype=dtype)
    return [s], K.argmax_decode_reference, K.argmax_decode


def runner(fn: Callable, leaves: list[torch.Tensor], backward: bool) -> Callable[[], None]:
    """One call of ``fn`` (and its backward against a fixed random output gradient)."""
    if not backward:
        return lambda: fn(*leaves)
    needs = [t for t in leaves if t.requires_grad]
    out = fn(*leaves)
    gout = torch.randn_like(out) if out.dim() else torch.ones_like(out)
    return lambda: torch.autograd.grad(fn(*leaves), needs, gout)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dynamo_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return sum(counters["stats"].values()) if "stats" in counters else 0


def first_call_s(make_step: Callable[[], Callable[[], None]], device: torch.device) -> tuple[Callable, float]:
    """(the step, seconds of its setup and first call): compilation happens here, outside timing."""
    t0 = time.perf_counter()
    step = make_step()
    step()
    sync(device)
    return step, time.perf_counter() - t0


def median_ms(step: Callable[[], None], device: torch.device, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    if device.type == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_tbps(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "cpu: no peak table"
    name = torch.cuda.get_device_name(device)
    for key, tbps in PEAK_TBPS.items():
        if key in name:
            return tbps, f"{name}: {key} {tbps} TB/s"
    return None, f"{name}: not in the table ({PEAK_NOTE})"


def measure(
    case: Case, device: torch.device, reps: int, warmup: int, peak: float | None, compiled: bool = True
) -> dict:
    leaves, reference, kernel = inputs_for(case, device)
    backward = case.mode == "fwd+bwd"
    impls = {"eager": reference}
    if compiled:
        torch._dynamo.reset()  # each case compiles its own graph (static shapes, no recompile limit)
        impls["compiled"] = torch.compile(reference, dynamic=False)
    if device.type == "cuda":
        impls["triton"] = kernel
    measured = "triton" if device.type == "cuda" else "compiled" if compiled else "eager"
    nbytes = min_bytes(case)
    result = {
        "kernel": case.kernel,
        "mode": case.mode,
        "shape": list(case.shape),
        "dtype": case.dtype,
        "k": case.k,
        "relu": case.relu,
        "d": case.d,
        "bytes": nbytes,
        "measured": measured,
        "median_ms": {},
        "gbps": {},
        "pct_peak": {},
        "compile_s": {},
        "recompiled_while_timed": False,
    }
    old = os.environ.get("PNFS_KERNELS")
    os.environ["PNFS_KERNELS"] = "triton" if device.type == "cuda" else "torch"
    try:
        for name, fn in impls.items():
            step, result["compile_s"][name] = first_call_s(lambda fn=fn: runner(fn, leaves, backward), device)
            graphs = dynamo_graphs()
            ms = median_ms(step, device, reps, warmup)
            result["recompiled_while_timed"] |= dynamo_graphs() != graphs
            result["median_ms"][name] = ms
            result["gbps"][name] = nbytes / ms / 1e6
            result["pct_peak"][name] = None if peak is None else 100 * nbytes / ms / 1e9 / peak
    finally:
        if old is None:
            os.environ.pop("PNFS_KERNELS")
        else:
            os.environ["PNFS_KERNELS"] = old
    t = result["median_ms"]
    result["speedup_vs_eager"] = t["eager"] / t[measured]
    result["speedup_vs_compiled"] = t["compiled"] / t[measured] if "compiled" in t else None
    return result


def line(r: dict, label: str) -> str:
    m = r["measured"]
    pct = r["pct_peak"][m]
    pct_text = f" {pct:5.1f}% peak" if pct is not None else ""
    compiled = (
        f"compiled {r['median_ms']['compiled']:9.3f} ms x{r['speedup_vs_compiled']:.2f}"
        if r["speedup_vs_compiled"] is not None
        else "compiled -"
    )
    return (
        f"{label:60s} {m} {r['median_ms'][m]:9.3f} ms {r['gbps'][m]:8.1f} GB/s{pct_text} | "
        f"eager {r['median_ms']['eager']:9.3f} ms x{r['speedup_vs_eager']:.2f} | {compiled}"
        f"{' RECOMPILED WHILE TIMED' if r['recompiled_while_timed'] else ''}"
    )


def progress(done: int, total: int, elapsed_s: float) -> str:
    """``[done/total, elapsed, ~left]``: the time left estimated from the mean case so far."""
    left = elapsed_s / done * (total - done)
    return f"[{done:3d}/{total}, {elapsed_s:4.0f} s, ~{left:4.0f} s left]"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if "--aot" in argv:  # compile for sm_80/sm_90 and report resources: no timing, no GPU
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import kernels_aot

        return kernels_aot.main([a for a in argv if a != "--aot"])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("runs/bench/kernels.json"),
        help="write the results here, after every case (default: runs/bench/kernels.json)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: small shapes, fp32, few reps")
    parser.add_argument("--reps", type=int, help="timed runs per implementation (default 20, 3 with --quick)")
    parser.add_argument(
        "--dtypes", help="comma-separated, of fp32,bf16 (default both; fp32 with --quick)", default=None
    )
    parser.add_argument(
        "--no-compiled", action="store_true", help="leave out the torch.compile'd reference (no compilation)"
    )
    args = parser.parse_args(argv)
    dtypes = tuple(args.dtypes.split(",")) if args.dtypes else None
    if dtypes and not set(dtypes) <= set(DTYPES):
        parser.error(f"--dtypes {args.dtypes}: expected a comma-separated list of {', '.join(DTYPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available (use --device cpu)")
    device = torch.device(args.device)
    if args.no_compiled and device.type == "cpu":
        parser.error("--no-compiled: on the CPU the compiled reference is what is measured (no Triton there)")
    reps = args.reps or (3 if args.quick else 20)
    warmup = 1 if args.quick else 3
    peak, peak_source = peak_tbps(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    header = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        # pnfs.kernels.auto_table derives PNFS_KERNELS=auto's choice per compute capability from this
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "peak_tbps": peak,
        "peak_source": peak_source,
        "peak_table": PEAK_NOTE,
        "measured": "triton" if device.type == "cuda" else "compiled",
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "compiled": not args.no_compiled,
        "reps": reps,
        "threads": torch.get_num_threads(),
    }
    measured = header["measured"]
    print(
        f"# {header['device_name'] or args.device}; peak: {peak_source}; torch {torch.__version__}, "
        f"triton {triton_version}; median of {reps}; speed-ups of '{measured}' over eager and compiled"
    )
    results, todo, started = [], cases(args.quick, dtypes), time.perf_counter()
    for case in todo:
        r = measure(case, device, reps, warmup, peak, compiled=not args.no_compiled)
        results.append(r)
        print(
            f"{line(r, case.label)} {progress(len(results), len(todo), time.perf_counter() - started)}",
            flush=True,
        )
        # after every case, so an interrupted run keeps what it measured
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**header, "cases": results}, indent=1))
    print(f"# wrote {args.json}")
    return {**header, "cases": results}


if __name__ == "__main__":
    main()
