"""What the kernels share: dispatch (``PNFS_KERNELS``), API errors, custom-op registration,
``torch.compile`` and fvcore around them, the two-pass row sum, ``bench/kernels.py``, the
``auto`` backend's capability gating and fallback, and GPU cases that take several kernels.

One kernel's own cases (reference, ``interpret``, ``aot`` and ``gpu``, side by side) are in
``kernels/test_<name>.py``; the whole model under the interpreter in ``kernels/test_kernels_model.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pnfs.kernels import (
    FVCORE_HANDLES,
    argmax_decode,
    argmax_decode_reference,
    fvcore_handles,
    squash_mse_loss,
    squash_mse_loss_reference,
    squash_score,
    squash_score_reference,
    use_triton,
    weighted_sum,
    weighted_sum_reference,
)
from tests.support.kernel_cases import FP32, triton_for_interpreter_cases  # noqa: F401  (autouse fixture)

# ------------------------------------------------------------- dispatch and API


def test_torch_backend_runs_the_reference(monkeypatch):
    monkeypatch.setenv("PNFS_KERNELS", "torch")
    xs = [torch.randn(2, 3, 4, 5) for _ in range(3)]
    w = torch.randn(3, requires_grad=True)
    out = weighted_sum(xs, w, relu=True)
    assert out.grad_fn is not None and "pnfs" not in type(out.grad_fn).__name__.lower()
    torch.testing.assert_close(out, weighted_sum_reference(xs, w, relu=True), rtol=0, atol=0)
    v = torch.randn(2, 2 * 4, 3, 3)
    torch.testing.assert_close(squash_score(v, 4), squash_score_reference(v, 4), rtol=0, atol=0)
    t, wt = torch.rand(2, 2, 3, 3), torch.ones(2, 2)
    torch.testing.assert_close(squash_mse_loss(v, 4, t, wt), squash_mse_loss_reference(v, 4, t, wt))
    torch.testing.assert_close(argmax_decode(v[:, :2]), argmax_decode_reference(v[:, :2]))


def test_auto_backend_uses_the_reference_for_cpu_tensors(monkeypatch):
    monkeypatch.setenv("PNFS_KERNELS", "auto")
    from pnfs.kernels.backend import use_triton

    assert not use_triton(torch.zeros(1))


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("PNFS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="PNFS_KERNELS='cuda'"):
        weighted_sum([torch.zeros(2)], torch.ones(1))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs CPU tensors")
def test_triton_backend_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("PNFS_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        squash_score(torch.zeros(1, 4, 2, 2), 2)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: weighted_sum([], torch.ones(0)), "1..12 inputs, got 0"),
        (lambda: weighted_sum([torch.zeros(2)] * 13, torch.ones(13)), "1..12 inputs, got 13"),
        (lambda: weighted_sum([torch.zeros(2)] * 2, torch.ones(3)), r"weights of shape \(3,\) for 2 inputs"),
        (lambda: weighted_sum([torch.zeros(2), torch.zeros(3)], torch.ones(2)), r"input 1 has shape \(3,\)"),
        (
            lambda: weighted_sum([torch.zeros(2), torch.zeros(2, dtype=torch.int64)], torch.ones(2)),
            "input 1 is torch.int64; expected a floating-point tensor",
        ),
        (lambda: squash_score(torch.zeros(1, 6, 2, 2), 4), "6 channels are not a multiple of d=4"),
        (lambda: squash_score(torch.zeros(6, 2, 2), 2), r"\[N, J\*d, H, W\]"),
        (
            lambda: squash_mse_loss(torch.zeros(1, 4, 2, 2), 2, torch.zeros(1, 2, 2, 3), torch.ones(1, 2)),
            r"targets \(1, 2, 2, 3\), expected \(1, 2, 2, 2\)",
        ),
        (
            lambda: squash_mse_loss(torch.zeros(1, 4, 2, 2), 2, torch.zeros(1, 2, 2, 2), torch.ones(2)),
            r"weights \(2,\), expected \(1, 2\)",
        ),
        (lambda: argmax_decode(torch.zeros(2, 2, 2)), "argmax_decode: expected a 4-d"),
    ],
)
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_flat_planes_is_the_fast_path_for_row_major_planes_only():
    """The launchers' FLAT flag: pixel p of a plane at plane start + p (sW == 1, sH == W)."""
    from pnfs.kernels._compat import flat_planes

    x = torch.zeros(2, 6, 5, 7)
    assert flat_planes(x) and flat_planes(x[:, 1:4]) and flat_planes(x[1:])  # NCHW, channel/batch slices
    assert flat_planes(torch.zeros(2, 3, 1, 7)[..., :5])  # one row: only sW matters
    assert flat_planes(torch.zeros(2, 3, 5, 1))  # one column: sH == W == 1
    assert not flat_planes(torch.zeros(2, 3, 5, 2)[..., :1])  # one column of two: rows 2 apart
    assert not flat_planes(x.contiguous(memory_format=torch.channels_last))  # channels innermost
    assert not flat_planes(x[..., 1:])  # rows 7 apart, W = 6
    assert not flat_planes(x[..., ::2])  # sW = 2
    assert not flat_planes(x.transpose(2, 3))


