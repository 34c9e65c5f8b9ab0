"""A checkout without its real samples fails in CI and skips, with reasons listed, elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SELECTION = (
    "tests/test_flips_by_name.py::test_a_flipped_real_sample_is_the_mirror_with_left_and_right_swapped"
)


def _pytest(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "PNFS_REQUIRE_DATA", "PNFS_SHARED_DATA")}
    clean.update(PNFS_SHARED_DATA=str(tmp_path / "no-such-data"), **env)
    return subprocess.run(
        [sys.executable, "-m", "pytest", SELECTION, "-q", "-p", "no:cacheprovider"],
        cwd=REPO,
        env=clean,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _missing_lines(run: subprocess.CompletedProcess, folder: Path) -> list[str]:
    return [line for line in (run.stdout + run.stderr).splitlines() if str(folder) in line]


def test_ci_fails_with_one_line_naming_the_missing_folder(tmp_path):
    for env in ({"CI": "true"}, {"PNFS_REQUIRE_DATA": "1"}):
        run = _pytest(tmp_path, **env)
        assert run.returncode != 0, (env, run.stdout[-2000:])
        lines = _missing_lines(run, tmp_path / "no-such-data")
        assert len(lines) == 1 and "real samples missing" in lines[0], (env, run.stdout, run.stderr)
        assert "passed" not in run.stdout and "skipped" not in run.stdout


def test_locally_the_data_tests_skip_and_the_summary_names_each_reason(tmp_path):
    run = _pytest(tmp_path)
    assert run.returncode == 0, run.stdout[-2000:]
    skips = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skips) == 1 and "2 skipped" in run.stdout, run.stdout  # coco and mpii, one reason line
    assert "real samples not found at" in skips[0] and str(tmp_path / "no-such-data") in skips[0]
