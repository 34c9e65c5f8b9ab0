"""``make demo`` (launch/demo.py): synthetic data -> shards -> torchrun search -> evaluation.

The CI test runs a shortened demo (fewer people, fewer epochs, ~3 minutes on 2 cores) and
checks that the trained model's COCO AP ends far above the AP of the same model before
training, measured here on the same val shards. The ``slow`` test runs the full demo and
asks for AP >= 0.6; its seeds come from ``PNFS_DEMO_SEEDS`` (comma-separated, default 0,1).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
AP_LINE = re.compile(r"^demo AP=(\d+\.\d+)$", re.MULTILINE)

# the shortened CI demo: 800 train people for 4 epochs (3200 images, ~3 minutes of training
# on 2 cores) in batches of 4 per process (more steps per image than the full demo's 8),
# lr x0.25 for the last epoch, one evaluation at the end
SHORT = [
    "--train",
    "800",
    "--val",
    "100",
    "train.epochs=4",
    "train.batch_size=4",
    "train.lr=2e-3",
    "train.lr_milestones=[3]",
    "train.eval_every=4",
]


def run_demo(tmp_path: Path, seed: int, *extra: str, timeout: float) -> tuple[str, Path]:
    out = tmp_path / "run"
    cmd = [PY, "launch/demo.py", "--seed", str(seed), "--out", str(out), "--data", str(tmp_path / "data")]
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    proc = subprocess.run([*cmd, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output, out


def demo_ap(output: str, out: Path) -> float:
    """The printed ``demo AP=`` value, checked against metrics.json and the run folder."""
    printed = AP_LINE.findall(output)
    assert len(printed) == 1, f"expected one 'demo AP=' line:\n{output[-3000:]}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"AP", "AP50", "AP75", "AR", "seed", "minutes"} <= set(metrics)
    assert float(printed[0]) == pytest.approx(metrics["AP"], abs=1e-4)
    assert (out / "architecture.png").stat().st_size > 0
    assert "parts" in json.loads((out / "architecture.json").read_text())
    assert list((out / "eval" / "overlays").glob("*.png")), "no pose overlays written"
    return metrics["AP"]


def untrained_ap(out: Path) -> float:
    """COCO AP of the run's model as the trainer initialises it (same seed), before any step."""
    from pnfs.config import load_config
    from pnfs.data.loaders.build import build_loader
    from pnfs.engine.strategies import prepare_architecture
    from pnfs.evaluate import evaluate_model
    from pnfs.model import build_model

    cfg = load_config(str(out / "config.yaml"), ["data.num_workers=0"])
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    prepare_architecture(model, cfg)
    model.eval()
    loader = build_loader(cfg, "val", batch_size=cfg.eval.batch_size)
    return float(evaluate_model(model, loader, cfg, device="cpu")["AP"])


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_short_demo_learns_far_beyond_the_untrained_model(tmp_path):
    output, out = run_demo(tmp_path, 1, *SHORT, timeout=580)
    assert "on 2 process(es), device cpu, strategy sync, engine ddp" in output
    trained = demo_ap(output, out)
    before = untrained_ap(out)
    assert trained >= before + 0.1, f"AP {trained:.3f} after training vs {before:.3f} before"


SEEDS = [int(s) for s in os.environ.get("PNFS_DEMO_SEEDS", "0,1").split(",") if s.strip()]


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("seed", SEEDS)
def test_full_demo_reaches_ap_0_6(tmp_path, seed):
    output, out = run_demo(tmp_path, seed, timeout=3500)
    assert demo_ap(output, out) >= 0.6
