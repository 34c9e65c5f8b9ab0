"""A quiet, quick command line: ``--help`` and a mistyped flag answer before torch loads, the
inference line comes once (rank 0's logger), and library chatter stays off stdout."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ["launch/predict.py", "launch/evaluate.py", "launch/export.py", "launch/train.py"]

# Runs a script as ``__main__`` with the given arguments, then says whether torch was imported.
PROBE = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
print("exit", code, "torch", "torch" in sys.modules)
"""


def _load(script: str):
    spec = importlib.util.spec_from_file_location(f"pnfs_{Path(script).stem}_cli", REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("argv", [["--help"], ["--no-such-flag"]], ids=["help", "mistyped"])
def test_help_and_mistyped_flags_answer_before_torch_loads(script, argv):
    done = subprocess.run(
        [sys.executable, "-c", PROBE, script, *argv], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    expected = 0 if argv == ["--help"] else 2
    assert done.stdout.strip().splitlines()[-1] == f"exit {expected} torch False", done.stderr[-2000:]


def test_the_lightweight_copies_of_names_equal_the_library_ones():
    from pnfs.deploy import EXPORT_FORMATS
    from pnfs.detector import DEFAULT_DETECTOR

    assert _load("launch/export.py").EXPORT_FORMATS == EXPORT_FORMATS
    assert _load("launch/predict.py").DEFAULT_DETECTOR == DEFAULT_DETECTOR


@pytest.mark.parametrize("rank", [0, 1])
def test_the_inference_line_comes_from_rank_0s_logger_only(rank, capsys):
    import torch

    from pnfs.config import load_config
    from pnfs.engine.runlog import setup_logger
    from pnfs.evaluate.runner import collect_predictions
    from pnfs.model import build_model

    cfg = load_config("demo")
    setup_logger(None, rank)
    try:
        collect_predictions(build_model(cfg), [], cfg, torch.device("cpu"))
    finally:
        logging.getLogger("pnfs.train").handlers.clear()
    out = capsys.readouterr().out
    assert out.count("inference: float32 on cpu") == (1 if rank == 0 else 0), out
    if rank == 0:
        assert "[rank 0] inference:" in out
