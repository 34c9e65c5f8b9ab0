"""One-line errors: a user's mistake ends an entry point with ``error: ...`` and exit code 2
(once, on rank 0), an internal bug keeps its traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pnfs.config import ConfigError
from pnfs.errors import EXIT_USER_ERROR, DataError, PreflightFailed, run_main
from tests.support.engine import PY, REPO, worker_env


def test_a_user_error_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)

    def main():
        raise DataError("data.val_shards='x': shard not found; fix the path")

    assert run_main(main) == EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: data.val_shards='x': shard not found; fix the path\n"


def test_config_errors_and_preflight_lists_are_user_errors(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert run_main(lambda: (_ for _ in ()).throw(ConfigError("train.lr: -1 must be > 0"))) == 2
    assert capsys.readouterr().err == "error: train.lr: -1 must be > 0\n"
    assert run_main(lambda: (_ for _ in ()).throw(PreflightFailed(["a=1: x; y", "b=2: z; w"]))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: preflight found 2 problems") and err.count("\n  - ") == 2


def test_only_rank_0_prints(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert run_main(lambda: (_ for _ in ()).throw(DataError("bad"))) == 2
    assert capsys.readouterr().err == ""


def test_an_internal_bug_keeps_its_traceback():
    def main():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_main(main)


def test_exit_codes_pass_through():
    assert run_main(lambda: 0) == 0
    assert run_main(lambda: None) == 0
    assert run_main(lambda: sys.exit(3)) == 3


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, *cmd], cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "cmd",
    [
        ("launch/train.py", "--config", "demo", "model.vector_dimm=3"),
        ("-m", "pnfs.summary", "demo", "train.lr=abc"),
        ("launch/evaluate.py", "--checkpoint", "no-such.pt"),
    ],
    ids=["train", "summary", "evaluate"],
)
def test_entry_points_print_one_line(cmd):
    proc = _run(*cmd)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_shard_cli_with_an_unwritable_out_folder(tmp_path, shared_data):
    (tmp_path / "a-file").write_text("")
    root = shared_data / "mpii_sample"
    for script in ("data_prep/shard_mpii.py",):
        proc = _run(
            script, "--images", str(root), "--annotations", str(root / "test_mpii.json"),
            "--out", str(tmp_path / "a-file" / "out"), "--split", "val", "--workers", "1", "--no-progress",
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.startswith("error: ") and "a-file" in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr


def test_demo_stops_with_exit_2_when_a_step_refuses_its_input(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import demo
    finally:
        sys.path.remove(str(REPO / "launch"))

    def main():
        demo.step("refusing step", [PY, "-c", "import sys; sys.exit(2)"])

    assert run_main(main) == 2
    assert "error: demo: 'refusing step' stopped on the error above" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="failed with exit code 1"):  # a crash is not a user error
        run_main(lambda: demo.step("crashing step", [PY, "-c", "raise SystemExit(1)"]))
