"""Ahead-of-time compilation for A100 (sm_80) and H100 (sm_90), on this CPU: the shared parts.

Triton's pipeline down to PTX, the wheel's ``ptxas`` to a cubin and ``cuobjdump`` for its
resources (see ``kernels/aot.py``), at every specialisation the presets and the
train/eval paths launch. Shown here, without a GPU: each kernel compiles for both targets, uses
no local memory (no register spills), fits the device's shared memory, vectorises the global
loads of its dense paths, and contains no atomic operation (the reductions are two-pass and
deterministic: weight gradients and losses give the same bits every run).

Each kernel's AOT cases sit with its other cases in ``kernels/test_<name>.py`` (marker ``aot``;
``-m aot`` selects them all); here: the shared two-pass row sum (``_reduce``), that the
specialisations cover every kernel, and that the atomics check can fail. Compiled kernels are
cached per process; Triton's own disk cache serves later runs.
"""

from __future__ import annotations

import os

import pytest

from pnfs.kernels import aot
from tests.support.kernel_cases import (
    aot_cases,
    assert_compiles_without_spills_within_shared_memory,
    assert_no_atomic_operations,
    assert_vectorised_global_loads,
)

pytestmark = [
    pytest.mark.skipif(bool(aot.toolchain_missing()), reason=str(aot.toolchain_missing())),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for a GPU: not in the interpreter pass"
    ),
]


@pytest.mark.aot
@pytest.mark.parametrize("spec, device", aot_cases("_reduce"))
def test_aot_compiles_without_spills_within_shared_memory(spec, device):
    assert_compiles_without_spills_within_shared_memory(spec, device)


@pytest.mark.aot
@pytest.mark.parametrize("spec, device", aot_cases("_reduce"))
def test_aot_has_no_atomic_operations(spec, device):
    assert_no_atomic_operations(spec, device)


@pytest.mark.aot
@pytest.mark.parametrize("spec, device", aot_cases("_reduce", dense_only=True))
def test_aot_dense_paths_vectorise_their_global_loads(spec, device):
    assert_vectorised_global_loads(spec, device)


@pytest.mark.aot
def test_the_specialisations_cover_every_kernel():
    """A new @triton.jit kernel in kernels/ (pnfs.kernels) must be added to SPECIALISATIONS."""
    import importlib
    import inspect

    from triton.runtime.jit import JITFunction

    launched = set()
    for name in ("squash", "weighted_sum", "argmax_decode", "_reduce"):
        module = importlib.import_module(f"pnfs.kernels.{name}")
        for attr, value in inspect.getmembers(module):
            if isinstance(value, JITFunction) and attr.endswith("_kernel"):
                launched.add(attr)
    assert launched == {spec.kernel for spec in aot.SPECIALISATIONS}


@pytest.mark.aot
def test_an_atomic_add_is_caught():
    """The atomics check can fail: a kernel reducing with tl.atomic_add is seen in PTX and TTGIR."""
    import triton
    import triton.language as tl

    @triton.jit
    def _atomic_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
        tl.atomic_add(out_ptr, tl.sum(tl.load(x_ptr + tl.arange(0, BLOCK)), axis=0))

    compiled = aot.compile_kernel(
        _atomic_kernel, aot.Spec("_atomic_kernel", "_reduce", (("BLOCK", 256),)), 90
    )
    assert compiled.atomics() and "atomic" in compiled.ttgir


@pytest.mark.aot
def test_the_specialisations_cover_the_default_training_layout_under_bf16():
    """channels_last vectors with NCHW targets in the fused loss, the input node's fp32 up-sampled
    input among bf16 ones, masked tails of sizes that are not multiples of 16, bf16 decoding."""
    specs = aot.SPECIALISATIONS

    def has(kernel: str, dtype: str, aligned: bool = True, fp32_inputs: tuple = (), **consts) -> bool:
        return any(
            s.kernel == kernel
            and s.dtype == dtype
            and s.aligned == aligned
            and s.fp32_inputs == fp32_inputs
            and consts.items() <= dict(s.constexprs).items()
            for s in specs
        )

    for dtype in ("bf16", "fp32"):
        assert has("_squash_mse_kernel", dtype, FLAT=False, MAP_FLAT=True, COMPUTE_GRAD=True)
    assert has("_squash_mse_kernel", "bf16", aligned=False, FLAT=False, MAP_FLAT=True)
    assert has("_weighted_sum_fwd_kernel", "bf16", fp32_inputs=("x2",), K=3, RELU=True)
    assert has("_weighted_sum_bwd_kernel", "bf16", fp32_inputs=("x2", "dx2"), K=3, NEED_DW=True)
    assert has("_weighted_sum_fwd_kernel", "bf16", aligned=False, DENSE=True)
    assert has("_weighted_sum_bwd_kernel", "bf16", aligned=False, DENSE=True)
    assert has("_argmax_decode_kernel", "bf16", aligned=False)


@pytest.mark.aot
def test_a_mixed_dtype_specialisation_compiles_its_fp32_pointers_as_fp32():
    spec = next(s for s in aot.SPECIALISATIONS if s.fp32_inputs == ("x2", "dx2"))
    signature, _ = aot._signature(spec.fn, spec)
    assert signature["x2"] == signature["dx2"] == "*fp32"
    assert signature["x0"] == signature["dx0"] == signature["g_ptr"] == signature["out_ptr"] == "*bf16"
