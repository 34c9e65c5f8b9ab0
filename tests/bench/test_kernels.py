"""bench/kernels.py as a user runs it: which cases in which order, the estimate of the time left,
the arguments it refuses, and one case measured outside its compilation (CPU, no torch.compile)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels_cli", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_both_dtypes_of_a_shape_come_close_together(bench):
    """A run cut short by its time box has measured bf16 about as far as fp32: at any point of
    the list the two counts differ by at most one kernel's cases (4)."""
    full = bench.cases(quick=False)
    assert len(full) == 80
    fp32 = bf16 = 0
    for case in full:
        fp32 += case.dtype == "fp32"
        bf16 += case.dtype == "bf16"
        assert abs(fp32 - bf16) <= 4, (fp32, bf16, case)
    assert fp32 == bf16 == 40


def test_dtypes_pick_the_cases_and_quick_is_fp32(bench):
    assert {c.dtype for c in bench.cases(quick=False, dtypes=("bf16",))} == {"bf16"}
    assert len(bench.cases(quick=False, dtypes=("bf16",))) == 40
    assert {c.dtype for c in bench.cases(quick=True)} == {"fp32"} and len(bench.cases(quick=True)) == 8
    assert {c.dtype for c in bench.cases(quick=True, dtypes=("fp32", "bf16"))} == {"fp32", "bf16"}


def test_progress_estimates_the_time_left_from_the_mean_case(bench):
    assert bench.progress(4, 10, 20.0) == "[  4/10,   20 s, ~  30 s left]"
    assert bench.progress(10, 10, 33.0).endswith("~   0 s left]")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dtypes", "fp16"], "--dtypes fp16: expected a comma-separated list of fp32, bf16"),
        (["--device", "cpu", "--no-compiled"], "--no-compiled: on the CPU the compiled reference"),
    ],
)
def test_bad_arguments_are_refused_by_name(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_json_goes_under_runs_bench_by_default(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    assert "default: runs/bench/kernels.json" in " ".join(capsys.readouterr().out.split())


def test_a_case_is_timed_after_its_first_call_and_reports_it_apart(bench, monkeypatch):
    """The eager reference on the CPU (no compile): compile_s holds the first call, the timed runs
    compiled nothing, and the numbers the JSON carries are there."""
    monkeypatch.setenv("PNFS_KERNELS", "torch")
    case = bench.Case("weighted_sum", "fwd+bwd", (1, 8, 8, 8), "fp32", k=3, relu=True)
    r = bench.measure(case, torch.device("cpu"), reps=2, warmup=1, peak=None, compiled=False)
    assert set(r["median_ms"]) == {"eager"} and r["median_ms"]["eager"] > 0
    assert set(r["compile_s"]) == {"eager"} and r["compile_s"]["eager"] > 0
    assert r["recompiled_while_timed"] is False and r["speedup_vs_compiled"] is None
    assert r["bytes"] == bench.min_bytes(case) and r["gbps"]["eager"] > 0
