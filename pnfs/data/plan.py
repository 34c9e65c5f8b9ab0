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
      b of a rank comes from worker b mod W (DataLoader's round robin), and each worker's
      stream is cut to the batches it owes, or *resampled* (repeated from its start) when
      its shards hold fewer samples: a few samples are dropped or seen twice per epoch;
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
    slots = world_size * workers
    if len(counts) >= slots:
        mine = perm[rank::world_size]
        streams = [_stream_of(mine[w::workers], counts, seed, epoch, True) for w in range(workers)]
    else:
        everything = _stream_of(perm, counts, seed, epoch, True)
        mine = everything[rank::world_size]
        streams = [mine[w::workers] for w in range(workers)]
    owed = [len(range(w, per_rank, workers)) for w in range(workers)]
    cut = []
    for w, stream in enumerate(streams):
        if len(stream) == 0:
            stream = np.concatenate([s for s in streams if len(s)])
        reps = -(-owed[w] * batch_size // len(stream))
        cut.append(np.concatenate([stream] * max(1, reps))[: owed[w] * batch_size])
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
