"""Ahead-of-time compilation of every Triton kernel for a GPU that is not here (sm_80, sm_90).

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs Triton's whole
pipeline (TTIR -> TTGIR -> LLVM IR -> PTX) and the ``ptxas`` shipped in the triton wheel turns
the PTX into a cubin; ``cuobjdump --dump-resource-usage`` (also in the wheel) reads its
registers, stack and local memory (spills) back. No GPU and no CUDA driver are needed.

:data:`SPECIALISATIONS` lists the constexpr specialisations the presets and the train/eval
paths launch (``vector_dim`` 4 and 8, K of the input node and of hidden nodes with H <= 2 over
four or six ops, chunk remainders, the FLAT (NCHW) and strided paths of squash and decoding,
fp32 and bf16 tensors). Pointers are compiled as 16-byte aligned, as ``torch`` allocates them,
and the flat sizes (and, on FLAT paths, the batch and channel strides, multiples of H*W) as
multiples of 16, as Triton's launcher specialises them at run time for the presets' shapes.
Also the default training layout and bf16 autocast: channels_last vectors with NCHW targets
(``FLAT=0, MAP_FLAT=1`` in the squash-MSE kernel), the input node's weighted sum with one fp32
input among bf16 ones (``fp32_inputs``), and sizes that are not multiples of 16 (``aligned``
False: no divisibility hints, masked tails) for the weighted sum, the loss and bf16 decoding.

Used by the ``aot``-marked tests (``tests/kernels/test_<name>.py``, ``tests/kernels/test_aot.py``:
compiles, no spills, shared memory within the device's limit, vectorised dense loads, no atomics)
and ``bench/kernels.py --aot`` (the resource report).
"""

from __future__ import annotations

import functools
import importlib
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# the modules (``pnfs.kernels.weighted_sum`` etc. are also the names of the public functions)
_reduce = importlib.import_module("pnfs.kernels._reduce")
argmax_decode = importlib.import_module("pnfs.kernels.argmax_decode")
squash = importlib.import_module("pnfs.kernels.squash")
weighted_sum = importlib.import_module("pnfs.kernels.weighted_sum")


@dataclass(frozen=True)
class Device:
    """The per-SM limits that bound occupancy (CUDA C Programming Guide, compute capabilities)."""

    name: str
    arch: int
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    smem_per_block: int = 227 * 1024


H100 = Device("H100", 90)
A100 = Device("A100", 80, smem_per_sm=164 * 1024, smem_per_block=163 * 1024)
DEVICES = (H100, A100)

_DTYPE = {"fp32": "*fp32", "bf16": "*bf16"}
# pointers that are always fp32: partial sums, softmaxed weights, loss weights, targets, outputs of decoding
_FP32_POINTERS = {"partial_ptr", "w_ptr", "t_ptr", "coords_ptr", "maxval_ptr", "out_ptr@_sum_rows_kernel"}
_FLOAT_ARGS = {"scale"}
_SIZE_ARGS = {"numel", "HW", "ncols"}  # flat sizes: multiples of 16 at the presets' shapes
# batch and channel strides of NCHW maps (squash, argmax_decode): multiples of H*W, so of 16 at the
# presets' shapes, which Triton's launcher specialises at run time; only the FLAT paths rely on it
_PLANE_STRIDES = re.compile(r"[vsgdt]?s[NC]")


@dataclass(frozen=True)
class Spec:
    """One kernel at one constexpr specialisation and pointer dtype."""

    kernel: str  # the JIT function's name in ``module``
    module: str  # "squash", "weighted_sum", "argmax_decode", "_reduce"
    constexprs: tuple[tuple[str, int | bool], ...]
    dtype: str = "fp32"  # of the data pointers
    num_warps: int = 4
    dense: bool = field(default=False)  # a path whose global loads must be vectorised
    aligned: bool = True  # sizes (and FLAT plane strides) multiples of 16; else masked tails
    fp32_inputs: tuple[str, ...] = ()  # data pointers that are fp32 whatever ``dtype`` says

    @property
    def variant(self) -> str:
        """The dtype, then "/unaligned" and "/<pointer>:fp32" where they apply: "bf16/x2:fp32"."""
        extras = ("" if self.aligned else "/unaligned") + "".join(f"/{p}:fp32" for p in self.fp32_inputs)
        return f"{self.dtype}{extras}"

    @property
    def label(self) -> str:
        consts = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs)
        return f"{self.kernel}[{consts}]/{self.variant}"

    @property
    def fn(self):
        return getattr(_MODULES[self.module], self.kernel)


_MODULES = {
    "squash": squash,
    "weighted_sum": weighted_sum,
    "argmax_decode": argmax_decode,
    "_reduce": _reduce,
}