def test_custom_ops_are_registered():
    for name in ("weighted_sum", "weighted_sum_backward", "squash_score", "squash_score_backward"):
        assert hasattr(torch.ops.pnfs, name)
    for name in ("squash_mse_loss", "argmax_decode"):
        assert hasattr(torch.ops.pnfs, name)
        assert f"pnfs::{name}" in FVCORE_HANDLES


def test_compiled_reference_path_has_no_graph_break(monkeypatch):
    monkeypatch.setenv("PNFS_KERNELS", "torch")

    def step(xs, w, v, t, wt):
        loss = squash_mse_loss(v * weighted_sum(xs, w, relu=True).mean(), 2, t, wt)
        return loss + argmax_decode(v[:, :2])[1].sum()

    xs = [torch.randn(2, 4, 5, 5) for _ in range(3)]
    w = torch.randn(3, requires_grad=True)
    v, t, wt = torch.randn(2, 4, 5, 5), torch.rand(2, 2, 5, 5), torch.ones(2, 2)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(xs, w, v, t, wt), step(xs, w, v, t, wt))


def test_fvcore_counts_the_reference_elementwise_ops_as_zero(monkeypatch):
    """FVCORE_HANDLES count a custom op like fvcore counts its reference: the reference traced
    on the torch backend adds no multiply-adds to the convolution's."""
    from fvcore.nn import FlopCountAnalysis

    monkeypatch.setenv("PNFS_KERNELS", "torch")
    conv = torch.nn.Conv2d(3, 8, 1, bias=False)
    model = _KernelModel(conv)
    analysis = FlopCountAnalysis(model, torch.randn(1, 3, 4, 4)).unsupported_ops_warnings(False)
    assert analysis.total() == 8 * 3 * 16
    assert set(fvcore_handles(elementwise=True)) == set(FVCORE_HANDLES)


