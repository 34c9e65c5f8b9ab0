"""Evaluation: COCO keypoint AP (OKS, OKS-NMS, pycocotools) and MPII PCKh.

``evaluate_model(model, loader, cfg, device=..., out_dir=None, rank=0, world_size=1)`` runs a
model over a validation loader and returns the metrics (see :mod:`pnfs.evaluate.runner`).
It is imported lazily so that ``python -m pnfs.evaluate.coco`` stays light.
"""

from __future__ import annotations

__all__ = ["evaluate_model"]


def __getattr__(name: str):
    if name == "evaluate_model":
        from pnfs.evaluate.runner import evaluate_model

        return evaluate_model
    raise AttributeError(f"module 'pnfs.evaluate' has no attribute {name!r}")
