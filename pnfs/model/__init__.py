"""The PNFS model: cells, fabrics, backbones and the vector-in-pixel head (docs/design.md §2),
and Table VI's fixed baselines (SimpleBaseline-ResNet-50, HRNet-W32) with the same interface."""

from pnfs.model.baseline import BaselinePoseNet
from pnfs.model.pnfs import PoseNFS, build_model

__all__ = ["BaselinePoseNet", "PoseNFS", "build_model"]