class _KernelModel(torch.nn.Module):
    def __init__(self, conv: torch.nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        y = self.conv(x)
        return squash_score(weighted_sum([y, y * 2, y + 1], self.w, relu=True), 2)


#  Triton under the interpreter: custom ops, compile, fvcore, the shared reduction


@pytest.mark.interpret
def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) kernels and autograd registration, checked by torch itself."""
    xs = [torch.randn(2, 3, 4, 5, requires_grad=True) for _ in range(3)]
    w = torch.randn(3, requires_grad=True)
    torch.library.opcheck(torch.ops.pnfs.weighted_sum.default, (xs, w, True, torch.float32))
    mixed = [xs[0].detach().bfloat16().requires_grad_(), xs[1], xs[2].detach().half().requires_grad_()]
    torch.library.opcheck(torch.ops.pnfs.weighted_sum.default, (mixed, w, False, torch.bfloat16))
    v = torch.randn(2, 2 * 4, 3, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.pnfs.squash_score.default, (v, 4, torch.float32))
    torch.library.opcheck(torch.ops.pnfs.squash_score.default, (v, 4, torch.bfloat16))
    t, wt = torch.rand(2, 2, 3, 5), torch.ones(2, 2)
    torch.library.opcheck(torch.ops.pnfs.squash_mse_loss.default, (v, 4, t, wt, True))
    torch.library.opcheck(torch.ops.pnfs.argmax_decode.default, (t,))


@pytest.mark.interpret
def test_compile_fullgraph_through_the_kernels():
    def step(xs, w, v, t, wt):
        y = weighted_sum(xs, w, relu=True)
        s = squash_score(v * y.mean(), 2)
        loss = squash_mse_loss(v, 2, t, wt)
        return s.sum() + loss + argmax_decode(s)[1].sum()

    xs = [torch.randn(2, 4, 5, 5, requires_grad=True) for _ in range(3)]
    w = torch.randn(3, requires_grad=True)
    v, t, wt = torch.randn(2, 4, 5, 5, requires_grad=True), torch.rand(2, 2, 5, 5), torch.ones(2, 2)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(xs, w, v, t, wt), [*xs, w, v])
    want = torch.autograd.grad(step(xs, w, v, t, wt), [*xs, w, v])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.interpret
def test_fvcore_counts_the_custom_ops_like_their_reference(monkeypatch):
    from fvcore.nn import FlopCountAnalysis

    model, image = _KernelModel(torch.nn.Conv2d(3, 8, 1, bias=False)), torch.randn(1, 3, 4, 4)

    def count(backend: str, handles: dict) -> FlopCountAnalysis:
        monkeypatch.setenv("PNFS_KERNELS", backend)
        analysis = FlopCountAnalysis(model, image).unsupported_ops_warnings(False).set_op_handle(**handles)
        analysis.total()
        return analysis

    on_torch = count("torch", FVCORE_HANDLES)
    on_triton = count("triton", FVCORE_HANDLES)
    assert on_triton.total() == on_torch.total() == 8 * 3 * 16  # the 1x1 convolution only
    assert not [op for op in on_triton.unsupported_ops() if op.startswith("pnfs::")]
    elementwise = count("triton", fvcore_handles(elementwise=True))
    # + 3 * numel(out) for the weighted sum, + numel(vectors) for n^2
    assert elementwise.total() == 8 * 3 * 16 + 3 * 8 * 16 + 8 * 16


@pytest.mark.interpret
@pytest.mark.parametrize("cols", [1, 1023, 1025, 4100])
def test_sum_rows_over_thousands_of_columns(cols):
    partials = torch.randn(3, cols)
    got = importlib.import_module("pnfs.kernels._reduce").sum_rows(partials, 0.5)
    torch.testing.assert_close(got.double(), 0.5 * partials.double().sum(dim=1), **FP32)


# ------------------------------------------------------------- bench/kernels.py


BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_covers_the_issues_shapes_and_counts_the_bytes_each_kernel_must_move():
    bench = _bench_module()
    full = bench.cases(quick=False)
    ws = [c for c in full if c.kernel == "weighted_sum"]
    assert {c.shape for c in ws} == {(32, 4 * c, h, w) for c in (10, 16) for h, w in ((64, 64), (96, 72))}
    assert {(c.k, c.relu) for c in ws} == {(3, True), (4, False), (10, False)}
    squash = [c for c in full if c.kernel == "squash_score"]
    assert {c.shape for c in squash} == {(32, 8 * j, h, w) for j in (16, 17) for h, w in ((64, 64), (96, 72))}
    assert {c.dtype for c in full} == {"fp32", "bf16"} and {c.mode for c in ws} == {"fwd", "fwd+bwd"}
    assert {c.kernel for c in full} == {
        "weighted_sum", "squash_score", "squash_mse_loss", "argmax_decode",
    }  # fmt: skip
    numel = 32 * 40 * 64 * 64
    relu3 = bench.Case("weighted_sum", "fwd+bwd", (32, 40, 64, 64), "bf16", k=3, relu=True)
    assert bench.min_bytes(relu3) == (4 + 1 + 1 + 6) * numel * 2  # fwd: 3 in 1 out; bwd: g, out, 3 x, 3 dx
    sq = bench.Case("squash_score", "fwd", (32, 136, 96, 72), "fp32", d=8)
    assert bench.min_bytes(sq) == (32 * 136 + 32 * 17) * 96 * 72 * 4


@pytest.mark.slow  # ~50 s, nearly all torch.compile of the references: kept out of the CI budget
def test_benchmark_quick_run_on_cpu_writes_its_json(tmp_path):
    out = tmp_path / "kernels.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PNFS_KERNELS": "auto"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--device", "cpu", "--quick", "--reps", "1", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"device", "device_name", "peak_tbps", "measured", "torch", "triton", "commit", "cases"} <= set(
        report
    )
    assert report["device"] == "cpu" and report["measured"] == "compiled" and report["peak_tbps"] is None
    kernels = {c["kernel"] for c in report["cases"]}
    assert kernels == {
        "weighted_sum",
        "squash_score",
        "squash_mse_loss",
        "argmax_decode",
    }
    for case in report["cases"]:
        assert set(case["median_ms"]) == {"eager", "compiled"}
        assert all(ms > 0 for ms in case["median_ms"].values())
        assert case["speedup_vs_eager"] > 0 and case["bytes"] > 0 and case["gbps"]["compiled"] > 0
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("#")]
    assert len(lines) == len(report["cases"])  # one line per case


def test_kernel_host_benchmark_times_every_entry_three_ways(tmp_path, monkeypatch):
    """bench/kernel_host.py: one JSON entry per case with the reference, Function and custom-op
    host times, the Triton launches stubbed out (none runs: no interpreter, no GPU here)."""
    spec = importlib.util.spec_from_file_location("bench_kernel_host", BENCH.parent / "kernel_host.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    monkeypatch.setenv("PNFS_KERNELS", "auto")
    report = module.main(["--calls", "2", "--repeats", "1", "--json", str(tmp_path / "host.json")])
    assert json.loads((tmp_path / "host.json").read_text()) == report
    assert {(c["kernel"], c["mode"]) for c in report["cases"]} == {(c.kernel, c.mode) for c in module.CASES}
    assert {c["kernel"] for c in report["cases"]} == {
        "weighted_sum",
        "squash_score",
        "squash_mse_loss",
        "argmax_decode",
    }
    for case in report["cases"]:
        assert set(case["host_us"]) == {"reference", "function", "custom_op"}
        assert all(us > 0 for us in case["host_us"].values())
    assert os.environ["PNFS_KERNELS"] == "auto"  # restored
    for name in module.KERNEL_MODULES:  # the launches and the backend choice are restored
        kernel_module = importlib.import_module(f"pnfs.kernels.{name}")
        stubbed = [k for k, v in vars(kernel_module).items() if isinstance(v, module._NoLaunch)]
        assert not stubbed and getattr(kernel_module, "use_triton", None) in (None, use_triton)


# -------------------------------------------- on a GPU: several kernels at once


@pytest.mark.gpu
def test_inductor_compiles_around_the_custom_ops(monkeypatch):
    monkeypatch.setenv("PNFS_KERNELS", "triton")
    xs = [torch.randn(4, 40, 16, 12, device="cuda", requires_grad=True) for _ in range(3)]
    w = torch.randn(3, device="cuda", requires_grad=True)

    def f(xs, w):
        return squash_score(weighted_sum(xs, w, relu=True), 8).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    got = torch.autograd.grad(compiled(xs, w), [*xs, w])
    want = torch.autograd.grad(f(xs, w), [*xs, w])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_offsets_past_two_to_the_31_elements(monkeypatch):
    """int64 offsets: tensors of more than 2^31 elements (4 GiB in bf16) are read and written to the end."""
    monkeypatch.setenv("PNFS_KERNELS", "triton")
    numel = 2**31 + 4099
    xs = [torch.full((1, 1, 1, numel), v, device="cuda", dtype=torch.bfloat16) for v in (1.0, -3.0)]
    xs[1][..., -5:] = 2.0
    xs = [x.requires_grad_() for x in xs]
    w = torch.tensor([0.5, 0.25], device="cuda", requires_grad=True)
    out = weighted_sum(xs, w, relu=True)
    assert out[..., -6].item() == 0.0 and out[..., -1].item() == 1.0  # relu(0.5 - 0.75), 0.5 + 0.5
    dxs = torch.autograd.grad(out, [*xs], torch.ones_like(out))
    assert dxs[0][..., -1].item() == 0.5 and dxs[0][..., -6].item() == 0.0 and dxs[1][..., -1].item() == 0.25
    del xs, out, dxs
    scores = torch.zeros(1, 1, 2**16, 2**15 + 2, device="cuda", dtype=torch.float16)
    scores[0, 0, -2, -2] = 1.0  # the peak lies past element 2^31
    scores[0, 0, -2, -1] = 0.5
    coords, maxvals = argmax_decode(scores)
    assert coords.tolist() == [[[2**15 + 0.25, 2**16 - 2.0]]] and maxvals.item() == 1.0


# ------------------------- auto: capability gating, fallback, amp, device guard


class _FakeCudaTensor:
    device = torch.device("cuda", 0)


@pytest.mark.parametrize(
    "kernel, dtype, capability, expected",
    [
        ("squash_mse_loss", torch.float32, (9, 0), True),  # measured faster on the H200
        ("squash_mse_loss", torch.bfloat16, (9, 0), False),  # bf16 never measured
        ("squash_mse_loss", torch.float32, (8, 0), False),  # no A100 measurement
        ("squash_mse_loss", torch.float32, (6, 1), False),  # the paper's Titan Xp
        ("weighted_sum", torch.float32, (9, 0), False),  # slower than torch.compile there
        ("squash_score", torch.float32, (9, 0), False),
        ("argmax_decode", torch.float32, (9, 0), False),
        (None, torch.float32, (9, 0), False),  # a kernel that names no measurement
    ],
)
def test_auto_runs_triton_only_where_it_measured_fastest(monkeypatch, kernel, dtype, capability, expected):
    backend = importlib.import_module("pnfs.kernels.backend")
    monkeypatch.setenv("PNFS_KERNELS", "auto")
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(backend, "_CAPABILITY", {})
    assert backend.use_triton(_FakeCudaTensor(), kernel, dtype) is expected


def test_auto_table_is_the_rule_applied_to_the_committed_measurements():
    """AUTO_TABLE is recomputed from the committed bench/kernels.py results: the two cannot drift."""
    from pnfs.kernels import auto_table

    root = Path(__file__).resolve().parents[2]
    recomputed = {}
    for capability, path in auto_table.RESULTS.items():
        report = json.loads((root / path).read_text())
        assert tuple(report["capability"]) == capability and report["device"] == "cuda"
        recomputed.update(auto_table.choices(report))
    assert recomputed == auto_table.AUTO_TABLE


def _report(medians: list[dict[str, float]], kernel: str = "weighted_sum") -> dict:
    cases = [{"kernel": kernel, "dtype": "fp32", "measured": "triton", "median_ms": m} for m in medians]
    return {"capability": [8, 0], "cases": cases}


@pytest.mark.parametrize(
    "medians, expected",
    [
        ([{"eager": 2.0, "compiled": 1.5, "triton": 1.0}], "triton"),
        ([{"eager": 2.0, "compiled": 0.9, "triton": 1.0}], "torch"),  # loses to torch.compile
        ([{"eager": 0.9, "compiled": 2.0, "triton": 1.0}], "torch"),  # loses to eager
        ([{"eager": 2.0, "triton": 1.0}], "torch"),  # compiled reference not measured
        # geometric mean over the cases: 4x in one, 0.5x in the other -> sqrt(2) over both
        (
            [{"eager": 4.0, "compiled": 4.0, "triton": 1.0}, {"eager": 1.0, "compiled": 1.0, "triton": 2.0}],
            "triton",
        ),
        (
            [{"eager": 1.5, "compiled": 1.5, "triton": 1.0}, {"eager": 1.0, "compiled": 1.0, "triton": 2.0}],
            "torch",
        ),
    ],
)
def test_auto_rule_chooses_triton_only_over_both_references(medians, expected):
    from pnfs.kernels.auto_table import choices

    assert choices(_report(medians)) == {("weighted_sum", "fp32", (8, 0)): expected}


def test_auto_rule_needs_the_capability_the_results_were_measured_on():
    from pnfs.kernels.auto_table import choices

    report = _report([{"eager": 2.0, "compiled": 1.5, "triton": 1.0}])
    del report["capability"]
    with pytest.raises(ValueError, match="no 'capability'"):
        choices(report)


def test_auto_falls_back_to_the_reference_once_with_one_warning_when_a_kernel_fails(monkeypatch):
    """A kernel that cannot compile (here: launched on CPU tensors without the interpreter) is
    reported once, naming the kernel and the error; later calls use the reference silently."""
    backend = importlib.import_module("pnfs.kernels.backend")
    squash_module = importlib.import_module("pnfs.kernels.squash")
    monkeypatch.setenv("PNFS_KERNELS", "auto")
    monkeypatch.setattr(backend, "_FAILED", set())
    monkeypatch.setattr(squash_module, "use_triton", lambda *args: True)
    launches = []

    def failing_forward(vectors, d, out_dtype=None):
        launches.append(d)
        raise RuntimeError("ptxas fatal: forced compile error")

    monkeypatch.setattr(squash_module, "_squash_forward", failing_forward)
    v = torch.randn(2, 3 * 4, 5, 6)
    with pytest.warns(RuntimeWarning, match="squash_score failed.*forced compile error") as record:
        first = squash_score(v, 4)
    assert len(record) == 1
    torch.testing.assert_close(first, squash_score_reference(v, 4), rtol=0, atol=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(squash_score(v, 4), first, rtol=0, atol=0)
    assert launches == [4]  # the failed kernel is not tried again
    monkeypatch.setenv("PNFS_KERNELS", "triton")  # an explicit choice of Triton never hides the error
    with pytest.raises(RuntimeError, match="forced compile error"):
        backend.run("squash_score", lambda: failing_forward(v, 4), lambda: None, v.device)


@pytest.mark.parametrize("supported, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_amp_is_bf16_only_where_the_gpu_supports_it(monkeypatch, supported, expected):
    import contextlib
    import types
    import warnings

    from pnfs.engine.runtime import amp_dtype

    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: supported)
    cfg = types.SimpleNamespace(train=types.SimpleNamespace(amp="auto"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert amp_dtype(cfg, torch.device("cuda", 0)) is expected
    assert [str(w.message) for w in record] == ([] if supported else [
        "train.amp=auto: cuda:0 has no bfloat16; training in float32"
    ])  # fmt: skip
    assert amp_dtype(cfg, torch.device("cpu")) is None


def test_kernels_launch_under_the_tensors_cuda_device(monkeypatch):
    """``--device cuda:1`` must launch on GPU 1, not on the current device: the guard is entered first."""
    import contextlib

    backend = importlib.import_module("pnfs.kernels.backend")
    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(("enter", device))
        yield
        entered.append(("exit", device))

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.setenv("PNFS_KERNELS", "triton")
    cuda1 = torch.device("cuda", 1)
    assert backend.run("k", lambda: entered.append("launch") or 7, lambda: None, cuda1) == 7
    assert entered == [("enter", cuda1), "launch", ("exit", cuda1)]
    entered.clear()
    with backend.device_guard(torch.device("cpu")):
        pass
    assert entered == []
