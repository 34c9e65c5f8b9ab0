"""The GPU acceptance run's checks before any stage, in one Python start (bench/README.md, "GPU acceptance").

    python bench/acceptance_preflight.py --out preflight.json [--missing missing.txt]

* every module a stage needs imports (its version, or the error, goes to the JSON);
* the device: CUDA or not, its name and compute capability, torch/CUDA/triton versions;
* every script the run calls exists and its ``--help`` lists each flag the run passes;
* the config overrides the run passes load;
* with ``--site``, pnfs and pnfs.kernels import from that folder (the installed copy).

The shell script starts it the way ``python -m pytest`` starts (the working directory first on
``sys.path`` unless ``PYTHONSAFEPATH`` is set), so that it sees the pnfs the stages will see.

``--missing`` writes one line per module that does not import, plus ``cuda`` when no CUDA device
is visible: the shell script skips a stage whose needs are listed there. Exit code 2 (with one
``error:`` line per problem) when a script, flag or override is wrong: no stage would run right.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import json
import os
import platform
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What the stages import, beyond the standard library (pnfs.kernels is the one the editable
# install's package_dir used to provide).
MODULES = (
    "torch",
    "triton",
    "torchvision",
    "numpy",
    "yaml",
    "cv2",
    "simplejpeg",
    "pycocotools",
    "webdataset",
    "fvcore",
    "timm",
    "tensorboard",
    "tqdm",
    "matplotlib",
    "pytest",
    "pnfs",
    "pnfs.kernels",
    "pnfs.engine.trainer",
    "deepspeed",
    "nvidia.dali",
)

# script -> the flags the run passes to it
FLAGS = {
    "bench/kernel_check.py": ("--device", "--json"),
    "bench/kernels.py": ("--device", "--json", "--no-compiled", "--reps"),
    "bench/train_step.py": ("--config", "--batch", "--device", "--json", "--cases", "--steps", "--block"),
    "launch/demo.py": ("--seed", "--nproc", "--train", "--val", "--out", "--data"),
    "launch/train.py": ("--config", "--out", "--deepspeed"),
}

# (config, overrides) the run passes
CONFIGS = (
    ("mpii_mobilenetv2_p3_256", ("train.device=cuda",)),
    ("demo", ("train.device=cuda", "data.loader=torch", "train.epochs=1")),
    ("demo", ("train.device=cuda", "data.loader=gpu", "train.epochs=1", "train.max_steps_per_epoch=4")),
    ("demo", ("train.device=cuda", "data.loader=dali", "train.eval_every=0", "train.amp=bf16")),
)


def import_versions(modules: tuple[str, ...]) -> dict[str, dict]:
    """module -> {"ok": bool, "version" or "error"}; a module that fails never stops the others."""
    found = {}
    for name in modules:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # deepspeed prints on import
                module = importlib.import_module(name)
        except Exception as e:  # any failure to import is the finding
            found[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
            continue
        where = getattr(module, "__file__", None)
        found[name] = {"ok": True, "version": str(getattr(module, "__version__", "")), "file": where}
    return found


def site_problems(imports: dict[str, dict], site: Path) -> list[str]:
    """pnfs must come from the installed copy: a checkout's ``pnfs/`` (no ``kernels`` in it) found
    first on ``sys.path`` would be what the stages import."""
    problems = []
    for name in ("pnfs", "pnfs.kernels"):
        where = imports[name].get("file")
        if imports[name]["ok"] and not Path(where).resolve().is_relative_to(site.resolve()):
            problems.append(f"{name} imports from {where}, not from the installed copy under {site}")
    return problems


def device_info() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": os.environ.get("PNFS_COMMIT", "unknown"),
        "cpus": os.cpu_count(),
    }
    if info["cuda_available"]:
        info["device"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def help_text(script: Path) -> str:
    """What ``python SCRIPT --help`` prints, run in this process (no new Python start)."""
    argv, buf = sys.argv, io.StringIO()
    sys.argv = [str(script), "--help"]
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"exit code {e.code}: {buf.getvalue()[-500:]}") from None
    finally:
        sys.argv = argv
    return buf.getvalue()


def flag_problems(root: Path, flags: dict[str, tuple[str, ...]]) -> list[str]:
    problems = []
    for rel, wanted in flags.items():
        script = root / rel
        if not script.is_file():
            problems.append(f"{rel} does not exist")
            continue
        try:
            text = help_text(script)
        except Exception as e:  # a script that cannot print its help is the finding
            problems.append(f"'{rel} --help' failed: {type(e).__name__}: {e}")
            continue
        words = set(text.replace(",", " ").replace("[", " ").replace("]", " ").split())
        problems += [f"{rel} has no flag {flag}" for flag in wanted if flag not in words]
    return problems


def config_problems(configs) -> list[str]:
    from pnfs.config import load_config

    problems = []
    for name, overrides in configs:
        try:
            load_config(name, list(overrides))
        except Exception as e:  # a config error is the finding
            problems.append(f"config {name} with {' '.join(overrides)}: {e}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="write the findings here (JSON)")
    p.add_argument("--missing", type=Path, help="write the modules that do not import here, one a line")
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout whose scripts are checked")
    p.add_argument("--site", type=Path, help="pnfs and pnfs.kernels must import from this folder")
    args = p.parse_args(argv)
    imports = import_versions(MODULES)
    problems = flag_problems(args.root, FLAGS)
    if args.site:
        problems += site_problems(imports, args.site)
    info = device_info() if imports["torch"]["ok"] else {"cuda_available": False}
    if imports["pnfs"]["ok"]:
        problems += config_problems(CONFIGS)
    else:
        problems.append(f"pnfs does not import: {imports['pnfs']['error']}")
    missing = [name for name, found in imports.items() if not found["ok"]]
    if not info["cuda_available"]:
        missing.append("cuda")
    report = {"environment": info, "imports": imports, "missing": missing, "problems": problems}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    if args.missing:
        args.missing.write_text("".join(f"{m}\n" for m in missing))
    versions = " ".join(
        f"{n}={f['version'] or 'ok'}" if f["ok"] else f"{n}=MISSING" for n, f in imports.items()
    )
    print(f"imports: {versions}")
    device = info.get("device", "no CUDA device")
    print(f"device: {device}, torch {info.get('torch')}, CUDA {info.get('cuda_runtime')}")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
