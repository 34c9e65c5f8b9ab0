"""Smoke test of bench/pipeline.py: it runs end to end on a tiny synthetic set and writes its JSON.

No speed is asserted here (speed goals live in the bench script's own output).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_pipeline_bench_runs_and_reports_ratios(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_pipeline", REPO / "bench" / "pipeline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "COCO_SAMPLE", tmp_path / "absent")  # the synthetic set, whatever is on disk
    out = tmp_path / "pipeline.json"
    rc = bench.main(
        ["--min-samples", "16", "--batch-size", "8", "--input-size", "64", "64", "--workers", "0",
         "--rounds", "1", "--loaders", "torch", "--json", str(out)]
    )  # fmt: skip
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"hrnet_baseline", "torch"}
    torch_run = report["results"]["torch"]
    assert torch_run["samples"] == 16 and torch_run["samples_per_s"] > 0
    assert torch_run["ratio_to_baseline"] > 0 and report["config"]["data"] == "synthetic"
