"""Shards streamed from a real HTTP server on 127.0.0.1 and through ``pipe:`` give the batches
and the weights of the local copies; the cache downloads once; DALI asks for a cache folder."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path

import pytest
import torch

from pnfs.config import load_config
from pnfs.data.loaders.build import build_loader
from pnfs.data.shards.reader import expand_urls, is_url, local_copy
from pnfs.engine.trainer import run_training
from tests.support.engine import TINY_OVERRIDES, tiny_dataset

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


# --------------------------------------------------------------------------- reader-mutant tests
# Issue 26 part 6 (docs/testing.md): hand-made tars, indexes and folders, no data set and no
# server; every expectation is written out here (tar offsets by the 512-byte block rule,
# cache names from hashlib), not taken from the reader.


def _tar(path: Path, members: list[tuple[str, bytes | None]]) -> Path:
    """A ustar file of ``members`` in order (``None``: a folder), mtime 0, like the writer's."""
    import io
    import tarfile

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


# two samples: k0.jpg (3 bytes) at 512, k0.kp.f32 (12) at 1536, k1.jpg (5) at 2560,
# k1.kp.f32 (12) at 3584: each member is a 512-byte header then its data padded to 512
TWO = [("k0.jpg", b"abc"), ("k0.kp.f32", bytes(range(12))), ("k1.jpg", b"hello"), ("k1.kp.f32", b"B" * 12)]
TWO_INDEX = [
    ("k0", {"jpg": (512, 3), "kp.f32": (1536, 12)}),
    ("k1", {"jpg": (2560, 5), "kp.f32": (3584, 12)}),
]
TWO_IDX_TEXT = (
    "v1.2 2\njpg 512 3 k0.jpg kp.f32 1536 12 k0.kp.f32\njpg 2560 5 k1.jpg kp.f32 3584 12 k1.kp.f32\n"
)


def _sha1_16(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()[:16]


def test_is_url_takes_paths_and_file_urls_as_local():
    from pnfs.data.shards.reader import is_url

    assert is_url("pipe:cat a.tar") and is_url("s3://b/a.tar") and is_url("https://h/a.tar")
    assert not is_url("file:///data/a.tar") and not is_url(Path("/data/a.tar")) and not is_url("a:b.tar")
    assert not is_url("/data/pipe:x.tar")  # "pipe:" only as the start


def test_cached_names_are_the_url_hash_and_its_last_path_part():
    from pnfs.data.shards.reader import cached_name

    url = "http://h/coco/train-000000.tar"
    assert cached_name(url) == _sha1_16(url) + "-train-000000.tar"
    assert cached_name("http://h/coco/person/") == _sha1_16("http://h/coco/person/") + "-person.tar"
    assert (
        cached_name("http://h/coco/MAX/") == _sha1_16("http://h/coco/MAX/") + "-MAX.tar"
    )  # only "/" stripped
    piped = "pipe:aws s3 cp s3://b/val-000001.tar -"  # the last word of the last part
    assert cached_name(piped) == _sha1_16(piped) + "--.tar"
    assert cached_name("pipe:cat /d/a.tar") == _sha1_16("pipe:cat /d/a.tar") + "-a.tar"
    assert cached_name("http://h/coco/ ") == _sha1_16("http://h/coco/ ") + "-shard.tar"  # a blank last part
    assert len({cached_name(f"http://h/{d}/a.tar") for d in "xyz"}) == 3


def test_a_local_path_or_file_url_is_its_own_copy(tmp_path):
    assert local_copy(str(tmp_path / "a.tar"), tmp_path / "cache") == tmp_path / "a.tar"
    assert local_copy(f"file://{tmp_path}/a.tar") == tmp_path / "a.tar"
    assert not (tmp_path / "cache").exists()  # nothing fetched, no cache made


def test_a_piped_shard_is_copied_indexed_and_read_once(tmp_path):
    from pnfs.data.shards.reader import cached_name

    src = _tar(tmp_path / "src.tar", TWO)
    url = f"pipe:cat {src}"
    cache = tmp_path / "deep" / "cache"  # made with its parents
    got = local_copy(url, cache)
    assert got == cache / cached_name(url)
    assert got.read_bytes() == src.read_bytes()
    assert got.with_suffix(".idx").read_text() == TWO_IDX_TEXT
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [got.name, got.stem + ".idx", got.name + ".lock"]
    )
    src.unlink()  # a cached shard runs no command again
    assert local_copy(url, cache) == got


