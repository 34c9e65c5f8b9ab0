"""Accuracy against cost, the paper's Fig. 5: ``python -m pnfs.tradeoff RUN_DIR... --out tradeoff.png``.

Each run folder gives one point: its ``config.yaml`` (the preset is named by ``train.out_dir``'s
last component, the trainer's default for a preset), its best score (``result.json``'s
``best_score``, else ``eval/metrics.json``'s ``score``: PCKh@0.5 in percent for MPII, AP for
COCO-style sets) and GMACs from :func:`pnfs.summary.summarize` (``paper_gmacs``: the
paper's convention, see :mod:`pnfs.summary`). The paper's own points for the same presets
(:data:`PAPER_POINTS`) are drawn alongside, hollow. One panel per metric. The points are also
printed as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from pnfs.config import ConfigError, load_config


@dataclass(frozen=True)
class PaperPoint:
    metric: str  # "PCKh@0.5" (percent) or "AP" (fraction)
    value: float
    gmacs: float
    source: str


# The paper's numbers for our presets (pnfs-paper, Tables II, IV, V, VI, VII and Sec. IV-B).
# Its cost column is "Madds (FLOPs)", i.e. multiply-adds, in G.
PAPER_POINTS: dict[str, PaperPoint] = {
    "mpii_mobilenetv2_p3_256": PaperPoint("PCKh@0.5", 87.0, 1.2, "Table II / VI (d=8)"),
    "mpii_hrnetw32_p5_c16_256": PaperPoint("PCKh@0.5", 90.1, 9.4, "Table V Ours-b, Sec. IV-B text"),
    "mpii_mobilenetv2_p3_h2_384": PaperPoint("PCKh@0.5", 90.2, 4.6, "Table IV (MPII test)"),
    "mpii_simplebaseline_r50_256": PaperPoint("PCKh@0.5", 88.5, 12.0, "Table VI SimpleBaseline"),
    "mpii_simplebaseline_r50_vec8_256": PaperPoint("PCKh@0.5", 88.7, 12.1, "Table VI + vector(8-dim)"),
    "mpii_hrnetw32_256": PaperPoint("PCKh@0.5", 90.3, 9.5, "Table VI HRNet"),
    "mpii_hrnetw32_vec8_256": PaperPoint("PCKh@0.5", 90.2, 9.6, "Table VI HRNet + vector(8-dim)"),
    "coco_mobilenetv2_p3_384x288": PaperPoint("AP", 0.674, 4.0, "Table VII Ours-1 (test-dev)"),
    "coco_resnet50_p3_384x288": PaperPoint("AP", 0.709, 11.4, "Table VII Ours-2 (test-dev)"),
}


@dataclass(frozen=True)
class RunPoint:
    preset: str
    metric: str
    value: float
    gmacs: float
    run_dir: str


def best_score(run_dir: Path) -> float:
    """The run's best score: ``result.json`` ``best_score``, else ``eval/metrics.json`` ``score``."""
    result, metrics = run_dir / "result.json", run_dir / "eval" / "metrics.json"
    for path, key in ((result, "best_score"), (metrics, "score")):
        if path.is_file():
            try:
                value = json.loads(path.read_text()).get(key)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON: {err}") from None
            if isinstance(value, (int, float)) and math.isfinite(value):
                return float(value)
    raise ValueError(f"{run_dir}: no finite score in result.json (best_score) or eval/metrics.json (score)")


def run_point(run_dir: str | Path) -> RunPoint:
    """One run folder -> its preset, metric name, best score and paper-convention GMACs."""
    from pnfs.summary import summarize

    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ValueError(f"{run_dir}: no config.yaml (not a run folder)")
    try:
        cfg = load_config(config)
    except ConfigError as err:
        raise ValueError(f"{config}: {err}") from None
    metric = "PCKh@0.5" if cfg.data.dataset == "mpii" else "AP"
    preset = Path(cfg.train.out_dir).name or run_dir.name
    gmacs = summarize(cfg)["paper_gmacs"]
    return RunPoint(preset, metric, best_score(run_dir), gmacs, str(run_dir))


def plot(points: list[RunPoint], out: str | Path) -> Path:
    """Metric vs GMACs, one panel per metric, runs filled and labelled, the paper's hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({p.metric for p in points})
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        ours = [p for p in points if p.metric == metric]
        for p in ours:
            ax.scatter(p.gmacs, p.value, color="tab:blue", zorder=3)
            ax.annotate(p.preset, (p.gmacs, p.value), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for preset in sorted({p.preset for p in ours}):
            ref = PAPER_POINTS.get(preset)
            if ref is not None and ref.metric == metric:
                ax.scatter(ref.gmacs, ref.value, facecolors="none", edgecolors="tab:red", zorder=3)
                ax.annotate(
                    f"paper: {preset}", (ref.gmacs, ref.value), textcoords="offset points",
                    xytext=(4, -10), fontsize=7, color="tab:red",
                )  # fmt: skip
        ax.set_xlabel("GMACs (paper convention, pnfs.summary)")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs cost (paper Fig. 5: filled = runs, hollow = paper)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pnfs.tradeoff", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (config.yaml + metrics)")
    parser.add_argument("--out", default="tradeoff.png", help="image to write")
    args = parser.parse_args(argv)
    try:
        points = [run_point(r) for r in args.runs]
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plot(points, args.out)
    reference = {p.preset: asdict(PAPER_POINTS[p.preset]) for p in points if p.preset in PAPER_POINTS}
    print(json.dumps({"runs": [asdict(p) for p in points], "paper": reference, "out": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
