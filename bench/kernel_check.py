"""Correctness of every fused kernel against its float64 reference: each kernel x fp32/bf16 x
layouts (NCHW, channels_last, a strided slice) x ragged sizes (none a multiple of a tile), forward
and backward, on fresh random inputs. The GPU acceptance run's first stage (bench/README.md).

    python bench/kernel_check.py [--device cuda|cpu] [--quick] [--json FILE]

Per compared output, the relative error ``||out - ref|| / ||ref||`` (float64; NaN or a shape
mismatch counts as infinite) against the reference computed in float64 from the same inputs
upcast, so that only the kernel's own arithmetic and its output rounding remain:

* ``weighted_sum``: out = sum_k w_k x_k (ReLU'd for the input node, K = 3), K = 3 and 5; the
  gradients dx_k and dw;
* ``squash_score``: s = |v|^2 / (1 + |v|^2) over d = 8; dv;
* ``squash_mse_loss``: mean_{n,j} 0.5 w_nj mean_hw (s - t)^2; dv;
* ``argmax_decode``: coordinates and peak values, which must be equal (maps with one peak each:
  no ties to break differently).

Tolerances: 1e-4 for fp32 outputs, 1e-2 for bf16 (8 bits of mantissa: about 4e-3 per element).
The kernels run with ``PNFS_KERNELS=triton`` (on the CPU only under ``TRITON_INTERPRET=1``).
One line per kernel, dtype and layout (its worst error); the JSON holds every comparison; exit
code 1 when one fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("pnfs") is None:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}
LAYOUTS = ("nchw", "channels_last", "strided")
D = 8  # vector length of the squash kernels
JOINTS = 17


def sizes(quick: bool) -> list[tuple[int, int, int]]:
    """(N, H, W): ragged at the GPU's tiles (1024 and 512 elements, 256/512 pixels per program)."""
    return [(1, 17, 13)] if quick else [(2, 17, 13), (3, 97, 75)]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    if got.shape != ref.shape:
        return float("inf")
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return float("inf") if err != err else err  # NaN never passes


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` [N, C, H, W] as NCHW, channels_last, or a strided slice of a larger tensor."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        n, c, h, w = x.shape
        big = torch.zeros(n, c, h + 3, w + 5, dtype=x.dtype, device=x.device)
        big[:, :, 1 : 1 + h, 2 : 2 + w] = x
        return big[:, :, 1 : 1 + h, 2 : 2 + w]
    return x.contiguous()


def _leaves(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the tensors as leaves that take gradients, float64 copies as leaves)."""
    leaves = [t.detach().requires_grad_() for t in tensors]
    return leaves, [t.detach().double().requires_grad_() for t in tensors]


def _compare(run: Callable, reference: Callable, inputs: list[torch.Tensor], names: list[str]) -> dict:
    """Forward and backward of ``run`` and of ``reference`` (float64); relative error per output."""
    leaves, leaves64 = _leaves(inputs)
    out, ref = run(*leaves), reference(*leaves64)
    errs = {"out": rel_err(out, ref)}
    g = (
        torch.randn(out.shape, dtype=torch.float32).to(out.device, out.dtype)
        if out.dim()
        else torch.ones_like(out)
    )
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    grads64 = torch.autograd.grad(ref, leaves64, g.double(), allow_unused=True)
    for name, got, want in zip(names, grads, grads64):
        if want is not None:
            errs[name] = rel_err(got if got is not None else torch.full_like(want, float("nan")), want)
    return errs


def check_weighted_sum(dtype: torch.dtype, layout: str, n: int, h: int, w: int, device: torch.device) -> dict:
    from pnfs import kernels as K

    errs = {}
    for k, relu in ((3, True), (5, False)):
        xs = [in_layout(torch.randn(n, 40, h, w).to(device, dtype), layout) for _ in range(k)]
        weights = torch.softmax(torch.randn(k), 0).to(device)
        found = _compare(
            lambda *t, relu=relu: K.weighted_sum(list(t[:-1]), t[-1], relu),
            lambda *t, relu=relu: K.weighted_sum_reference(list(t[:-1]), t[-1], relu),
            [*xs, weights],
            [*(f"dx{i}" for i in range(k)), "dw"],
        )
        errs |= {f"K={k}{' relu' if relu else ''} {name}": e for name, e in found.items()}
    return errs


def check_squash_score(dtype: torch.dtype, layout: str, n: int, h: int, w: int, device: torch.device) -> dict:
    from pnfs import kernels as K

    v = in_layout((0.5 * torch.randn(n, JOINTS * D, h, w)).to(device, dtype), layout)
    return _compare(lambda v: K.squash_score(v, D), lambda v: K.squash_score_reference(v, D), [v], ["dv"])


def check_squash_mse_loss(
    dtype: torch.dtype, layout: str, n: int, h: int, w: int, device: torch.device
) -> dict:
    from pnfs import kernels as K

    v = in_layout((0.5 * torch.randn(n, JOINTS * D, h, w)).to(device, dtype), layout)
    targets = torch.rand(n, JOINTS, h, w).to(device)
    weights = (torch.rand(n, JOINTS) > 0.2).float().to(device)
    return _compare(
        lambda v: K.squash_mse_loss(v, D, targets, weights),
        lambda v: K.squash_mse_loss_reference(v, D, targets.double(), weights.double()),
        [v],
        ["dv"],
    )


def check_argmax_decode(
    dtype: torch.dtype, layout: str, n: int, h: int, w: int, device: torch.device
) -> dict:
    """Maps below 0.5 with one peak of 1.0 each: one argmax, decoded the same way by both."""
    from pnfs import kernels as K

    maps = 0.5 * torch.rand(n, JOINTS, h * w)
    maps.scatter_(2, torch.randint(h * w, (n, JOINTS, 1)), 1.0)
    scores = in_layout(maps.reshape(n, JOINTS, h, w).to(device, dtype), layout)
    (xy, peak), (xy_ref, peak_ref) = K.argmax_decode(scores), K.argmax_decode_reference(scores.double())
    exact = {"coords": torch.equal(xy.cpu().double(), xy_ref.cpu().double())}
    exact["maxvals"] = torch.equal(peak.cpu().double(), peak_ref.cpu().double())
    return {name: 0.0 if same else float("inf") for name, same in exact.items()}


CHECKS = {
    "weighted_sum": check_weighted_sum,
    "squash_score": check_squash_score,
    "squash_mse_loss": check_squash_mse_loss,
    "argmax_decode": check_argmax_decode,
}


def run_checks(device: torch.device, quick: bool, seed: int = 0) -> list[dict]:
    """One row per kernel, dtype, layout, size and compared output."""
    torch.manual_seed(seed)
    rows = []
    for kernel, check in CHECKS.items():
        for dtype in DTYPES:
            for layout in LAYOUTS:
                for n, h, w in sizes(quick):
                    for output, err in check(DTYPES[dtype], layout, n, h, w, device).items():
                        rows.append(
                            {
                                "kernel": kernel,
                                "dtype": dtype,
                                "layout": layout,
                                "size": [n, h, w],
                                "output": output,
                                "rel_err": err,
                                "tol": TOLERANCE[dtype],
                                "ok": err <= TOLERANCE[dtype],
                            }
                        )
    return rows


def summary_lines(rows: list[dict]) -> list[str]:
    """One line per kernel, dtype and layout: its worst comparison, and ok or FAILED."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["dtype"], r["layout"]), []).append(r)
    lines = []
    for (kernel, dtype, layout), group in groups.items():
        worst = max(group, key=lambda r: r["rel_err"])
        verdict = "ok" if all(r["ok"] for r in group) else "FAILED"
        lines.append(
            f"{kernel:16s} {dtype} {layout:13s} worst {worst['output']:16s} {worst['rel_err']:.1e}"
            f" (tol {worst['tol']:.0e}) {verdict}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--quick", action="store_true", help="one small size (the interpreter's check on a CPU)")
    p.add_argument("--json", type=Path, help="write every comparison here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--device cpu runs the Triton kernels only under TRITON_INTERPRET=1")
    os.environ["PNFS_KERNELS"] = "triton"
    rows = run_checks(torch.device(args.device), args.quick)
    for line in summary_lines(rows):
        print(line)
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} comparisons within tolerance")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": args.device, "quick": args.quick, "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
