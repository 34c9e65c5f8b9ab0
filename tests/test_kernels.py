"""The kernels' PyTorch references, dispatch and API (normal pass), and the Triton kernels on a GPU.

The Triton code on CPU is tested through the interpreter in ``test_kernels_interpret.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_cases import assert_decoded, decode_batch, vector_batch

from pnfs.kernels import (
    FVCORE_HANDLES,
    argmax_decode,
    argmax_decode_reference,
    argmax_decode_vectors,
    argmax_decode_vectors_reference,
    fvcore_handles,
    squash_mse_loss,
    squash_mse_loss_reference,
    squash_score,
    squash_score_reference,
    weighted_sum,
    weighted_sum_reference,
)

# ------------------------------------------------------------- references vs float64 gradcheck


@pytest.mark.parametrize("k, relu", [(1, False), (3, True), (12, False)])
def test_weighted_sum_reference_passes_gradcheck(k, relu):
    # offset away from 0 so the ReLU kink is not inside gradcheck's finite differences
    xs = [(torch.rand(2, 3, 4, 5, dtype=torch.float64) + 0.1).requires_grad_() for _ in range(k)]
    w = (torch.rand(k, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda w, *xs: weighted_sum_reference(xs, w, relu), (w, *xs))


@pytest.mark.parametrize("d", [1, 3, 8])
def test_squash_score_reference_passes_gradcheck(d):
    v = torch.randn(2, 2 * d, 3, 4, dtype=torch.float64)
    v[0, :d, 1, 2] = 0.0  # the gradient at v = 0 is part of the check
    v.requires_grad_()
    assert torch.autograd.gradcheck(lambda v: squash_score_reference(v, d), (v,))


def test_squash_mse_loss_reference_passes_gradcheck():
    v = torch.randn(2, 3 * 4, 3, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.rand(2, 3, 3, 5, dtype=torch.float64)
    weights = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: squash_mse_loss_reference(v, 4, targets, weights), (v,))


def test_squash_gradient_is_exactly_zero_at_zero_vectors():
    v = torch.zeros(1, 2 * 8, 3, 3, requires_grad=True)
    squash_score_reference(v, 8).sum().backward()
    assert torch.equal(v.grad, torch.zeros_like(v))
    assert torch.equal(squash_score_reference(v.detach(), 8), torch.zeros(1, 2, 3, 3))


def test_squash_mse_loss_is_the_training_loss_on_squashed_scores():
    from pnfs.loss import pose_loss

    v = torch.randn(3, 17 * 4, 6, 5)
    targets = torch.rand(3, 17, 6, 5)
    weights = (torch.rand(3, 17) > 0.3).float()
    expected = pose_loss(squash_score_reference(v, 4), targets, weights)
    torch.testing.assert_close(squash_mse_loss_reference(v, 4, targets, weights), expected)


# ----------------------------------------------------------------------------- decoding semantics


def test_reference_decoding_of_hand_built_maps():
    maps, expected_xy, peak = decode_batch()
    assert_decoded(*argmax_decode_reference(maps), expected_xy, peak)
    assert_decoded(*argmax_decode_reference(maps.to(memory_format=torch.channels_last)), expected_xy, peak)


def test_reference_decoding_straight_from_vectors():
    vectors, expected_xy, peak = vector_batch(d=3)
    assert_decoded(*argmax_decode_vectors_reference(vectors, 3), expected_xy, peak)


def test_vector_decoding_equals_decoding_the_squashed_scores():
    v = torch.randn(4, 17 * 8, 12, 9, dtype=torch.float64)  # float64: no ties from rounding
    coords, maxvals = argmax_decode_vectors_reference(v, 8)
    expected_coords, expected_maxvals = argmax_decode_reference(squash_score_reference(v, 8))
    torch.testing.assert_close(coords, expected_coords, rtol=0, atol=0)
    torch.testing.assert_close(maxvals, expected_maxvals)


# ----------------------------------------------------------------------------- dispatch and API


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
    torch.testing.assert_close(argmax_decode_vectors(v, 4), argmax_decode_vectors_reference(v, 4))


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
            lambda: weighted_sum([torch.zeros(2), torch.zeros(2, dtype=torch.float64)], torch.ones(2)),
            "input 1 is torch.float64",
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
        (lambda: argmax_decode_vectors(torch.zeros(1, 5, 2, 2), 2), "5 channels are not a multiple of d=2"),
    ],
)
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_custom_ops_are_registered():
    for name in ("weighted_sum", "weighted_sum_backward", "squash_score", "squash_score_backward"):
        assert hasattr(torch.ops.pnfs, name)
    for name in ("squash_mse_loss", "argmax_decode", "argmax_decode_vectors"):
        assert hasattr(torch.ops.pnfs, name)
        assert f"pnfs::{name}" in FVCORE_HANDLES


def test_compiled_reference_path_has_no_graph_break(monkeypatch):
    monkeypatch.setenv("PNFS_KERNELS", "torch")

    def step(xs, w, v, t, wt):
        loss = squash_mse_loss(v * weighted_sum(xs, w, relu=True).mean(), 2, t, wt)
        return loss + argmax_decode_vectors(v, 2)[1].sum()

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


# ------------------------------------------------------------- bench/kernels.py

BENCH = Path(__file__).resolve().parents[1] / "bench" / "kernels.py"


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
        "weighted_sum", "squash_score", "squash_mse_loss", "argmax_decode", "argmax_decode_vectors",
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
        "argmax_decode_vectors",
    }
    for case in report["cases"]:
        assert set(case["median_ms"]) == {"eager", "compiled"}
        assert all(ms > 0 for ms in case["median_ms"].values())
        assert case["speedup_vs_eager"] > 0 and case["bytes"] > 0 and case["gbps"]["compiled"] > 0
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("#")]
    assert len(lines) == len(report["cases"])  # one line per case


# ------------------------------------------------------------- Triton on a GPU (skipped without CUDA)

GPU_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k, relu, channels_last", [(3, True, True), (8, False, False), (12, False, True)])
def test_weighted_sum_on_gpu_matches_reference(monkeypatch, dtype, k, relu, channels_last):
    monkeypatch.setenv("PNFS_KERNELS", "triton")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [
        torch.randn(32, 40, 64, 48, device="cuda").to(dtype, memory_format=fmt).requires_grad_()
        for _ in range(k)
    ]
    w = torch.randn(k, device="cuda", requires_grad=True)
    out = weighted_sum(xs, w, relu)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [*xs, w], g)
    xs64 = [x.detach().double().requires_grad_() for x in xs]
    w64 = w.detach().double().requires_grad_()
    ref = weighted_sum_reference(xs64, w64, relu)
    ref_grads = torch.autograd.grad(ref, [*xs64, w64], g.double())
    torch.testing.assert_close(out.double(), ref, **GPU_TOL[dtype])
    for got, want in zip(grads[:-1], ref_grads[:-1]):
        torch.testing.assert_close(got.double(), want, **GPU_TOL[dtype])
    torch.testing.assert_close(grads[-1].double(), ref_grads[-1], rtol=1e-4, atol=1e-3)
    again = torch.autograd.grad(weighted_sum(xs, w, relu), [w], g)[0]
    assert torch.equal(again, grads[-1]), "dw must be bitwise reproducible"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_squash_and_loss_on_gpu_match_reference(monkeypatch, dtype):
    monkeypatch.setenv("PNFS_KERNELS", "triton")
    v = torch.randn(32, 17 * 8, 96, 72, device="cuda").to(dtype).requires_grad_()
    s = squash_score(v, 8)
    g = torch.randn_like(s)
    (dv,) = torch.autograd.grad(s, v, g)
    v64 = v.detach().double().requires_grad_()
    ref = squash_score_reference(v64, 8)
    (ref_dv,) = torch.autograd.grad(ref, v64, g.double())
    torch.testing.assert_close(s.double(), ref, **GPU_TOL[dtype])
    torch.testing.assert_close(dv.double(), ref_dv, **GPU_TOL[dtype])
    t = torch.rand(32, 17, 96, 72, device="cuda")
    wt = (torch.rand(32, 17, device="cuda") > 0.2).float()
    loss = squash_mse_loss(v, 8, t, wt)
    (dv,) = torch.autograd.grad(loss, v)
    ref_loss = squash_mse_loss_reference(v64, 8, t, wt)
    (ref_dv,) = torch.autograd.grad(ref_loss, v64)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dv.double(), ref_dv, rtol=GPU_TOL[dtype]["rtol"], atol=1e-9)


@pytest.mark.gpu
def test_weighted_sum_weight_gradient_is_bitwise_reproducible_on_gpu(monkeypatch):
    """Programs run concurrently on a GPU: the two-pass dw reduction must give the same bits every run
    (the interpreter runs programs one after another, so only CUDA can show this)."""
    monkeypatch.setenv("PNFS_KERNELS", "triton")
    xs = [torch.randn(4, 40, 64, 48, device="cuda", requires_grad=True) for _ in range(3)]
    w = torch.rand(3, device="cuda", requires_grad=True)
    g = torch.randn(4, 40, 64, 48, device="cuda")
    runs = [torch.autograd.grad(weighted_sum(xs, w, relu=True), w, g)[0] for _ in range(5)]
    loss = [
        squash_mse_loss(xs[0][:, :34], 2, xs[1][:, :17].detach().sigmoid(), w.new_ones(4, 17))
        for _ in range(5)
    ]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert all(torch.equal(loss[0], x) for x in loss[1:])


@pytest.mark.gpu
def test_argmax_decode_on_gpu_matches_reference(monkeypatch):
    monkeypatch.setenv("PNFS_KERNELS", "triton")
    maps, expected_xy, peak = decode_batch()
    assert_decoded(*(t.cpu() for t in argmax_decode(maps.cuda())), expected_xy, peak)
    vectors, expected_xy, peak = vector_batch()
    assert_decoded(*(t.cpu() for t in argmax_decode_vectors(vectors.cuda(), 3)), expected_xy, peak)
    s = torch.rand(32, 17, 96, 72, device="cuda")
    torch.testing.assert_close(argmax_decode(s), argmax_decode_reference(s), rtol=0, atol=0)
    v = torch.randn(32, 17 * 8, 96, 72, device="cuda")
    coords, maxvals = argmax_decode_vectors(v, 8)
    ref_coords, ref_maxvals = argmax_decode_vectors_reference(v, 8)
    torch.testing.assert_close(coords, ref_coords, rtol=0, atol=0)
    torch.testing.assert_close(maxvals, ref_maxvals)


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


# ------------------------------------------------------------- auto: capability gating, fallback, amp


class _FakeCudaTensor:
    device = torch.device("cuda", 0)


@pytest.mark.parametrize(
    "capability, expected", [((6, 1), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)]
)
def test_auto_uses_triton_only_from_sm_80(monkeypatch, capability, expected):
    backend = importlib.import_module("pnfs.kernels.backend")
    monkeypatch.setenv("PNFS_KERNELS", "auto")
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert backend.use_triton(_FakeCudaTensor()) is expected


def test_auto_falls_back_to_the_reference_once_with_one_warning_when_a_kernel_fails(monkeypatch):
    """A kernel that cannot compile (here: launched on CPU tensors without the interpreter) is
    reported once, naming the kernel and the error; later calls use the reference silently."""
    backend = importlib.import_module("pnfs.kernels.backend")
    squash_module = importlib.import_module("pnfs.kernels.squash")
    monkeypatch.setenv("PNFS_KERNELS", "auto")
    monkeypatch.setattr(backend, "_FAILED", set())
    monkeypatch.setattr(squash_module, "use_triton", lambda tensor: True)
    launches = []

    def failing_forward(vectors, d):
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
