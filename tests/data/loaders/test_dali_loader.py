"""``dali_loader.py`` on hand-made shards (the CPU graph; no GPU needed): ``dali_available``'s
answer both ways, the refusal without DALI, ``_AugFeed``'s rows and its identity default, which
shards and ``.idx`` files the graph reads (empty shards left out, one-sample shards kept), the
rank's part of them, the reader seed drawn from (seed, epoch), the device the batches and the graph
go to (a CUDA one only built, never run), an empty plan, and the message a
failure inside the graph becomes.

The shards are tars written with ``test_plan_reader.py``'s helpers (sample ``s``: image id
``100 + s``, 3 joints, a 16 x 12 JPEG) and their DALI index (:func:`write_index`).
"""

from __future__ import annotations

import builtins
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from pnfs.data.bad_samples import BadSampleError
from pnfs.data.geometry import Augment
from pnfs.data.loaders import dali_loader
from pnfs.data.loaders.dali_loader import DaliPoseLoader, _AugFeed, dali_available
from pnfs.data.plan import EpochPlan
from pnfs.data.shards.reader import ShardSet, write_index
from tests.data.loaders.test_plan_reader import FLIP, SIZE, sample, write_shard

needs_dali = pytest.mark.skipif(not dali_available()[0], reason=dali_available()[1])


def _shards(tmp_path: Path, sizes: list[int]) -> ShardSet:
    """Shards named a, b, c, ... holding ``sizes[i]`` samples each, numbered on across shards
    (shard sizes [2, 0, 1]: a holds samples 0 and 1, b none, c sample 2)."""
    urls, s = [], 0
    for i, n in enumerate(sizes):
        tar = tmp_path / f"{'abcdefgh'[i]}.tar"
        write_shard(tar, [sample(s + j) for j in range(n)])
        write_index(tar, tar.with_suffix(".idx"))
        urls.append(str(tar))
        s += n
    return ShardSet.open(urls)


def _plan(batch_sizes: list[int]) -> EpochPlan:
    """A plan of batches of these sizes, identity augmentation (the DALI graph reads in the
    reader's own order: only the batch sizes and the augmentation matter to it)."""
    n = sum(batch_sizes)
    stream = np.array([[0, p] for p in range(n)]).reshape(-1, 2)
    ends = np.cumsum([0, *batch_sizes])
    return EpochPlan(
        batches=[stream[a:b] for a, b in itertools.pairwise(ends)],
        augment=[Augment.identity(k) for k in batch_sizes],
        stream=stream,
    )


def _loader(
    shards: ShardSet, plan: EpochPlan, *, batch_size: int, rank=0, world_size=1, seed=0, epoch=0, device="cpu"
):
    return DaliPoseLoader(
        shards, plan, split="val", batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
        epoch=epoch, start_sample=0, num_threads=1, input_size=SIZE, margin=1.5, flip_perm=FLIP,
        device=device,
    )  # fmt: skip


def _image_ids(loader) -> list[list[int]]:
    return [b.image_id.tolist() for b in loader]


# ----------------------------------------------------------------------------- dali_available


@needs_dali
def test_dali_available_is_yes_with_no_reason_where_it_imports():
    assert dali_available() == (True, "")


def test_dali_available_is_no_with_the_import_error_when_the_plugin_does_not_import(monkeypatch):
    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "nvidia.dali.plugin.pytorch":
            raise ImportError("libcudart.so.12: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    assert dali_available() == (
        False,
        "nvidia.dali (with its PyTorch plugin) does not import: "
        "libcudart.so.12: cannot open shared object file",
    )


def test_the_loader_without_dali_is_refused_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(dali_loader, "dali_available", lambda: (False, "no wheel for this Python"))
    with pytest.raises(RuntimeError) as e:
        _loader(_shards(tmp_path, [1]), _plan([1]), batch_size=1)
    assert str(e.value) == "data.loader=dali: no wheel for this Python"


# ----------------------------------------------------------------------------- _AugFeed


def test_the_feed_hands_each_sample_its_parameters_and_wraps_round():
    feed = _AugFeed(Augment(np.array([1.5, 0.8]), np.array([30.0, -10.0]), np.array([True, False])), 3)
    first, second = feed(), feed()
    assert [r.dtype for r in first + second] == [np.float32] * 6
    assert [r.tolist() for r in first] == [
        [1.5, 30.0, 1.0],
        [0.800000011920929, -10.0, 0.0],
        [1.5, 30.0, 1.0],
    ]
    assert [r.tolist() for r in second] == [
        [0.800000011920929, -10.0, 0.0],
        [1.5, 30.0, 1.0],
        [0.800000011920929, -10.0, 0.0],
    ]


def test_a_feed_without_parameters_hands_out_the_identity():
    rows = _AugFeed(Augment.identity(0), 2)()
    assert len(rows) == 2
    for r in rows:
        assert r.dtype == np.float32 and r.shape == (3,)
        assert r.tolist() == [1.0, 0.0, 0.0]  # scale 1, no rotation, no flip


# ----------------------------------------------------------------------------- what the graph reads