def test_without_a_cache_folder_the_process_keeps_one_temporary_folder(tmp_path):
    src = _tar(tmp_path / "src.tar", TWO)
    a = local_copy(f"pipe:cat {src}")
    b = local_copy(f"pipe:cat  {src}")  # another URL, the same folder
    assert a.parent == b.parent and a != b
    assert a.parent.name.startswith("pnfs-shards-") and a.read_bytes() == src.read_bytes()


def test_a_copy_finished_by_another_rank_while_waiting_for_the_lock_is_taken(tmp_path, monkeypatch):
    import fcntl

    from pnfs.data.shards.reader import cached_name

    url = "pipe:false"  # would fail: the other rank's copy must be taken instead
    target = tmp_path / cached_name(url)
    real_flock = fcntl.flock

    def other_rank_finishes(fd, op):
        target.write_bytes(b"the other rank's copy")
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", other_rank_finishes)
    assert local_copy(url, tmp_path) == target
    assert target.read_bytes() == b"the other rank's copy"


def test_a_command_that_fails_or_gives_nothing_is_named_and_leaves_nothing(tmp_path):
    with pytest.raises(OSError, match=r"^cannot read shard pipe:true: it gave no bytes$"):
        local_copy("pipe:true", tmp_path)
    with pytest.raises(OSError, match=r"^cannot read shard pipe:cat /nonexistent/x\.tar: "):
        local_copy("pipe:cat /nonexistent/x.tar", tmp_path)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".lock", ".lock"]  # no part, tar or idx


def test_the_index_file_is_read_line_by_line(tmp_path):
    from pnfs.data.shards.reader import read_index

    (tmp_path / "s.idx").write_text(TWO_IDX_TEXT)
    assert read_index(tmp_path / "s.tar") == TWO_INDEX  # no tar needed beside an index
    (tmp_path / "s.idx").write_text("v1.2 2\njpg 512 3 k0.jpg\n\n")
    with pytest.raises(
        ValueError,
        match=rf"^{tmp_path / 's.idx'}: line 3: expected groups of 'ext offset size name', got ''$",
    ):
        read_index(tmp_path / "s.tar")
    (tmp_path / "s.idx").write_text("v1.2 1\njpg 512 3 k0.jpg kp.f32 1536\n")
    with pytest.raises(ValueError, match=r": line 2: .*got 'jpg 512 3 k0\.jpg kp\.f32 1536'$"):
        read_index(tmp_path / "s.tar")


def test_without_an_index_the_tar_is_scanned_and_folders_are_skipped(tmp_path):
    from pnfs.data.shards.reader import read_index, scan_tar

    assert read_index(_tar(tmp_path / "s.tar", TWO)) == TWO_INDEX
    # a folder member (header at 0), then d.v1/k0.jpg at 1024: the key ends at the file name's dot
    inner = _tar(
        tmp_path / "inner.tar", [("d.v1", None), ("d.v1/k0.jpg", b"xy"), ("d.v1/k0.ids.i64", b"z" * 16)]
    )
    assert scan_tar(inner) == [("d.v1/k0", {"jpg": (1024, 2), "ids.i64": (2048, 16)})]
    deeper = _tar(tmp_path / "deeper.tar", [("top/d.v1/k0.jpg", b"xy")])  # the dot after the last "/"
    assert scan_tar(deeper) == [("top/d.v1/k0", {"jpg": (512, 2)})]
    # cut inside k1.kp.f32 (a truncated download): the members up to the cut, at their full size
    (tmp_path / "cut.tar").write_bytes((tmp_path / "s.tar").read_bytes()[:3590])
    assert scan_tar(tmp_path / "cut.tar") == TWO_INDEX


