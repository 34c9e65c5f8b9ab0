"""Rank-aware logging: text log + stdout on rank 0 (warnings from every rank), TensorBoard on rank 0."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any


def setup_logger(out_dir: Path | None, rank: int) -> logging.Logger:
    """``pnfs.train``: INFO to stdout and ``<out_dir>/train.log`` on rank 0; WARNING elsewhere,
    prefixed with the rank so a worker's message is never lost in torchrun's output."""
    logger = logging.getLogger("pnfs.train")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if rank == 0 and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(out_dir / "train.log")
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


class Scalars:
    """TensorBoard scalars on rank 0; a no-op elsewhere or when tensorboard is missing."""

    def __init__(self, folder: Path | None, enabled: bool) -> None:
        self.writer = None
        if enabled and folder is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an install requirement; keep training without it
                return
            self.writer = SummaryWriter(str(folder))

    def add(self, values: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
