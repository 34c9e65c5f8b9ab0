"""What ``PNFS_KERNELS=auto`` runs on a GPU: per kernel, dtype and compute capability, whichever
implementation measured fastest there (docs/design.md §3).

The rule (:func:`choices`, a pure function of a ``bench/kernels.py`` results JSON): over the
cases of one kernel and dtype (both shapes, every mode), take the geometric mean of Triton's
speed-up over the eager reference and over ``torch.compile`` of the reference. Triton is chosen
only when both means exceed 1: a kernel that cannot beat the compiled reference is not chosen
(it stays a tested option, ``PNFS_KERNELS=triton``). A kernel, dtype or capability that was never
measured keeps the PyTorch reference.

:data:`AUTO_TABLE` is the result over the committed measurements in :data:`RESULTS`;
``tests/kernels/test_kernels.py`` recomputes it from those files, so the two cannot drift.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

Key = tuple[str, str, tuple[int, int]]  # (kernel, dtype name, compute capability)

# compute capability -> results of bench/kernels.py on such a GPU, relative to the repository root
RESULTS: dict[tuple[int, int], str] = {
    (9, 0): "bench/results/kernels-h200-fp32-2026-12-04.json",  # H200, torch 2.11, triton 3.6
}

AUTO_TABLE: dict[Key, str] = {
    ("argmax_decode", "fp32", (9, 0)): "torch",
    ("squash_mse_loss", "fp32", (9, 0)): "triton",
    ("squash_score", "fp32", (9, 0)): "torch",
    ("weighted_sum", "fp32", (9, 0)): "torch",
}

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
BASELINES = ("eager", "compiled")


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def choices(report: dict) -> dict[Key, str]:
    """The ``auto`` choice per (kernel, dtype) measured in one results JSON of ``bench/kernels.py``
    (its ``capability`` [major, minor] and ``cases``): "triton" or "torch"."""
    if "capability" not in report:
        raise ValueError(
            "auto_table.choices: the results JSON has no 'capability' [major, minor] of the GPU it was "
            f"measured on (device {report.get('device_name') or report.get('device')!r})"
        )
    capability = tuple(report["capability"])
    times: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for case in report["cases"]:
        if case.get("measured") == "triton" and "triton" in case["median_ms"]:
            times[(case["kernel"], case["dtype"])].append(case["median_ms"])
    table = {}
    for (kernel, dtype), medians in sorted(times.items()):
        faster = all(
            all(baseline in ms for ms in medians)
            and geometric_mean([ms[baseline] / ms["triton"] for ms in medians]) > 1.0
            for baseline in BASELINES
        )
        table[(kernel, dtype, capability)] = "triton" if faster else "torch"
    return table


def auto_choice(kernel: str | None, dtype: torch.dtype, capability: tuple[int, int]) -> str:
    """ "triton" or "torch" for ``kernel`` on ``dtype`` data at ``capability``; unmeasured: "torch"."""
    if kernel is None:
        return "torch"
    major, minor = capability
    return AUTO_TABLE.get((kernel, DTYPE_NAMES.get(dtype, str(dtype)), (major, minor)), "torch")
