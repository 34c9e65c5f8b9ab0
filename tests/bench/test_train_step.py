"""bench/train_step.py: --cases runs exactly the named cases in their order, the report is on disk
after every case (a run cut short keeps what it measured), a failed case is recorded and the run
goes on, and one real case on the CPU reports host time beside wall time, its first forward and
backward apart, and the loss and gradient norm the paths must agree on."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "train_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_step_cli", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_cases_picks_exactly_the_named_ones_in_their_order(bench):
    args = bench.parse_args(["--device", "cpu", "--cases", "lean-auto-compiled,baseline,interleaved"])
    assert args.selected == ["lean-auto-compiled", "baseline", "interleaved"]
    assert bench.parse_args(["--device", "cpu", "--cases", "lean"]).selected == ["lean"]


def test_without_cases_the_table_less_what_the_flags_leave_out(bench):
    names = [c.name for c in bench.CASES]
    on_cpu = [c.name for c in bench.CASES if not c.graphed]  # a CUDA graph needs CUDA
    assert {"lean-graphed", "lean-auto-graphed"} <= set(names) - set(on_cpu)
    assert bench.parse_args(["--device", "cpu"]).selected == [*on_cpu, "interleaved", "parts"]
    assert bench.parse_args(["--device", "cuda"]).selected == [*names, "interleaved"]
    eager = [c.name for c in bench.CASES if not c.compiled and not c.graphed]
    assert bench.parse_args(["--device", "cpu", "--no-compile"]).selected == [*eager, "interleaved", "parts"]
    assert bench.parse_args(["--device", "cpu", "--baseline"]).selected == ["baseline", "baseline-compiled"]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("cases", ["lean,fast", "lean,lean", ","])
def test_an_unknown_or_repeated_case_is_refused_with_the_known_names(bench, capsys, cases):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--device", "cpu", "--cases", cases])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--cases {cases}:" in err and "known: baseline, lean, lean-auto" in err


def _row(name: str, step: str, img_per_s: float, loss: float = 2.0, norm: float = 4.0) -> dict:
    return {
        "case": name,
        "step": step,
        "kernels": "torch",
        "compiled": False,
        "batch": 2,
        "input_size": [256, 256],
        "dtype": "torch.float32",
        "img_per_s": img_per_s,
        "step_ms": 2000 / img_per_s,
        "host_ms_per_step": 1000 / img_per_s,
        "cpu_ms_per_step": 2000 / img_per_s,
        "first_fwd_bwd_s": 1.0,
        "ops_per_step": 100,
        "peak_memory_mb": 10.0,
        "probe_loss": loss,
        "probe_grad_norm": norm,
    }


def test_the_report_is_on_disk_after_every_case_and_a_failed_case_does_not_stop_the_run(
    bench, monkeypatch, tmp_path
):
    out = tmp_path / "report.json"
    seen = []  # the cases the report held when each case started

    def fake_run_case(argv, name, kernels):
        seen.append([r["case"] for r in json.loads(out.read_text())["rows"]] if out.exists() else None)
        if name == "lean-auto":
            return {"case": name, "error": "exit code 1: ValueError: weighted_sum: dtypes differ"}
        return _row(name, "lean" if name.startswith("lean") else "baseline", 20.0 if name == "lean" else 10.0)

    monkeypatch.setattr(bench, "run_case", fake_run_case)
    code = bench.main(["--device", "cpu", "--cases", "lean,lean-auto,baseline", "--json", str(out)])
    assert code == 1  # one case failed
    assert seen == [None, ["lean"], ["lean", "lean-auto"]]
    report = json.loads(out.read_text())
    assert [r["case"] for r in report["rows"]] == ["lean", "lean-auto", "baseline"]
    assert report["rows"][1]["error"].endswith("dtypes differ") and report["cases"] == [
        "lean",
        "lean-auto",
        "baseline",
    ]
    lean, _, baseline = report["rows"]
    assert lean["ratio_reference"] == "lean" and baseline["ratio_reference"] == "lean"
    assert baseline["ratio_vs_baseline"] == pytest.approx(0.5)
    assert bench.row_line(report["rows"][1]).split() == [
        "lean-auto", "FAILED", "(exit", "code", "1):", "ValueError:", "weighted_sum:", "dtypes", "differ",
    ]  # fmt: skip
    killed = {"case": "lean", "error": "killed by signal 9: profiler_start\n"}
    assert bench.row_line(killed).startswith("lean               FAILED (killed by signal 9): profiler_start")


def test_paths_are_compared_to_the_first_case_and_ratios_to_the_baseline_of_their_mode(bench):
    rows = []
    for row in (_row("baseline", "baseline", 10.0), _row("lean", "lean", 15.0, loss=2.002, norm=3.6)):
        bench.compare(row, rows)
        rows.append(row)
    assert rows[1]["ratio_reference"] == "baseline" and rows[1]["ratio_vs_baseline"] == pytest.approx(1.5)
    assert rows[1]["loss_rel_diff"] == pytest.approx(1e-3) and rows[1]["grad_norm_rel_diff"] == pytest.approx(
        0.1
    )
    assert rows[0]["loss_rel_diff"] == 0.0
    line = bench.row_line(rows[1])
    assert "host    66.7 ms" in line and "x1.50 vs baseline" in line and "1.0e-03, 1.0e-01" in line


@pytest.mark.timeout(120)
def test_one_real_case_reports_host_and_wall_time_and_the_probe(bench, monkeypatch):
    monkeypatch.setenv("PNFS_KERNELS", "torch")
    args = bench.parse_args(
        ["--config", "demo", "--batch", "1", "--device", "cpu", "--steps", "2", "--block", "1"]
    )
    args.warmup = 1
    row = bench.measure(args, next(c for c in bench.CASES if c.name == "lean"))
    assert row["case"] == "lean" and row["ops_per_step"] > 1000
    assert 0 < row["host_ms_per_step"] <= row["step_ms"]  # enqueued before it finished
    assert row["first_fwd_bwd_s"] > 0 and row["first_step_s"] > 0
    assert math.isfinite(row["probe_loss"]) and row["probe_loss"] > 0 and row["probe_grad_norm"] > 0
