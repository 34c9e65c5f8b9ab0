"""bench/kernel_check.py, the GPU acceptance run's correctness stage: the references pass it in fp32,
a kernel off by 0.1 % or a decoder off by a quarter pixel fails it (naming the outputs), and under
the Triton interpreter the real kernels pass every dtype and layout at a ragged size."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernel_check.py"


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("bench_kernel_check", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_strided_layout_is_a_view_that_is_neither_contiguous_nor_channels_last(check):
    x = torch.randn(2, 3, 5, 7)
    view = check.in_layout(x, "strided")
    assert torch.equal(view, x) and not view.is_contiguous()
    assert not view.is_contiguous(memory_format=torch.channels_last)
    assert check.in_layout(x, "channels_last").is_contiguous(memory_format=torch.channels_last)


def test_relative_error_counts_nan_and_a_wrong_shape_as_infinite(check):
    ref = torch.ones(4)
    assert check.rel_err(ref * 1.001, ref) == pytest.approx(1e-3, rel=1e-3)
    assert check.rel_err(torch.tensor([1.0, float("nan"), 1.0, 1.0]), ref) == float("inf")
    assert check.rel_err(torch.ones(3), ref) == float("inf")


def test_the_fp32_references_pass_against_float64(check, monkeypatch):
    monkeypatch.setenv("PNFS_KERNELS", "torch")
    rows = check.run_checks(torch.device("cpu"), quick=True)
    fp32 = [r for r in rows if r["dtype"] == "fp32"]
    assert {r["kernel"] for r in fp32} == set(check.CHECKS) and {r["layout"] for r in fp32} == set(
        check.LAYOUTS
    )
    assert all(r["ok"] for r in fp32), [r for r in fp32 if not r["ok"]]


def test_a_kernel_off_by_a_tenth_of_a_percent_fails_its_outputs_and_only_those(check, monkeypatch):
    from pnfs import kernels as K

    monkeypatch.setenv("PNFS_KERNELS", "torch")
    reference = K.squash_score_reference
    monkeypatch.setattr(K, "squash_score", lambda v, d: reference(v, d) * 1.001)
    decode = K.argmax_decode_reference
    monkeypatch.setattr(K, "argmax_decode", lambda s: (decode(s)[0] + 0.25, decode(s)[1]))
    rows = [r for r in check.run_checks(torch.device("cpu"), quick=True) if r["dtype"] == "fp32"]
    failed = {(r["kernel"], r["output"]) for r in rows if not r["ok"]}
    assert failed == {("squash_score", "out"), ("squash_score", "dv"), ("argmax_decode", "coords")}
    lines = check.summary_lines(rows)
    assert any(line.startswith("squash_score     fp32 nchw") and line.endswith("FAILED") for line in lines)


@pytest.mark.interpret
@pytest.mark.timeout(600)
def test_the_triton_kernels_pass_every_dtype_and_layout_under_the_interpreter(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--device", "cpu", "--quick", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "comparisons within tolerance" in proc.stdout and out.is_file()
