"""The learnt architecture (softmax(alpha)/softmax(beta)) written as JSON and drawn as a picture.

The JSON is ``model.architecture()`` (per part: ``alpha`` [edge][op], ``beta`` per cell in
the order finer, same, coarser) plus the epoch. The PNG has one row per fabric (each part,
and the Fabric backbone when there is one): left, a heat map of softmax(alpha) (edges x
ops); right, the fabric drawn as cells on a (layer, scale) grid, each input edge of a cell
drawn with a width proportional to its softmax(beta) weight.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

CELL_NAME = re.compile(r"^l(\d+)_s(\d+)$")
SCALE_ROW = {4: 0, 8: 1, 16: 2, 32: 3}


def entropy(probs: list[float]) -> float:
    """Shannon entropy (nats) of one probability vector."""
    return -sum(p * math.log(p) for p in probs if p > 0)


def fabric_entropies(fabric: dict[str, Any]) -> tuple[float, float]:
    """Mean entropy of the alpha rows and of the cells' beta vectors of one fabric."""
    alpha = fabric["alpha"]
    betas = list(fabric["beta"].values())
    a = sum(entropy(row) for row in alpha) / max(1, len(alpha))
    b = sum(entropy(v) for v in betas) / max(1, len(betas))
    return a, b


def architecture_entropies(arch: dict[str, Any]) -> dict[str, float]:
    """``{"alpha/<part>": H, "beta/<part>": H, ...}`` for TensorBoard (backbone included)."""
    out = {}
    fabrics = [(p["name"], p) for p in arch["parts"]]
    if arch.get("backbone"):
        fabrics.append(("backbone", arch["backbone"]))
    for name, fabric in fabrics:
        out[f"alpha/{name}"], out[f"beta/{name}"] = fabric_entropies(fabric)
    return out


def write_architecture_json(arch: dict[str, Any], path: str | Path, epoch: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"epoch": epoch, **arch}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
    return path


def _cell_position(name: str) -> tuple[int, int]:
    m = CELL_NAME.match(name)
    if m is None:
        raise ValueError(f"architecture export: cell name {name!r} is not of the form l<layer>_s<scale>")
    return int(m.group(1)), int(m.group(2))


def _draw_fabric(ax, fabric: dict[str, Any], title: str) -> None:
    """Cells at (layer, scale); from each cell to its finer/same/coarser inputs of the previous
    layer, a line whose width is that input's softmax(beta) weight."""
    from matplotlib.collections import LineCollection

    cells = {name: _cell_position(name) for name in fabric["beta"]}
    layers = sorted({layer for layer, _ in cells.values()})
    # a layer holds every scale from 1/4 down to its coarsest cell; cells with a single input
    # (the Fabric backbone's first 1/4 cell reads only the stem) have no beta and no entry
    present = {
        layer: {s for s in SCALE_ROW if s <= max(sc for la, sc in cells.values() if la == layer)}
        for layer in layers
    }
    # a part fabric reads the 4-scale pyramid; the Fabric backbone's first layer reads the stem (1/4)
    present[0] = set(SCALE_ROW) if 16 in present.get(1, ()) else {4}
    order = fabric.get("beta_order", ["finer", "same", "coarser"])
    offset = {"finer": 0.5, "same": 1, "coarser": 2}
    segments, widths, colors = [], [], []
    for layer in layers:
        previous = present.get(layer - 1, {4})
        for scale in sorted(present[layer]):
            same = scale if scale in previous else scale // 2  # missing same: the finer input's transform
            weights = fabric["beta"].get(f"l{layer}_s{scale}", [1.0])
            kinds = order if len(weights) == len(order) else ["same"]
            for kind, weight in zip(kinds, weights):
                src = int(scale * offset[kind])
                if src not in previous:  # a missing neighbour: the same-scale input (or its substitute)
                    src = same
                segments.append([(layer - 1, SCALE_ROW[src]), (layer, SCALE_ROW[scale])])
                widths.append(0.5 + 6 * weight)
                colors.append((0.12, 0.47, 0.71, 0.4 + 0.6 * weight))
    ax.add_collection(LineCollection(segments, linewidths=widths, colors=colors, capstyle="round"))
    nodes = [(layer, SCALE_ROW[scale]) for layer, scales in present.items() for scale in scales]
    ax.scatter(
        [x for x, _ in nodes],
        [y for _, y in nodes],
        s=160,
        c=["tab:orange" if x > 0 else "lightgray" for x, _ in nodes],
        zorder=3,
        edgecolors="black",
    )
    ax.set_yticks(range(4), ["1/4", "1/8", "1/16", "1/32"])
    ax.set_xticks(range(0, max(layers) + 1))
    ax.set_xlim(-0.4, max(layers) + 0.4)
    ax.set_ylim(3.5, -0.5)  # 1/4 on top
    ax.set_xlabel("layer (0: inputs)")
    ax.set_title(title, fontsize=9)


def plot_architecture(arch: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """PNG with, per fabric, the softmax(alpha) heat map and the beta-weighted fabric graph."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fabrics = [(f"part {p['name']}", p) for p in arch["parts"]]
    if arch.get("backbone"):
        fabrics.append(("Fabric backbone", arch["backbone"]))
    rows = len(fabrics)
    fig = Figure(figsize=(11, 2.8 * rows + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 2, squeeze=False)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.06, top=1 - 0.6 / (2.8 * rows + 0.6), hspace=0.6)
    for row, (name, fabric) in enumerate(fabrics):
        ax_a, ax_b = axes[row]
        alpha = fabric["alpha"]
        image = ax_a.imshow(alpha, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax_a.set_xticks(range(len(fabric["ops"])), fabric["ops"], rotation=20, fontsize=7)
        ax_a.set_yticks(range(len(alpha)), fabric.get("edges", [str(i) for i in range(len(alpha))]))
        for i, r in enumerate(alpha):
            for j, v in enumerate(r):
                ax_a.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white")
        ax_a.set_title(f"{name}: softmax(alpha)", fontsize=9)
        fig.colorbar(image, ax=ax_a, fraction=0.04)
        _draw_fabric(ax_b, fabric, f"{name}: edge width = softmax(beta)")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def export_architecture(arch: dict[str, Any], folder: str | Path, stem: str, epoch: int | None) -> list[Path]:
    """``<folder>/<stem>.json`` and ``<folder>/<stem>.png``."""
    folder = Path(folder)
    title = f"learnt architecture, epoch {epoch}" if epoch is not None else "learnt architecture"
    return [
        write_architecture_json(arch, folder / f"{stem}.json", epoch),
        plot_architecture(arch, folder / f"{stem}.png", title),
    ]
