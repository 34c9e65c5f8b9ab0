"""Resource report of every Triton kernel compiled ahead of time for A100 (sm_80) and H100 (sm_90).

    python bench/kernels_aot.py [--json FILE]      (also: python bench/kernels.py --aot)
    python bench/kernels_aot.py --markdown FILE    (the bench/README.md table of a saved report)

No GPU needed: each specialisation of ``kernels/aot.py`` (the ones the presets and the
train/eval paths launch) is compiled with Triton down to a cubin (the ``ptxas`` in the triton
wheel) and ``cuobjdump`` reads its resources. One line per kernel, specialisation and device:
registers per thread, stack and local memory (spills), shared memory per block, the vector widths
of its global loads and stores in the PTX (1 = scalar, 4 = 128-bit for fp32), and the occupancy
(resident warps / 64) that registers, shared memory and the 32-block limit imply at
``num_warps`` warps per block.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _widths(widths: set[int]) -> str:
    return "/".join(str(w) for w in sorted(widths)) or "-"


def report() -> dict:
    import triton

    from pnfs.kernels import aot

    missing = aot.toolchain_missing()
    if missing:
        raise SystemExit(f"kernels_aot: {missing}")
    rows = []
    print(
        f"# triton {triton.__version__}; registers/thread, spills (local B), smem B, "
        "ld/st vector widths, occupancy"
    )
    for spec in aot.SPECIALISATIONS:
        for device in aot.DEVICES:
            c = aot.compile_spec(spec, device.arch)
            row = {
                "kernel": spec.kernel,
                "specialisation": dict(spec.constexprs),
                "dtype": spec.variant,  # "bf16", or e.g. "bf16/unaligned"
                "device": device.name,
                "target": f"sm_{device.arch}",
                "num_warps": spec.num_warps,
                "registers": c.registers,
                "stack_bytes": c.stack,
                "local_bytes": c.local,
                "shared_bytes": c.shared,
                "load_widths": sorted(c.load_widths()),
                "store_widths": sorted(c.store_widths()),
                "atomics": len(c.atomics()),
                "occupancy": round(c.occupancy(device), 3),
            }
            rows.append(row)
            print(
                f"{spec.label:<72} {device.name:<5} regs {c.registers:>3}  spills {c.local:>3}  "
                f"smem {c.shared:>6}  ld {_widths(c.load_widths()):<5} st {_widths(c.store_widths()):<5} "
                f"occupancy {row['occupancy']:.2f}",
                flush=True,
            )
    return {
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "devices": {d.name: f"sm_{d.arch}" for d in aot.DEVICES},
        "cases": rows,
    }


def _pair(a, b) -> str:
    return f"{a}/{b}"


def markdown(report: dict) -> str:
    """One table row per kernel, specialisation and dtype: H100/A100 side by side (smem and the
    H100 load/store widths once when both targets agree). ``NO_INDEX`` (a constant) is left out."""
    rows: dict[tuple, dict[str, dict]] = {}
    for case in report["cases"]:
        consts = {k: v for k, v in case["specialisation"].items() if k != "NO_INDEX"}
        key = (case["kernel"], ",".join(f"{k}={int(v)}" for k, v in consts.items()), case["dtype"])
        rows.setdefault(key, {})[case["device"]] = case
    lines = [
        "| kernel | specialisation | dtype | regs H100/A100 | spills | smem B | ld / st width "
        "| occupancy H100/A100 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (kernel, consts, dtype), by_device in rows.items():
        h, a = by_device["H100"], by_device["A100"]
        spills = _pair(h["local_bytes"] + h["stack_bytes"], a["local_bytes"] + a["stack_bytes"])
        smem = (
            str(h["shared_bytes"])
            if h["shared_bytes"] == a["shared_bytes"]
            else _pair(h["shared_bytes"], a["shared_bytes"])
        )
        widths = f"{_widths(set(h['load_widths']))} / {_widths(set(h['store_widths']))}"
        lines.append(
            f"| `{kernel}` | {consts} | {dtype} | {_pair(h['registers'], a['registers'])} | {spills} "
            f"| {smem} | {widths} | {h['occupancy']:.2f}/{a['occupancy']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--markdown", type=Path, help="print the table of this saved report; compile nothing")
    args = parser.parse_args(argv)
    if args.markdown:
        saved = json.loads(args.markdown.read_text())
        print(markdown(saved))
        return saved
    result = report()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
