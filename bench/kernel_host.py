"""Host time per kernel call: the Python and dispatch cost a launch-bound step pays ~50 times.

    python bench/kernel_host.py [--json FILE] [--calls N] [--repeats R]

On the CPU, with every Triton launch stubbed out (each ``@triton.jit`` kernel of
``pnfs.kernels`` replaced by an object whose ``kernel[grid](...)`` does nothing), times each
kernel entry per call, forward and forward+backward, three ways in the same run:

* ``reference``: the eager PyTorch reference (``PNFS_KERNELS=torch``), on tensors of a few
  elements so that its arithmetic is negligible next to its per-op dispatch;
* ``function``: the public entry on the Triton path as it runs in eager mode: checks, dtype
  policy, backend choice, ``torch.autograd.Function``, output allocation, launcher arithmetic;
* ``custom_op``: the same launchers through the ``torch.library`` custom op (the path
  ``torch.compile`` and export trace; before, also the eager one).

Each time is the median over ``--repeats`` blocks of ``--calls`` calls, in µs per call. One line
per case with the ratios to the reference; ``--json`` writes them all. Triton's own launcher
(argument binding, the specialisation key) is stubbed out with the launch, so the Triton
columns are a lower bound of the real host cost on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    kernel: str  # weighted_sum, squash_score, squash_mse_loss, argmax_decode
    mode: str  # fwd, fwd+bwd
    k: int = 3  # weighted_sum inputs
    relu: bool = False

    @property
    def label(self) -> str:
        extra = f" K={self.k}{' relu' if self.relu else ''}" if self.kernel == "weighted_sum" else ""
        return f"{self.kernel}{extra} {self.mode}"


CASES = [
    Case("weighted_sum", "fwd", k=3, relu=True),
    Case("weighted_sum", "fwd+bwd", k=3, relu=True),  # an input node
    Case("weighted_sum", "fwd", k=10),
    Case("weighted_sum", "fwd+bwd", k=10),  # a hidden node
    Case("squash_score", "fwd"),
    Case("squash_score", "fwd+bwd"),
    Case("squash_mse_loss", "fwd+bwd"),
    Case("argmax_decode", "fwd"),
]
SHAPE = (2, 8, 3, 3)  # [N, C, H, W]: a few elements, so the reference's arithmetic is negligible
D = 4
KERNEL_MODULES = ("_reduce", "argmax_decode", "squash", "weighted_sum")


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def launches_stubbed():
    """Every ``*_kernel`` JIT function of the kernel modules a no-op, and the Triton path taken."""
    # the modules (``pnfs.kernels.weighted_sum`` etc. are also the names of the public functions)
    modules = [importlib.import_module(f"pnfs.kernels.{name}") for name in KERNEL_MODULES]
    with contextlib.ExitStack() as stack:
        for module in modules:
            for name, _ in inspect.getmembers(module):
                if name.startswith("_") and name.endswith("_kernel"):
                    stack.enter_context(mock.patch.object(module, name, _NoLaunch()))
            if hasattr(module, "use_triton"):
                stack.enter_context(mock.patch.object(module, "use_triton", lambda *args: True))
        yield


def make_call(case: Case, path: str) -> Callable[[], object]:
    """One call of ``case`` on ``path`` (reference, function, custom_op), backward included."""
    from pnfs import kernels as K

    n, c, h, w = SHAPE
    xs = [torch.randn(SHAPE, requires_grad=True) for _ in range(case.k)]
    weights = torch.rand(case.k, requires_grad=True)
    vectors = torch.randn(n, c, h, w, requires_grad=True)
    targets, loss_weights = torch.rand(n, c // D, h, w), torch.ones(n, c // D)
    scores = torch.rand(n, c // D, h, w)
    backward = case.mode == "fwd+bwd"
    ops = torch.ops.pnfs

    forward: Callable[[], torch.Tensor | tuple]
    if case.kernel == "weighted_sum":
        leaves = [*xs, weights]
        if path == "custom_op":
            forward = lambda: ops.weighted_sum(xs, weights, case.relu, torch.float32)
        else:
            forward = lambda: K.weighted_sum(xs, weights, case.relu)
    elif case.kernel == "squash_score":
        leaves = [vectors]
        if path == "custom_op":
            forward = lambda: ops.squash_score(vectors, D, torch.float32)
        else:
            forward = lambda: K.squash_score(vectors, D)
    elif case.kernel == "squash_mse_loss":
        leaves = [vectors]
        if path == "custom_op":
            forward = lambda: ops.squash_mse_loss(vectors, D, targets, loss_weights, backward)[0]
        else:
            forward = lambda: K.squash_mse_loss(vectors, D, targets, loss_weights)
    else:
        leaves = []
        forward = (
            (lambda: ops.argmax_decode(scores)) if path == "custom_op" else (lambda: K.argmax_decode(scores))
        )
    if not backward:

        def call():
            with torch.no_grad():
                return forward()

        return call

    def call_with_backward():
        out = forward()
        return torch.autograd.grad(out, leaves, torch.ones_like(out))

    return call_with_backward


def host_us(call: Callable[[], object], calls: int, repeats: int) -> float:
    for _ in range(max(10, calls // 10)):  # warm-up: caches, first-call paths
        call()
    blocks = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        blocks.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(blocks)


def measure(case: Case, calls: int, repeats: int) -> dict:
    us = {}
    os.environ["PNFS_KERNELS"] = "torch"
    us["reference"] = host_us(make_call(case, "reference"), calls, repeats)
    os.environ["PNFS_KERNELS"] = "triton"
    with launches_stubbed():
        us["function"] = host_us(make_call(case, "function"), calls, repeats)
        us["custom_op"] = host_us(make_call(case, "custom_op"), calls, repeats)
    ratios = {path: us[path] / us["reference"] for path in ("function", "custom_op")}
    return {
        "kernel": case.kernel,
        "mode": case.mode,
        "k": case.k,
        "relu": case.relu,
        "host_us": us,
        "ratio_vs_reference": ratios,
    }


def line(case: Case, result: dict) -> str:
    us, ratio = result["host_us"], result["ratio_vs_reference"]
    return (
        f"{case.label:<32} reference {us['reference']:8.1f} us | function {us['function']:8.1f} us "
        f"x{ratio['function']:.2f} | custom_op {us['custom_op']:8.1f} us x{ratio['custom_op']:.2f}"
    )


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--calls", type=int, default=300, help="calls per timed block (default 300)")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per case; the median is kept")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.repeats < 1:
        parser.error(f"--calls and --repeats must be >= 1, got {args.calls} and {args.repeats}")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = {
        "device": "cpu",
        "measured": "host time per call, Triton launches stubbed out",
        "shape": list(SHAPE),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "calls": args.calls,
        "repeats": args.repeats,
        "cases": [],
    }
    print(
        f"# host us per call (median of {args.repeats} x {args.calls}); torch {torch.__version__}, "
        f"triton {triton_version}; ratios to the eager reference"
    )
    previous = os.environ.get("PNFS_KERNELS")
    try:
        for case in CASES:
            result = measure(case, args.calls, args.repeats)
            report["cases"].append(result)
            print(line(case, result), flush=True)
    finally:
        if previous is None:
            os.environ.pop("PNFS_KERNELS", None)
        else:
            os.environ["PNFS_KERNELS"] = previous
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
