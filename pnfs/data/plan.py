"""Which sample goes into which batch, on which rank, in which order: pure index arithmetic.

Every loader walks the same :class:`EpochPlan`, so order, resumption and augmentation
parameters do not depend on the loader or on how many workers decode.

Train (``train_plan``)
    * shards are permuted with a generator seeded by (seed, epoch): a new order every epoch,
      the same order for the same (seed, epoch) on every rank and in every run;
    * split by node then by worker: rank r takes shards ``perm[r::world]``, its worker w takes
      ``those[w::workers]`` (with fewer shards than ranks x workers the split is per sample
      instead: sample i of the permuted stream goes to slot i mod (world x workers));
    * inside a shard samples are permuted too (seeded by seed, epoch, shard);
    * equal batch counts: every rank yields ``(total // world) // batch_size`` batches. Batch
      b of a rank comes from worker b mod W (DataLoader's round robin), so each (rank, worker)
      slot owes a fixed number of samples. Each slot's stream is cut to what it owes, and the
      samples past the cuts fill the slots whose shards hold fewer (when the shards do not
      split evenly over ranks x workers): those of the same rank first, then, with what is
      left, those of any rank, so a rank reads another rank's shard only when its own hold
      fewer samples than it owes. Every rank computes the same assignment, so no sample is
      read twice in an epoch, and only the remainder of ``total`` over ``world x
      batch_size`` (fewer than ``world x batch_size`` samples) waits for another epoch;
    * the rank's epoch stream is those batches concatenated; ``start_sample`` = k drops its
      first k samples and the rest is re-batched (a final partial batch appears only when k
      is not a multiple of the batch size), so a resumed epoch yields exactly the remainder;
    * augmentation parameters are drawn per stream position from (seed, epoch, rank), so a
      resumed epoch sees the same augmentation as the uninterrupted one.

Val (``val_plan``)
    shards in name order, samples in file order; rank r takes the contiguous block
    ``[r·T/world, (r+1)·T/world)`` (every sample exactly once over all ranks, the same split
    DALI's reader uses); the last partial batch is kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pnfs.data.geometry import Augment


@dataclass
class EpochPlan:
    """A rank's epoch: ``batches[b]`` is an int array [n_b, 2] of (shard, sample-in-shard).

    ``stream`` is the rank's whole epoch [L, 2] (before ``start_sample``), ``start`` where the
    batches begin in it: the spares that replace a bad sample are drawn from it
    (:meth:`spares`), so a resumed epoch replaces exactly as the uninterrupted one did.
    """

    batches: list[np.ndarray]
    augment: list[Augment]  # per batch, aligned with ``batches``
    stream: np.ndarray
    start: int = 0

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def num_samples(self) -> int:
        return sum(len(b) for b in self.batches)

    def spares(self, b: int) -> Iterator[tuple[int, int]]:
        """The (shard, sample) pairs of the whole epoch stream after batch b, wrapping round.

        They start at batch b's end in ``stream``, so they are the same for batch b whether
        the epoch began at 0 or was resumed at a ``start_sample`` on a batch boundary."""
        end = self.start + sum(len(x) for x in self.batches[: b + 1])
        for i in range(len(self.stream)):
            s, p = self.stream[(end + i) % len(self.stream)]
            yield int(s), int(p)


def _stream_of(shards: np.ndarray, counts: list[int], seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """(shard, sample) pairs [n, 2] of ``shards`` in order, samples permuted when shuffling."""
    parts = []
    for s in shards:
        n = counts[s]
        order = np.random.default_rng([seed, epoch, int(s), 1]).permutation(n) if shuffle else np.arange(n)
        parts.append(np.stack([np.full(n, s), order], 1))
    return np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)


def _batch(stream: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [stream[i : i + batch_size] for i in range(0, len(stream), batch_size)]


def _top_up(
    slots: list[np.ndarray], owed: list[int], spare: np.ndarray
) -> tuple[list[np.ndarray], np.ndarray]:
    """Slots [n_i, 2] holding at most ``owed[i]`` samples each, topped up in slot order from
    ``spare`` [m, 2] -> (the slots, what is left of ``spare``). A slot stays short only when
    ``spare`` runs out."""
    filled, used = [], 0
    for slot, n in zip(slots, owed):
        short = n - len(slot)
        filled.append(np.concatenate([slot, spare[used : used + short]]))
        used += short
    return filled, spare[used:]


def _share_out(streams: list[np.ndarray], owed: list[int], world_size: int) -> list[np.ndarray]:
    """The (rank, worker) slots' streams, rank-major, each cut to what it owes (``owed`` per
    worker); the samples past the cuts fill the short slots of their own rank first (shards a
    node already reads), then, what is left over from every rank, the short slots of any rank.
    Every (shard, sample) pair ends in at most one slot; all are filled when the streams hold
    ``world_size * sum(owed)`` samples or more."""
    workers = len(owed)
    slots, spares = [], []
    for r in range(world_size):
        mine = streams[r * workers : (r + 1) * workers]
        rest = np.concatenate([stream[n:] for stream, n in zip(mine, owed)])
        kept, left = _top_up([stream[:n] for stream, n in zip(mine, owed)], owed, rest)
        slots += kept
        spares.append(left)
    return _top_up(slots, owed * world_size, np.concatenate(spares))[0]


def train_plan(
    counts: list[int],
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 1,
    start_sample: int = 0,
    rotation: float = 45.0,
    scale_range: tuple[float, float] = (0.7, 1.3),
    flip_prob: float = 0.5,
    augment: bool = True,
) -> EpochPlan:
    """The train epoch of ``rank``; ``counts`` are samples per shard (in shard-name order)."""
    workers = max(1, workers)
    total = int(sum(counts))
    per_rank = (total // world_size) // batch_size
    if per_rank == 0:
        raise ValueError(
            f"{total} samples cannot give a batch of {batch_size} to each of {world_size} ranks; "
            "use a smaller train.batch_size"
        )
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(counts))
    if len(counts) >= world_size * workers:  # by shard: slot (r, w) reads perm[r::world][w::workers]
        streams = [
            _stream_of(perm[r::world_size][w::workers], counts, seed, epoch, True)
            for r in range(world_size)
            for w in range(workers)
        ]
    else:  # by sample: slot (r, w) takes everything[r::world][w::workers]
        everything = _stream_of(perm, counts, seed, epoch, True)
        streams = [everything[r::world_size][w::workers] for r in range(world_size) for w in range(workers)]
    owed = [len(range(w, per_rank, workers)) * batch_size for w in range(workers)]
    cut = _share_out(streams, owed, world_size)[rank * workers : (rank + 1) * workers]
    epoch_stream = np.concatenate(
        [
            cut[b % workers][(b // workers) * batch_size : (b // workers + 1) * batch_size]
            for b in range(per_rank)
        ]
    )
    length = len(epoch_stream)
    if augment:
        aug = Augment.sample(
            np.random.default_rng([seed, epoch, rank, 2]), length, rotation, scale_range, flip_prob
        )
    else:
        aug = Augment.identity(length)
    if not 0 <= start_sample <= length:
        raise ValueError(f"start_sample {start_sample} is outside this rank's epoch of {length} samples")
    batches = _batch(epoch_stream[start_sample:], batch_size)
    augs = [
        aug[start_sample + i * batch_size : start_sample + i * batch_size + len(b)]
        for i, b in enumerate(batches)
    ]
    return EpochPlan(batches, augs, epoch_stream, start_sample)


def val_plan(
    counts: list[int],
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    start_sample: int = 0,
    augment: bool = False,
    seed: int = 0,
    epoch: int = 0,
    rotation: float = 45.0,
    scale_range: tuple[float, float] = (0.7, 1.3),
    flip_prob: float = 0.5,
) -> EpochPlan:
    """Every sample once over all ranks, file order, last partial batch kept."""
    total = int(sum(counts))
    stream = _stream_of(np.arange(len(counts)), counts, 0, 0, False)
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    mine = stream[lo:hi]
    if augment:
        aug = Augment.sample(
            np.random.default_rng([seed, epoch, rank, 2]), len(mine), rotation, scale_range, flip_prob
        )
    else:
        aug = Augment.identity(len(mine))
    batches = _batch(mine[start_sample:], batch_size)
    augs = [
        aug[start_sample + i * batch_size : start_sample + i * batch_size + len(b)]
        for i, b in enumerate(batches)
    ]
    return EpochPlan(batches, augs, mine, start_sample)
