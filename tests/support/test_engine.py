"""The checks that the engine helpers (tests/support/engine.py) produce what the other engine
tests rely on: the tiny data set feeds the loader, the distributed tests' digest parser reads
two ranks' lines run together."""

from __future__ import annotations

from tests.support.engine import TINY_OVERRIDES, digests, tiny_dataset


def test_tiny_dataset_feeds_the_loader(tmp_path_factory):
    from pnfs.config import load_config
    from pnfs.data.loaders.build import build_loader

    data = tiny_dataset(tmp_path_factory)
    cfg = load_config(None, [*TINY_OVERRIDES, *data["overrides"]])
    loader = build_loader(cfg, "train", rank=0, world_size=2, epoch=0, start_sample=0)
    batches = list(loader)
    assert len(batches) == len(loader) >= 3
    assert tuple(batches[0].image.shape) == (4, 3, 64, 64)
    assert tuple(batches[0].keypoints.shape) == (4, 17, 3)


def test_two_ranks_lines_run_together_are_both_read_with_their_own_digests():
    """The "both workers must report" and "same weights" checks of the distributed tests rest on
    this parser: two ranks' lines on one output line (the ranks share torchrun's stdout) must give
    two ranks, each with its own digest, or a missing rank and a wrong digest would hide."""
    line = "[rank {}] finished: global_step=12 epoch=2 weights_sha256={} skipped_steps=0"
    together = line.format(0, "ab" * 32) + line.format(1, "cd" * 32) + "\n\n"
    assert digests(together) == {0: ("finished", 12, "ab" * 32), 1: ("finished", 12, "cd" * 32)}
