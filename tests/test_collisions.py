"""Inputs that could be confused, given together (issue 26): two shards that share a file name
but not their bytes, read through the cache a user names with ``data.cache_dir`` (or the
process's own), must each give their own samples."""

from __future__ import annotations

import shutil

import pytest
import torch

from pnfs.data.shards.reader import local_copy
from tests.data.shards.test_reader import _batches, _cfg, _Server, data  # noqa: F401  (data: the module fixture)


@pytest.fixture
def twin_shards(data, tmp_path):  # noqa: F811
    """``a/train-000000.tar`` and ``b/train-000000.tar``: one name, two different shards."""
    root = tmp_path / "served"
    for folder, source in (("a", "train-000000.tar"), ("b", "train-000001.tar")):
        (root / folder).mkdir(parents=True)
        shutil.copy(data["shards"] / "train" / source, root / folder / "train-000000.tar")
    assert (root / "a/train-000000.tar").read_bytes() != (root / "b/train-000000.tar").read_bytes()
    srv = _Server(root)
    yield root, srv
    srv.stop()


def _ids(batches) -> list[int]:
    return [int(i) for b in batches for i in b.ann_id]


@pytest.mark.parametrize("cache", ["named", "process"])
def test_two_urls_with_one_file_name_each_read_their_own_shard(data, twin_shards, tmp_path, cache):  # noqa: F811
    root, srv = twin_shards
    cache_dir = [f"data.cache_dir={tmp_path / 'cache'}"] if cache == "named" else []
    cfg = _cfg(data, *cache_dir)
    for folder in ("a", "b", "a"):  # b after a in the same cache, then a again
        got = _batches(cfg, "val", f"{srv.url}/{folder}/train-000000.tar")
        want = _batches(cfg, "val", str(root / folder / "train-000000.tar"))
        assert _ids(got) == _ids(want), f"{folder}: the cache served the other shard of that name"
        assert all(torch.equal(g.image, w.image) for g, w in zip(got, want))
    assert sorted(srv.gets) == ["/a/train-000000.tar", "/b/train-000000.tar"]  # each downloaded once


def test_two_pipe_commands_ending_in_one_file_name_are_two_cache_entries(twin_shards, tmp_path):
    root, _ = twin_shards
    a = local_copy(f"pipe:cat {root / 'a/train-000000.tar'}", tmp_path)
    b = local_copy(f"pipe:cat {root / 'b/train-000000.tar'}", tmp_path)
    assert a != b
    assert a.read_bytes() == (root / "a/train-000000.tar").read_bytes()
    assert b.read_bytes() == (root / "b/train-000000.tar").read_bytes()