def test_a_broken_header_inside_the_tar_is_not_taken_for_a_cut(tmp_path):
    """Only a file that ends inside a member is scanned up to the cut; a member header that is
    broken in the middle of the file (the one after a GNU long name, checksum zeroed) stays
    tarfile's error, so no sample after it is dropped unseen."""
    import io
    import tarfile

    from pnfs.data.shards.reader import scan_tar

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in ("k0.jpg", "x" * 120 + "/k1.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"ab"))
    raw = bytearray(buf.getvalue())
    raw[2048 + 148 : 2048 + 156] = b"0000000\0"  # k0 at 0/512, the long name at 1024/1536, k1 at 2048
    (tmp_path / "broken.tar").write_bytes(bytes(raw))
    with pytest.raises(tarfile.ReadError, match="bad checksum"):
        scan_tar(tmp_path / "broken.tar")


def test_the_written_index_is_dalis_v1_2_text(tmp_path):
    from pnfs.data.shards.reader import write_index

    assert write_index(_tar(tmp_path / "s.tar", TWO), tmp_path / "s.idx") == 2
    assert (tmp_path / "s.idx").read_text() == TWO_IDX_TEXT


def test_a_list_of_shards_is_sorted_once_and_urls_keep_their_order(tmp_path):
    from pnfs.data.shards.reader import expand_shards

    for name in ("train-000001.tar", "train-000000.tar", "val-000000.tar"):
        _tar(tmp_path / name, TWO)
    b, a = str(tmp_path / "train-000001.tar"), str(tmp_path / "train-000000.tar")
    assert expand_shards([b, a, b]) == [a, b]
    assert expand_shards((b, str(tmp_path / "train-*.tar"))) == [a, b]
    assert expand_shards(["http://h/b.tar", "http://h/a.tar", "http://h/b.tar"]) == [
        "http://h/b.tar",
        "http://h/a.tar",
    ]
    assert expand_shards("http://h/t-{2..3}.tar", "train") == ["http://h/t-2.tar", "http://h/t-3.tar"]
    assert expand_shards(str(tmp_path / "{val,train}-000000.tar")) == [a, str(tmp_path / "val-000000.tar")]
    with pytest.raises(
        ValueError, match=r"^no shards given \(data\.train_shards / data\.val_shards is empty\)$"
    ):
        expand_shards("")


def test_a_folder_gives_its_splits_tars_or_all_of_them(tmp_path):
    from pnfs.data.shards.reader import expand_shards

    for name in ("val-000001.tar", "train-000000.tar", "val-000000.tar", "notes.txt"):
        _tar(tmp_path / name, TWO)
    val = [str(tmp_path / "val-000000.tar"), str(tmp_path / "val-000001.tar")]
    assert expand_shards(tmp_path, "val") == val
    everything = [str(tmp_path / "train-000000.tar"), *val]
    assert expand_shards(str(tmp_path), "test") == everything  # no test-*.tar: every tar
    assert expand_shards(str(tmp_path)) == everything
    assert expand_shards([str(tmp_path)], "val") == val  # the split reaches the folders of a list
    _tar(tmp_path / "None-000000.tar", TWO)  # no split given: not the shards of a split "None"
    assert expand_shards(str(tmp_path)) == [str(tmp_path / "None-000000.tar"), *everything]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=rf"^no \.tar shards in folder {tmp_path / 'empty'}$"):
        expand_shards(str(tmp_path / "empty"), "val")


def test_a_file_that_is_not_a_tar_is_refused_by_name(tmp_path):
    from pnfs.data.shards.reader import expand_shards

    _tar(tmp_path / "val-000000.tar", TWO)
    (tmp_path / "val-000000.idx").write_text(TWO_IDX_TEXT)
    with pytest.raises(ValueError) as e:
        expand_shards(str(tmp_path / "val-000000.*"))
    assert str(e.value) == (
        f"{tmp_path / 'val-000000.idx'} is not a .tar shard (a shard's .idx index or a sidecar?): "
        "give the .tar files or their folder"
    )