def _specialisations() -> list[Spec]:
    specs: list[Spec] = []
    for dtype in ("fp32", "bf16"):
        for d in (4, 8):
            for flat in (True, False):  # NCHW (the model's head) and channels_last
                block = squash.BLOCK_P_COMPILED if flat else squash.STRIDED_BLOCK_P_COMPILED
                common = (("D", d), ("BLOCK_D", squash._block_d(d)), ("BLOCK_P", block))
                layout = (("FLAT", flat), ("MAP_FLAT", flat))
                kwargs = dict(dtype=dtype, num_warps=squash.NUM_WARPS, dense=flat)
                specs.append(Spec("_squash_fwd_kernel", "squash", (*common, *layout), **kwargs))
                specs.append(Spec("_squash_bwd_kernel", "squash", (*common, *layout), **kwargs))
                for grad in (True, False):
                    consts: tuple[tuple[str, int | bool], ...] = (*common, ("COMPUTE_GRAD", grad), *layout)
                    specs.append(Spec("_squash_mse_kernel", "squash", consts, **kwargs))
        # input node: K=3 with ReLU; hidden nodes: K = edges x non-zero ops (3 or 5) for H <= 2,
        # and 12 (a full chunk) / 3 (the remainder of 15 terms)
        for k, relu in ((3, True), (3, False), (5, False), (6, False), (10, False), (12, False)):
            for dense in (True, False):
                base = (("K", k), ("RELU", relu))
                block = weighted_sum.BLOCK_COMPILED if dense else weighted_sum.STRIDED_BLOCK_COMPILED
                tail = (("DENSE", dense), ("BLOCK", block))
                specs.append(
                    Spec("_weighted_sum_fwd_kernel", "weighted_sum", (*base, *tail), dtype, dense=dense)
                )
                specs.append(
                    Spec(
                        "_weighted_sum_bwd_kernel",
                        "weighted_sum",
                        (*base, ("NEED_DW", True), *tail),
                        dtype,
                        dense=dense,
                    )
                )
        for flat in (True, False):
            block = argmax_decode.block_p(64 * 64)
            consts = (("FLAT", flat), ("BLOCK_P", block), ("NO_INDEX", argmax_decode._NO_INDEX))
            specs.append(Spec("_argmax_decode_kernel", "argmax_decode", consts, dtype, dense=flat))
    specs.append(Spec("_sum_rows_kernel", "_reduce", (("BLOCK", _reduce.BLOCK),), "fp32", dense=True))
    return specs + _training_layout_specialisations()


def _training_layout_specialisations() -> list[Spec]:
    """bf16 autocast in the default training layout, and sizes with masked tails."""
    specs: list[Spec] = []
    # channels_last vectors (strided) with NCHW targets (flat): the fused loss as training runs it
    for dtype, d, aligned in (("bf16", 8, True), ("fp32", 8, True), ("bf16", 4, True), ("bf16", 4, False)):
        consts: tuple[tuple[str, int | bool], ...] = (
            ("D", d), ("BLOCK_D", squash._block_d(d)), ("BLOCK_P", squash.STRIDED_BLOCK_P_COMPILED),
            ("COMPUTE_GRAD", True), ("FLAT", False), ("MAP_FLAT", True),
        )  # fmt: skip
        specs.append(Spec("_squash_mse_kernel", "squash", consts, dtype, squash.NUM_WARPS, aligned=aligned))
    # the input node under CUDA autocast: finer and same bf16, the up-sampled coarser input fp32
    base = (("K", 3), ("RELU", True))
    tail = (("DENSE", True), ("BLOCK", weighted_sum.BLOCK_COMPILED))
    fwd, bwd = "_weighted_sum_fwd_kernel", "_weighted_sum_bwd_kernel"
    specs.append(Spec(fwd, "weighted_sum", (*base, *tail), "bf16", dense=True, fp32_inputs=("x2",)))
    specs.append(
        Spec(
            bwd,
            "weighted_sum",
            (*base, ("NEED_DW", True), *tail),
            "bf16",
            dense=True,
            fp32_inputs=("x2", "dx2"),
        )
    )
    # numel not a multiple of 16: the masked tail of the dense path
    specs.append(Spec(fwd, "weighted_sum", (*base, *tail), "bf16", aligned=False))
    specs.append(Spec(bwd, "weighted_sum", (*base, ("NEED_DW", True), *tail), "bf16", aligned=False))
    # bf16 score maps of odd sizes (e.g. 17 x 13)
    consts = (
        ("FLAT", True),
        ("BLOCK_P", argmax_decode.block_p(17 * 13)),
        ("NO_INDEX", argmax_decode._NO_INDEX),
    )
    specs.append(Spec("_argmax_decode_kernel", "argmax_decode", consts, "bf16", aligned=False))
    return specs


