"""bench/gpu_acceptance.sh on a CPU: ``--rehearse`` runs the whole script against a copy of the
tree without .venv (install into a target folder, one import check, every stage), the CUDA
stages fail fast and are reported, and at most three files come back. The preflight's checks and
the report's verdicts (pytest's XML, the ranks' weights) are tested on their own."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_acceptance.sh"
STAGES = [
    "kernel_check",
    "gpu_tests",
    "kernels",
    "train_step",
    "demo_torch",
    "demo_gpu",
    "demo_dali",
    "ddp_nccl",
    "deepspeed_zero1",
]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _run(script: Path, *args: str, out: Path | None = None, timeout: int = 400, **env: str):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    if SHARED_DATA.is_dir():  # the tree copy has no ../shared beside it: its tests read the same samples
        env.setdefault("PNFS_SHARED_DATA", str(SHARED_DATA.resolve()))
    env.pop("OUT", None)
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(
        ["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _probe_wheel(folder: Path) -> Path:
    """A one-module wheel built here (what a carried .whl/ holds, without any download)."""
    name = "pnfs_rehearsal_probe"
    files = {
        f"{name}.py": b"VALUE = 7\n",
        f"{name}-0.1.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n".encode(),
        f"{name}-0.1.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for path, data in files.items()
    )
    folder.mkdir()
    wheel = folder / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
        z.writestr(f"{name}-0.1.dist-info/RECORD", record + f"{name}-0.1.dist-info/RECORD,,\n")
    return wheel


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """The tracked tree copied without .venv, a locally built wheel in .whl/, then --rehearse."""
    tree = tmp_path_factory.mktemp("tree")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (REPO / rel).is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            (tree / rel).write_bytes((REPO / rel).read_bytes())
    assert not (tree / ".venv").exists()
    _probe_wheel(tree / ".whl")
    out = tmp_path_factory.mktemp("out")
    started = time.monotonic()
    proc = _run(tree / "bench" / "gpu_acceptance.sh", "--rehearse", out=out, PNFS_COMMIT="rehearsal-test")
    return proc, out, tree, time.monotonic() - started


@pytest.mark.skipif(torch.cuda.is_available(), reason="the rehearsal is the run on a machine without CUDA")
@pytest.mark.timeout(420)
def test_rehearsal_installs_checks_imports_and_reports_every_stage_in_three_files(rehearsal):
    proc, out, tree, seconds = rehearsal
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["stages.tar.gz", "summary.json", "summary.txt"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["environment"]["commit"] == "rehearsal-test"
    assert summary["environment"]["cuda_available"] is False
    install = "\n".join(summary["install"])
    assert "carried wheels: 1 installed: pnfs_rehearsal_probe-0.1-py3-none-any.whl" in install
    assert "pnfs: installed from this tree" in install
    assert summary["preflight_problems"] == []
    assert summary["imports"]["pnfs.kernels"] != "MISSING" and summary["imports"]["torch"] != "MISSING"
    assert list(summary["stages"]) == STAGES
    stages = summary["stages"]
    # pytest ran and skipped every gpu test: reported as a failure, not as a pass
    assert stages["gpu_tests"]["status"].startswith("failed: no test ran (")
    assert stages["gpu_tests"]["tests"]["passed"] == 0 and stages["gpu_tests"]["tests"]["skipped"] > 0
    # the bench scripts started from the installed pnfs and refused the missing GPU themselves
    assert stages["kernel_check"]["status"] == "failed (exit 2)"
    assert any("CUDA is not available" in line for line in stages["kernel_check"]["log_tail"])
    assert stages["kernels"]["status"] == "failed (exit 2)"
    assert any("CUDA is not available" in line for line in stages["kernels"]["log_tail"])
    assert stages["train_step"]["status"] == "failed (exit 1)"
    for name in STAGES[4:]:
        assert stages[name]["status"] == "failed: no CUDA device" and stages[name]["seconds"] == 0
    with tarfile.open(out / "stages.tar.gz") as tar:
        names = set(tar.getnames())
        preflight = json.load(tar.extractfile("stages/preflight.json"))
    assert {
        "stages/preflight.json",
        "stages/install.txt",
        "stages/kernels.log",
        "stages/ddp_nccl.json",
    } <= names
    site = tree / "runs" / "gpu-acceptance" / "site"
    for module in ("pnfs", "pnfs.kernels"):  # the installed copy, not the checkout's folders
        assert Path(preflight["imports"][module]["file"]).is_relative_to(site), preflight["imports"][module]
    assert (site / "pnfs_rehearsal_probe.py").is_file()
    lines = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == STAGES
    assert "== GPU acceptance (rehearse)" in proc.stdout and seconds < 530


def test_preflight_names_a_missing_script_and_a_flag_a_script_lost(tmp_path):
    preflight = _module("acceptance_preflight")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "tool.py").write_text(
        "import argparse\np = argparse.ArgumentParser()\np.add_argument('--device')\np.parse_args()\n"
    )
    problems = preflight.flag_problems(
        tmp_path, {"bench/tool.py": ("--device", "--json"), "launch/x.py": ("--a",)}
    )
    assert problems == ["bench/tool.py has no flag --json", "launch/x.py does not exist"]


def test_preflight_finds_every_flag_the_run_passes_in_this_checkout():
    preflight = _module("acceptance_preflight")
    assert preflight.flag_problems(REPO, preflight.FLAGS) == []
    assert preflight.config_problems(preflight.CONFIGS) == []
    assert preflight.config_problems([("demo", ("train.no_such_key=1",))])[0].startswith("config demo with")


def test_preflight_reports_a_module_that_does_not_import_and_goes_on():
    found = _module("acceptance_preflight").import_versions(("json", "no_such_module_pnfs", "os"))
    assert found["json"]["ok"] and found["os"]["ok"]
    assert (
        not found["no_such_module_pnfs"]["ok"]
        and "ModuleNotFoundError" in found["no_such_module_pnfs"]["error"]
    )


def test_preflight_refuses_a_pnfs_that_is_not_the_installed_copy(tmp_path):
    preflight = _module("acceptance_preflight")
    site = tmp_path / "site"
    inside = {"ok": True, "file": str(site / "pnfs" / "__init__.py")}
    checkout = {"ok": True, "file": str(tmp_path / "checkout" / "pnfs" / "__init__.py")}
    assert preflight.site_problems({"pnfs": inside, "pnfs.kernels": inside}, site) == []
    assert preflight.site_problems({"pnfs": checkout, "pnfs.kernels": inside}, site) == [
        f"pnfs imports from {checkout['file']}, not from the installed copy under {site}"
    ]


def _junit(path: Path, tests: int, failures: int, skipped: int) -> Path:
    path.write_text(
        f'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="{tests}" failures="{failures}"'
        f' errors="0" skipped="{skipped}"></testsuite></testsuites>'
    )
    return path


def test_pytest_stage_passes_only_with_a_passed_test_and_no_failure(tmp_path):
    report = _module("acceptance_report")
    assert report.junit_status(_junit(tmp_path / "a.xml", 15, 0, 1))[0] is None
    assert report.junit_status(_junit(tmp_path / "b.xml", 15, 0, 15))[0] == "failed: no test ran (15 skipped)"
    assert report.junit_status(_junit(tmp_path / "c.xml", 15, 2, 0))[0] == "failed: 2 failed, 0 errors"
    assert report.junit_status(tmp_path / "none.xml")[0] == "failed: pytest wrote no report"


def test_ranks_stage_needs_every_rank_finished_with_one_digest(tmp_path):
    report = _module("acceptance_report")
    log = tmp_path / "ddp.log"
    line = "[rank {r}] finished: global_step=4 epoch=1 weights_sha256={d} skipped_steps=0\n"
    log.write_text(line.format(r=0, d="ab12") + "noise\n" + line.format(r=1, d="ab12"))
    assert report.ranks_status(log, 2) == (None, {0: ["finished", 4, "ab12"], 1: ["finished", 4, "ab12"]})
    log.write_text(line.format(r=0, d="ab12") + line.format(r=1, d="ab13"))
    assert report.ranks_status(log, 2)[0] == "failed: the ranks ended with different weights"
    log.write_text(line.format(r=1, d="ab12"))
    assert report.ranks_status(log, 2)[0] == "failed: 1 of 2 ranks reported their weights"


def test_every_stage_rewrites_the_summary_and_the_archive_and_final_says_if_one_failed(tmp_path):
    report = _module("acceptance_report")
    results, dest = tmp_path / "stages", tmp_path / "out"
    results.mkdir()
    (results / "kernels.raw.json").write_text(json.dumps({"cases": [{"dtype": "fp32"}, {"dtype": "bf16"}]}))
    (results / "kernels.log").write_text("one line per case\n")
    base = ["--results", str(results), "--dest", str(dest), "stage"]
    assert (
        report.main([*base, "kernels", "ok", "0", "12", "70", "--result", str(results / "kernels.raw.json")])
        == 0
    )
    summary = json.loads((dest / "summary.json").read_text())
    assert summary["stages"]["kernels"]["numbers"] == {"cases": 2, "dtypes": ["bf16", "fp32"]}
    with tarfile.open(dest / "stages.tar.gz") as tar:
        assert "stages/kernels.log" in tar.getnames()
    assert report.main(["--results", str(results), "--dest", str(dest), "final"]) == 0
    (results / "demo_dali.log").write_text("Traceback\nValueError: no DALI\n")
    report.main([*base, "demo_dali", "skipped: does not import: nvidia.dali", "0", "0", "60"])
    assert (
        report.main(["--results", str(results), "--dest", str(dest), "final"]) == 0
    )  # skipped is no failure
    report.main([*base, "demo_gpu", "timeout after 60s", "124", "60", "60"])
    assert report.main(["--results", str(results), "--dest", str(dest), "final"]) == 1
    summary = json.loads((dest / "summary.json").read_text())
    assert list(summary["stages"]) == ["kernels", "demo_dali", "demo_gpu"]
    assert summary["stages"]["demo_dali"]["log_tail"] == ["Traceback", "ValueError: no DALI"]
    assert sorted(p.name for p in dest.iterdir()) == ["stages.tar.gz", "summary.json", "summary.txt"]


def test_unknown_options_are_refused():
    proc = _run(SCRIPT, "--dryrun")
    assert proc.returncode == 2 and "unknown option '--dryrun'" in proc.stderr


@pytest.mark.slow  # the preflight's imports (deepspeed, DALI) take 15-30 s on two shared cores
def test_dry_run_lists_every_stage_with_its_command_and_writes_nothing(tmp_path):
    proc = _run(SCRIPT, "--dry-run", out=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith("[dry-run]")}
    assert list(lines) == STAGES
    assert "bench/kernels.py --device cuda --no-compiled" in lines["kernels"]
    assert "--cases lean\\,lean-graphed\\,lean-compiled\\,lean-per-part" in lines["train_step"]
    assert "torch.distributed.run --standalone --nproc_per_node=2" in lines["ddp_nccl"]
    assert "--deepspeed launch/deepspeed_zero1.json" in lines["deepspeed_zero1"]
    assert not any(tmp_path.iterdir())