def test_what_a_pattern_that_finds_nothing_is_told(tmp_path):
    from pnfs.data.shards.reader import expand_shards

    def why(pattern):
        with pytest.raises(FileNotFoundError) as e:
            expand_shards(str(pattern))
        return str(e.value)

    deep = tmp_path / "shards-seed0" / "val"
    deep.mkdir(parents=True)
    for i in range(4):
        _tar(deep / f"val-00000{i}.tar", TWO)
    _tar(tmp_path / "shards-seed0" / "train-000000.tar", TWO)
    assert why(tmp_path / "val-*.tar") == (
        f"no file matches the pattern {tmp_path / 'val-*.tar'} (under {tmp_path}: "
        "shards-seed0/val/val-000000.tar, shards-seed0/val/val-000001.tar, "
        "shards-seed0/val/val-000002.tar, ...)"
    )
    (deep / "val-000003.tar").unlink()
    assert why(tmp_path / "v*" / "val-*.tar") == (
        f"no file matches the pattern {tmp_path / 'v*' / 'val-*.tar'} (under {tmp_path}: "
        "shards-seed0/val/val-000000.tar, shards-seed0/val/val-000001.tar, shards-seed0/val/val-000002.tar)"
    )
    assert why(tmp_path / "val.tar") == (  # no wildcard: any tar below
        f"shard not found: {tmp_path / 'val.tar'} (under {tmp_path}: shards-seed0/train-000000.tar, "
        "shards-seed0/val/val-000000.tar, shards-seed0/val/val-000001.tar, ...)"
    )
    assert why(tmp_path / "train-000000.tar") == (  # no wildcard: every tar below, not that name's
        f"shard not found: {tmp_path / 'train-000000.tar'} (under {tmp_path}: shards-seed0/train-000000.tar, "
        "shards-seed0/val/val-000000.tar, shards-seed0/val/val-000001.tar, ...)"
    )
    assert why(tmp_path / "test-*.tar") == (  # the name matches nothing below: any tar
        f"no file matches the pattern {tmp_path / 'test-*.tar'} (under {tmp_path}: "
        "shards-seed0/train-000000.tar, shards-seed0/val/val-000000.tar, "
        "shards-seed0/val/val-000001.tar, ...)"
    )
    assert why(tmp_path / "nowhere" / "val-*.tar") == (
        f"no file matches the pattern {tmp_path / 'nowhere' / 'val-*.tar'} "
        f"(the folder {tmp_path / 'nowhere'} does not exist)"
    )
    (tmp_path / "bare").mkdir()
    assert (
        why(tmp_path / "bare" / "a.tar")
        == f"shard not found: {tmp_path / 'bare' / 'a.tar'} (no .tar under {tmp_path / 'bare'})"
    )


def test_samples_past_the_end_of_the_file_or_short_of_members_are_cut():
    from pnfs.data.shards.reader import whole_samples

    k2 = ("k2", {"jpg": (4608, 4), "kp.f32": (5632, 12)})
    assert whole_samples([*TWO_INDEX, k2], 5644) == ([*TWO_INDEX, k2], [])  # the last byte is the file's
    assert whole_samples([*TWO_INDEX, k2], 5643) == (
        TWO_INDEX,
        [("k2", "the shard ends at byte 5643, inside member k2.kp.f32 (bytes 5632..5644)")],
    )
    assert whole_samples([*TWO_INDEX, k2], 4000) == (
        TWO_INDEX,
        [("k2", "the shard ends at byte 4000, inside member k2.jpg (bytes 4608..4612)")],
    )
    assert whole_samples(TWO_INDEX, 3000) == (
        TWO_INDEX[:1],
        [("k1", "the shard ends at byte 3000, inside member k1.kp.f32 (bytes 3584..3596)")],
    )
    short = ("k2", {"jpg": (4608, 4)})
    assert whole_samples([*TWO_INDEX, short], 10240) == (
        TWO_INDEX,
        [("k2", "the shard ends after members ['jpg'] of its last sample")],
    )
    assert whole_samples([short, *TWO_INDEX], 10240) == ([short, *TWO_INDEX], [])  # only the last is checked
    assert whole_samples([TWO_INDEX[0], ("k1", {"jpg": (2560, 5), "extra": (3584, 1)})], 10240)[1] == []
    assert whole_samples([TWO_INDEX[0], short], 10240) == (
        TWO_INDEX[:1],
        [("k2", "the shard ends after members ['jpg'] of its last sample")],
    )
    assert whole_samples([short], 10240) == ([short], [])  # one sample: nothing to compare with
    assert whole_samples([], 0) == ([], [])


