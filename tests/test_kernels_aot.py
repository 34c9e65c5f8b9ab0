"""Every Triton kernel compiled ahead of time for A100 (sm_80) and H100 (sm_90), on this CPU.

Triton's pipeline down to PTX, the wheel's ``ptxas`` to a cubin and ``cuobjdump`` for its
resources (see ``pnfs/kernels/aot.py``), at every specialisation the presets and the
train/eval paths launch. Shown here, without a GPU: each kernel compiles for both targets, uses
no local memory (no register spills), fits the device's shared memory, vectorises the global
loads of its dense paths, and contains no atomic operation (the reductions are two-pass and
deterministic: weight gradients and losses give the same bits every run).

The ids name the kernel (``-k squash`` selects the squash kernels' AOT, interpreter and GPU cases).
Compiled kernels are cached per process; Triton's own disk cache serves later runs.
"""

from __future__ import annotations

import os

import pytest

from pnfs.kernels import aot

pytestmark = [
    pytest.mark.skipif(bool(aot.toolchain_missing()), reason=str(aot.toolchain_missing())),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for a GPU: not in the interpreter pass"
    ),
]

CASES = [
    pytest.param(spec, device, id=f"{spec.label}-{device.name}")
    for spec in aot.SPECIALISATIONS
    for device in aot.DEVICES
]


@pytest.mark.parametrize("spec, device", CASES)
def test_kernel_compiles_without_spills_within_shared_memory(spec, device):
    compiled = aot.compile_spec(spec, device.arch)
    assert compiled.local == 0 and compiled.stack == 0, (
        f"{spec.label}: spills to local memory on {device.name}"
    )
    assert 0 < compiled.registers <= 255
    assert compiled.shared <= device.smem_per_block, f"{spec.label}: {compiled.shared} B of shared memory"
    assert compiled.occupancy(device) > 0, f"{spec.label} cannot be resident on {device.name}"


@pytest.mark.parametrize("spec, device", CASES)
def test_kernel_has_no_atomic_operations(spec, device):
    """The weight-gradient and loss reductions are per-program partials plus a fixed-order second pass."""
    compiled = aot.compile_spec(spec, device.arch)
    assert compiled.atomics() == []
    assert "atomic" not in compiled.ttgir


@pytest.mark.parametrize("spec, device", [case for case in CASES if case.values[0].dense])
def test_dense_paths_vectorise_their_global_loads(spec, device):
    compiled = aot.compile_spec(spec, device.arch)
    assert max(compiled.load_widths()) >= 2, f"{spec.label}: scalar loads only on {device.name}"


def test_the_specialisations_cover_every_kernel():
    """A new @triton.jit kernel in pnfs/kernels must be added to SPECIALISATIONS."""
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
