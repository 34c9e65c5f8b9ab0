"""bench/gpu_acceptance.sh on a CPU: --dry-run lists the stages and checks the scripts, flags and
config overrides it would use; a renamed flag or a missing script stops it before any GPU time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_acceptance.sh"
STAGES = ["tests", "kernels", "train_step", "demo_torch", "demo_gpu", "demo_dali", "train_step_compiled"]


def _run(script: Path, *args: str, out: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=120)


def test_dry_run_lists_every_stage_with_its_command_and_writes_nothing(tmp_path):
    proc = _run(SCRIPT, "--dry-run", out=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith("[dry-run]")}
    assert list(lines) == STAGES
    assert r"-m gpu\ and\ not\ interpret\ and\ not\ slow" in lines["tests"]
    assert "bench/kernels.py --device cuda --json" in lines["kernels"]
    for name in ("train_step", "train_step_compiled"):
        step = lines[name]
        assert (
            "--config mpii_mobilenetv2_p3_256 --batch 32 --device cuda" in step and "train.amp=bf16" in step
        )
    assert "--no-compile" in lines["train_step"] and "--no-compile" not in lines["train_step_compiled"]
    for loader in ("torch", "gpu", "dali"):
        demo = lines[f"demo_{loader}"]
        assert "launch/demo.py" in demo and "--nproc 1" in demo
        assert f"train.device=cuda data.loader={loader} train.epochs=2" in demo
    assert "nvidia.dali" in lines["demo_dali"]  # skipped with a line when DALI does not import
    assert str(tmp_path / "gpu-acceptance") in proc.stdout
    assert not any(tmp_path.iterdir())


def _fake_checkout(tmp_path: Path, drop_flag: str | None = None, drop_script: str | None = None) -> Path:
    """The script beside stub CLIs that take exactly the flags the real ones take today."""
    flags = {
        "bench/kernels.py": ["--device", "--json", "--quick"],
        "bench/train_step.py": ["--config", "--batch", "--device", "--json", "--no-compile"],
        "launch/demo.py": ["--seed", "--nproc", "--train", "--val", "--out", "--data"],
        "launch/train.py": ["--config", "--out", "--resume"],
    }
    (tmp_path / "bench").mkdir()
    shutil.copy(SCRIPT, tmp_path / "bench" / SCRIPT.name)
    for rel, names in flags.items():
        if rel == drop_script:
            continue
        path = tmp_path / rel
        path.parent.mkdir(exist_ok=True)
        adds = "".join(f"p.add_argument({f!r})\n" for f in names if f != drop_flag)
        path.write_text(f"import argparse\np = argparse.ArgumentParser()\n{adds}p.parse_args()\n")
    return tmp_path / "bench" / SCRIPT.name


def test_a_flag_gone_from_a_called_script_stops_the_run_before_it_starts(tmp_path):
    proc = _run(_fake_checkout(tmp_path, drop_flag="--no-compile"), "--dry-run")
    assert proc.returncode == 2
    assert "bench/train_step.py has no flag --no-compile" in proc.stderr
    assert "[dry-run]" not in proc.stdout


def test_a_missing_script_stops_the_run_before_it_starts(tmp_path):
    proc = _run(_fake_checkout(tmp_path, drop_script="launch/train.py"), "--dry-run")
    assert proc.returncode == 2 and "launch/train.py does not exist" in proc.stderr


def test_unknown_options_are_refused():
    proc = _run(SCRIPT, "--dryrun")
    assert proc.returncode == 2 and "unknown option '--dryrun'" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_real_run_without_cuda_says_so_and_writes_nothing(tmp_path):
    proc = _run(SCRIPT, out=tmp_path)
    assert proc.returncode == 1 and "no CUDA device visible" in proc.stderr
    assert not any(tmp_path.iterdir())