SPECIALISATIONS: list[Spec] = _specialisations()


def toolchain_missing() -> str | None:
    """Why the AOT compile cannot run here (no triton, no ptxas/cuobjdump in its wheel), or None."""
    try:
        import triton  # noqa: F401
    except Exception as error:
        return f"triton does not import: {error}"
    for tool in ("ptxas", "cuobjdump"):
        if _tool(tool) is None:
            return f"{tool} not found in the triton wheel or on PATH"
    return None


def _tool(name: str) -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def _required_tool(name: str) -> str:
    """The path of the CUDA tool ``name`` (see :func:`toolchain_missing`)."""
    path = _tool(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found in the triton wheel or on PATH")
    return path


def _signature(fn, spec: Spec) -> tuple[dict[str, str], dict]:
    consts = dict(spec.constexprs)
    signature, attrs = {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("ptr") or re.fullmatch(r"d?x\d+", name):
            fp32 = (
                name in _FP32_POINTERS
                or f"{name}@{spec.kernel}" in _FP32_POINTERS
                or name in spec.fp32_inputs
            )
            signature[name] = "*fp32" if fp32 else _DTYPE[spec.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            hinted = name in _SIZE_ARGS or (spec.dense and _PLANE_STRIDES.fullmatch(name))
            if spec.aligned and hinted:
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = set(consts) - set(signature)
    if missing:
        raise ValueError(f"{spec.label}: no such constexpr {sorted(missing)}")
    unknown = set(spec.fp32_inputs) - set(signature)
    if unknown:
        raise ValueError(f"{spec.label}: no such pointer {sorted(unknown)}")
    return signature, attrs


@dataclass(frozen=True)
class Compiled:
    spec: Spec
    arch: int
    ptx: str
    ttgir: str
    registers: int
    stack: int
    local: int
    shared: int  # bytes of shared memory the launch requests

    def load_widths(self) -> set[int]:
        """Vector widths (1, 2, 4, ...) of the ``ld.global`` instructions in the PTX."""
        return _widths(self.ptx, "ld.global")

    def store_widths(self) -> set[int]:
        return _widths(self.ptx, "st.global")

    def atomics(self) -> list[str]:
        return [line.strip() for line in self.ptx.splitlines() if re.search(r"\b(atom|red)\.", line)]

    def occupancy(self, device: Device) -> float:
        """Resident warps / the SM's maximum, from registers, shared memory and the block limit."""
        warps = self.spec.num_warps
        regs_per_warp = -(-max(self.registers, 1) * 32 // 256) * 256  # allocated in units of 256
        blocks = min(device.max_blocks_per_sm, device.max_warps_per_sm // warps)
        blocks = min(blocks, device.regs_per_sm // (regs_per_warp * warps))
        if self.shared:
            blocks = min(blocks, device.smem_per_sm // self.shared)
        return blocks * warps / device.max_warps_per_sm


def _widths(ptx: str, op: str) -> set[int]:
    widths = set()
    for line in ptx.splitlines():
        match = re.search(rf"\b{re.escape(op)}(?:\.[a-z0-9_]+)*", line)
        if match:
            vector = re.search(r"\.v(\d+)\b", match.group(0))
            widths.add(int(vector.group(1)) if vector else 1)
    return widths


@functools.cache
def compile_spec(spec: Spec, arch: int) -> Compiled:
    """Compile ``spec`` for sm_``arch`` to a cubin and read its resources (cached per process)."""
    return compile_kernel(spec.fn, spec, arch)


def compile_kernel(fn, spec: Spec, arch: int) -> Compiled:
    """Compile the JIT function ``fn`` at ``spec``'s constexprs and dtype for sm_``arch``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = _signature(fn, spec)
    source = ASTSource(fn=fn, signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps})
    usage = _resource_usage(kernel.asm["cubin"], fn.__name__)
    return Compiled(
        spec, arch, kernel.asm["ptx"], kernel.asm["ttgir"], usage["REG"], usage["STACK"], usage["LOCAL"],
        int(kernel.metadata.shared),
    )  # fmt: skip


def _resource_usage(cubin: bytes, kernel: str) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{kernel}.cubin"
        path.write_bytes(cubin)
        text = subprocess.run(
            [_required_tool("cuobjdump"), "--dump-resource-usage", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    match = re.search(rf"Function {re.escape(kernel)}:\s*\n\s*(.*)", text)
    if not match:
        raise RuntimeError(f"cuobjdump printed no resource line for {kernel}:\n{text}")
    return {key: int(value) for key, value in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", match.group(1))}
