"""Shards streamed from a real HTTP server on 127.0.0.1 and through ``pipe:`` give the batches
and the weights of the local copies; the cache downloads once; DALI asks for a cache folder."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest
import torch
from tests.support.engine import TINY_OVERRIDES, tiny_dataset

from pnfs.config import load_config
from pnfs.data.loaders.build import build_loader
from pnfs.data.shards.reader import expand_urls, is_url, local_copy
from pnfs.engine.trainer import run_training

TRAIN = "train-{000000..000003}.tar"


class _Server:
    """``http.server`` serving ``folder`` on 127.0.0.1 at a free port; counts the GETs."""

    def __init__(self, folder: Path):
        self.gets: list[str] = []
        gets = self.gets

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                gets.append(self.path)
                super().do_GET()

        handler = functools.partial(Quiet, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


@pytest.fixture
def server(data):
    """The tiny data set's shards (made by data_prep/shard_coco.py) behind a local HTTP server."""
    srv = _Server(data["shards"])
    yield srv
    srv.stop()


def _cfg(data, *extra):
    return load_config(None, [*TINY_OVERRIDES, *data["overrides"], *extra])


def _batches(cfg, split, shards, **kw):
    return list(build_loader(cfg, split, shards=shards, **kw))


def _same(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for name in ("image", "keypoints", "affine", "image_id", "ann_id", "score"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


def test_urls_are_told_from_paths_and_expanded_in_order():
    assert is_url("http://h/a.tar") and is_url("pipe:cat a.tar") and is_url("gs://b/a.tar")
    assert not is_url("/data/train-000000.tar") and not is_url("data/{a,b}.tar")
    assert expand_urls("http://h/train-{000001..000003}.tar") == [
        f"http://h/train-00000{i}.tar" for i in (1, 2, 3)
    ]


def test_http_and_pipe_shards_give_the_local_batches_bitwise(data, server, tmp_path):
    cfg = _cfg(data, f"data.cache_dir={tmp_path / 'cache'}")
    local = str(data["shards"] / "train" / TRAIN)
    remote = f"{server.url}/train/{TRAIN}"
    piped = f"pipe:cat {local}"
    for kw in (dict(epoch=1), dict(epoch=1, start_sample=5, rank=1, world_size=2)):
        want = _batches(cfg, "train", local, **kw)
        _same(_batches(cfg, "train", remote, **kw), want)
        _same(_batches(cfg, "train", piped, **kw), want)
    val_local = str(data["shards"] / "val" / "val-{000000..000001}.tar")
    _same(
        _batches(cfg, "val", f"{server.url}/val/val-{{000000..000001}}.tar"), _batches(cfg, "val", val_local)
    )


def test_the_cache_downloads_each_shard_once(data, server, tmp_path):
    url = f"{server.url}/train/train-000000.tar"
    first = local_copy(url, tmp_path)
    again = local_copy(url, tmp_path)
    assert first == again and server.gets == ["/train/train-000000.tar"]
    assert first.read_bytes() == (data["shards"] / "train" / "train-000000.tar").read_bytes()
    assert first.with_suffix(".idx").exists()  # DALI can read the cached copy
    server.stop()  # a cached shard needs no server
    cfg = _cfg(data, f"data.cache_dir={tmp_path}")
    assert len(_batches(cfg, "val", url, batch_size=4)) == 2


def test_a_missing_remote_shard_is_named(data, server, tmp_path):
    url = f"{server.url}/train/train-999999.tar"
    with pytest.raises(OSError, match=r"train-999999\.tar"):
        local_copy(url, tmp_path)
    assert not list(tmp_path.glob("*.tar"))  # no partial copy left behind


def test_dali_with_urls_and_no_cache_names_the_cache_option(data, server):
    cfg = _cfg(data, "data.loader=dali")
    with pytest.raises(ValueError, match=r"data\.cache_dir"):
        build_loader(cfg, "train", shards=f"{server.url}/train/{TRAIN}")


def test_one_epoch_from_http_and_pipe_trains_the_local_weights(data, server, tmp_path):
    def train(shards, name):
        cfg = _cfg(
            data,
            f"data.train_shards={shards}",
            "train.epochs=1",
            "train.max_steps_per_epoch=4",
            f"train.out_dir={tmp_path / name}",
        )
        return run_training(cfg)["weights_sha256"]

    local = train(str(data["shards"] / "train" / TRAIN), "local")
    assert train(f"{server.url}/train/{TRAIN}", "http") == local
    assert train(f"pipe:cat {data['shards'] / 'train' / TRAIN}", "pipe") == local