def test_a_shard_set_reads_components_by_position_with_one_file_each(tmp_path):
    from pnfs.data.shards.reader import ShardSet

    paths = [str(_tar(tmp_path / "a.tar", TWO)), str(_tar(tmp_path / "b.tar", TWO[:2]))]
    s = ShardSet.open(paths)
    assert s.paths == paths and s.urls == paths and not s.remote and s.dropped == []
    assert s.index == [TWO_INDEX, TWO_INDEX[:1]] and s.counts == [2, 1]
    assert s.key(0, 1) == "k1" and s.key(1, 0) == "k0"
    assert s.read(0, 1, ("kp.f32", "jpg")) == {"kp.f32": b"B" * 12, "jpg": b"hello"}
    assert s.read(0, 0, ("kp.f32",)) == {"kp.f32": bytes(range(12))}
    assert s.read(1, 0, ("jpg",)) == {"jpg": b"abc"}
    assert s.read_present(0, 1, ("jpg", "png", "kp.f32")) == {"jpg": b"hello", "kp.f32": b"B" * 12}
    assert s.read_present(0, 0, ("kp.f32",)) == {"kp.f32": bytes(range(12))}
    assert s.read_present(0, 0, ("png",)) == {}
    with pytest.raises(KeyError, match=rf"{tmp_path / 'a.tar'}: sample k1 has no component 'png'"):
        s.read(0, 1, ("jpg", "png"))
    fd = s._fd(0)
    assert s._fd(0) == fd and set(s._files) == {0, 1}  # one descriptor per shard, kept
    s.close()
    assert s._files == {}
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_shard_set_travels_to_workers_without_its_descriptors(tmp_path):
    import pickle

    from pnfs.data.bad_samples import BadSample
    from pnfs.data.shards.reader import ShardSet

    bad = BadSample("truncated_shard", "http://h/a.tar", "k9", "cut")
    local = ShardSet([str(tmp_path / "a.tar")], [TWO_INDEX])
    assert local.urls == [str(tmp_path / "a.tar")] and not local.remote and local.dropped == []
    s = ShardSet([str(_tar(tmp_path / "a.tar", TWO))], [TWO_INDEX], ["http://h/a.tar"], dropped=[bad])
    assert s.remote and s.urls == ["http://h/a.tar"]
    s.read(0, 0, ("jpg",))
    copy = pickle.loads(pickle.dumps(s))
    assert (copy.paths, copy.index, copy.urls, copy.dropped, copy._files) == (
        s.paths,
        s.index,
        s.urls,
        [bad],
        {},
    )
    assert copy.read(0, 1, ("jpg",)) == {"jpg": b"hello"}
    s.close()
    copy.close()


def test_a_truncated_shard_opens_with_its_cut_samples_named_by_url(tmp_path):
    from pnfs.data.bad_samples import BadSample
    from pnfs.data.shards.reader import ShardSet

    whole = _tar(tmp_path / "whole.tar", TWO)
    (tmp_path / "cut.tar").write_bytes(whole.read_bytes()[:3590])  # inside k1.kp.f32
    (tmp_path / "cut2.tar").write_bytes(whole.read_bytes()[:2000])  # in the padding before k1: k0 whole
    url = f"pipe:cat {tmp_path / 'cut.tar'}"
    s = ShardSet.open([url, str(tmp_path / "cut2.tar"), str(whole)], tmp_path / "cache")
    assert s.remote and s.urls == [url, str(tmp_path / "cut2.tar"), str(whole)]
    assert Path(s.paths[0]).parent == tmp_path / "cache"  # the named cache, not the process's
    assert s.counts == [1, 1, 2]
    cut = "the shard ends at byte 3590, inside member k1.kp.f32 (bytes 3584..3596)"
    assert s.dropped == [BadSample("truncated_shard", url, "k1", cut)]
    s.close()
    s = ShardSet.open([url, str(whole)], tmp_path / "cache")
    assert s.dropped == [BadSample("truncated_shard", url, "k1", cut)] and s.counts == [1, 2]
    s.close()


