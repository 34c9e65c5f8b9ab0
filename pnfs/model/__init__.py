"""The PNFS model: cells, fabrics, backbones and the vector-in-pixel head (docs/design.md §2)."""

from pnfs.model.pnfs import PoseNFS, build_model

__all__ = ["PoseNFS", "build_model"]