def _recorded_build(monkeypatch) -> list[tuple]:
    """Record ``_build_pipeline``'s arguments (then build the graph as usual)."""
    calls: list[tuple] = []
    real = dali_loader._build_pipeline

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(dali_loader, "_build_pipeline", spy)
    return calls


@needs_dali
def test_the_graph_reads_the_nonempty_shards_with_their_idx_files(tmp_path, monkeypatch):
    calls = _recorded_build(monkeypatch)
    shards = _shards(tmp_path, [2, 0, 1])
    loader = _loader(shards, _plan([3]), batch_size=3)
    ((paths, index_paths, batch_size, num_threads, device_id, shard_id, num_shards, shuffle, *_),) = calls
    assert paths == [str(tmp_path / "a.tar"), str(tmp_path / "c.tar")]
    assert index_paths == [str(tmp_path / "a.idx"), str(tmp_path / "c.idx")]
    assert (batch_size, num_threads, device_id, shard_id, num_shards, shuffle) == (3, 1, None, 0, 1, False)
    assert _image_ids(loader) == [[100, 101, 102]]  # the one-sample shard c is read too


@needs_dali
def test_a_cpu_device_with_an_index_runs_the_cpu_graph(tmp_path, monkeypatch):
    calls = _recorded_build(monkeypatch)
    loader = _loader(_shards(tmp_path, [2]), _plan([2]), batch_size=2, device=torch.device("cpu", 0))
    assert calls[0][4] is None  # device_id: only a CUDA device picks a GPU
    batch = next(iter(loader))
    assert batch.image.device.type == "cpu" and batch.image_id.tolist() == [100, 101]


@needs_dali
def test_a_cuda_device_puts_the_graph_on_that_gpu(tmp_path):
    """(Only built, not run: there need be no GPU.)"""
    loader = _loader(_shards(tmp_path, [1]), _plan([1]), batch_size=1, device="cuda:1")
    assert loader.device == torch.device("cuda", 1) and loader.pipe.device_id == 1


@needs_dali
@pytest.mark.parametrize("device", [None, "cuda"])
def test_without_an_index_the_batches_go_to_the_current_cuda_device(tmp_path, monkeypatch, device):
    """``None`` is CUDA where there is one, and a CUDA device without an index is torch's
    current one (here a pretended GPU 1; the graph is only built, not run)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    loader = _loader(_shards(tmp_path, [1]), _plan([1]), batch_size=1, device=device)
    assert loader.device == torch.device("cuda", 1) and loader.pipe.device_id == 1


@needs_dali
def test_without_cuda_the_batches_and_the_graph_stay_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loader = _loader(_shards(tmp_path, [1]), _plan([1]), batch_size=1, device=None)
    assert loader.device == torch.device("cpu") and loader.pipe.device_id is None


@needs_dali
def test_each_rank_reads_its_part_of_the_samples(tmp_path):
    shards = _shards(tmp_path, [3, 1])
    assert _image_ids(_loader(shards, _plan([2]), batch_size=2, rank=0, world_size=2)) == [[100, 101]]
    assert _image_ids(_loader(shards, _plan([2]), batch_size=2, rank=1, world_size=2)) == [[102, 103]]


@needs_dali
@pytest.mark.parametrize(
    ("seed", "epoch", "reader_seed"),
    [
        (0, 0, 1826701614),
        (7, 2, 604133645),
    ],  # recorded: np.random.default_rng([seed, epoch]), 0 <= . < 2**31 - 1
)
def test_the_reader_seed_is_drawn_from_seed_and_epoch(tmp_path, monkeypatch, seed, epoch, reader_seed):
    calls = _recorded_build(monkeypatch)
    _loader(_shards(tmp_path, [1]), _plan([1]), batch_size=1, seed=seed, epoch=epoch)
    assert calls[0][8] == reader_seed


@needs_dali
def test_a_rank_with_an_empty_plan_yields_nothing(tmp_path):
    empty = EpochPlan(batches=[], augment=[], stream=np.zeros((0, 2), np.int64))
    loader = _loader(_shards(tmp_path, [1]), empty, batch_size=1)
    assert len(loader) == 0 and list(loader) == []


# ----------------------------------------------------------------------------- a failure in the graph


def _failing(message: str):
    raise RuntimeError(message)
    yield  # (a generator)


@needs_dali
@pytest.mark.parametrize(
    ("error", "told"),
    [
        ("[imgcodec.cc:95] Error in thread 0: unsupported JPEG\nStacktrace (9 entries):",
         "[imgcodec.cc:95] Error in thread 0: unsupported JPEG"),
        ("  \n", "RuntimeError"),
    ],
)  # fmt: skip
def test_a_failure_in_the_graph_is_a_bad_sample_error_with_its_first_line(tmp_path, error, told):
    loader = _loader(_shards(tmp_path, [1]), _plan([1]), batch_size=1)
    loader.outputs = _failing(error)
    with pytest.raises(BadSampleError) as e:
        next(iter(loader))
    assert str(e.value) == (
        f"data.loader=dali: the DALI graph failed, most likely on a bad sample it cannot drop ({told}); "
        "data.loader=torch or gpu drop, name and count bad samples (data.on_error=skip)"
    )
