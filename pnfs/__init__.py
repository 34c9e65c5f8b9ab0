"""pnfs: Pose Neural Fabrics Search (Yang, Yang, Cui), a faithful and fast trainer."""

__version__ = "0.1.0"