def test_meta_arrays_are_little_endian_stacked_in_float64_with_float32_scores_and_int64_ids():
    import numpy as np

    from pnfs.data.shards.reader import META_EXTS, parse_meta

    assert META_EXTS == ("kp.f32", "bbox.f32", "c2i.f32", "score.f32", "ids.i64")

    def sample(v):
        def f32(*xs):
            return np.array(xs, "<f4").tobytes()

        return {
            "kp.f32": f32(v, v + 1, 2, v + 3, v + 4, 0),
            "bbox.f32": f32(v, 1, 2, 3),
            "c2i.f32": f32(1, 0, v, 0, 1, 5),
            "score.f32": f32(0.5 * v),
            "ids.i64": np.array([v, 10 * v], "<i8").tobytes(),
        }

    m = parse_meta([sample(1), sample(2)])
    assert m.keypoints.dtype == np.float64 and m.keypoints.tolist() == [
        [[1, 2, 2], [4, 5, 0]],
        [[2, 3, 2], [5, 6, 0]],
    ]
    assert m.bbox.dtype == np.float64 and m.bbox.tolist() == [[1, 1, 2, 3], [2, 1, 2, 3]]
    assert m.crop_to_image.dtype == np.float64 and m.crop_to_image.tolist() == [
        [[1, 0, 1], [0, 1, 5]],
        [[1, 0, 2], [0, 1, 5]],
    ]
    assert m.score.dtype == np.float32 and m.score.tolist() == [0.5, 1.0]
    assert m.ids.dtype == np.int64 and m.ids.tolist() == [[1, 10], [2, 20]]


def test_the_process_cache_is_removed_at_exit_even_if_already_gone(tmp_path, monkeypatch):
    import atexit

    from pnfs.data.shards import reader

    at_exit = []
    monkeypatch.setattr(reader, "_PROCESS_CACHE", [])
    monkeypatch.setattr(atexit, "register", lambda fn, *args: at_exit.append((fn, args)))
    got = local_copy(f"pipe:cat {_tar(tmp_path / 'src.tar', TWO)}")
    assert local_copy(f"pipe:cat  {tmp_path / 'src.tar'}").parent == got.parent and len(at_exit) == 1
    fn, args = at_exit[0]
    fn(*args)
    assert not got.parent.exists()
    fn(*args)  # gone already (removed by hand): no error at exit


def test_an_unknown_url_scheme_is_named_and_leaves_nothing(tmp_path):
    with pytest.raises(
        OSError, match=r"^cannot read shard nosuch://h/a\.tar: nosuch://h/a\.tar: no gopen handler"
    ):
        local_copy("nosuch://h/a.tar", tmp_path)
    assert [p.suffix for p in tmp_path.iterdir()] == [".lock"]


def test_a_sample_is_read_with_one_pread_of_its_own_span(tmp_path, monkeypatch):
    from pnfs.data.shards.reader import ShardSet

    s = ShardSet.open([str(_tar(tmp_path / "a.tar", TWO))])
    reads = []
    real_pread = os.pread

    def spy(fd, n, offset):
        reads.append((n, offset))
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", spy)
    assert s.read(0, 1, ("jpg", "kp.f32")) == {"jpg": b"hello", "kp.f32": b"B" * 12}
    assert s.read_present(0, 1, ("kp.f32", "png")) == {"kp.f32": b"B" * 12}
    assert reads == [(3596 - 2560, 2560), (12, 3584)]  # k1.jpg at 2560 .. k1.kp.f32's end at 3596
    s.close()
