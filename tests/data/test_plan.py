"""pnfs/data/plan.py's index arithmetic against expectations written from its docstring
(issue 26, mutation section of docs/testing.md): batch counts at their edges, the shard and
sample split between ranks and workers, the spares a bad sample is replaced from, resumption
with augmentation, the defaults, and a recorded plan that pins the seeding."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pnfs.data.plan import EpochPlan, train_plan, val_plan


def pairs(plan: EpochPlan) -> list[tuple[int, int]]:
    return [(int(s), int(p)) for b in plan.batches for s, p in b]


def aug_rows(plan: EpochPlan) -> list[tuple[float, float, bool]]:
    return [
        (float(s), float(r), bool(f)) for a in plan.augment for s, r, f in zip(a.scale, a.rotation, a.flip)
    ]


def same_plan(a: EpochPlan, b: EpochPlan) -> bool:
    return pairs(a) == pairs(b) and aug_rows(a) == aug_rows(b) and np.array_equal(a.stream, b.stream)


# ----------------------------------------------------------------------------- batch counts


@pytest.mark.parametrize(
    "counts, batch, world, batches",
    [([10, 7], 4, 1, 4), ([10, 7], 4, 2, 2), ([10, 7], 3, 2, 2), ([8], 4, 2, 1), ([5, 5, 5], 5, 3, 1)],
)
def test_every_rank_yields_total_over_world_over_batch_full_batches(counts, batch, world, batches):
    for rank in range(world):
        plan = train_plan(counts, batch, seed=0, epoch=0, rank=rank, world_size=world)
        assert len(plan) == batches and [len(b) for b in plan.batches] == [batch] * batches
        assert plan.num_samples == batches * batch == len(plan.stream)


@pytest.mark.parametrize("total, batch, world", [(7, 4, 2), (3, 4, 1), (0, 1, 1)])
def test_too_few_samples_for_one_batch_per_rank_is_named(total, batch, world):
    counts = [total] if total else []
    with pytest.raises(ValueError) as err:
        train_plan(counts, batch, seed=0, epoch=0, world_size=world)
    assert str(err.value) == (
        f"{total} samples cannot give a batch of {batch} to each of {world} ranks; "
        "use a smaller train.batch_size"
    )


# ----------------------------------------------------------------------------- the split


def test_as_many_shards_as_slots_splits_by_shard():
    """4 shards, 2 ranks x 2 workers: every worker reads one whole shard, so each batch holds one
    shard's samples and the ranks read disjoint shards (the edge of ``len(counts) >= slots``)."""
    counts = [8, 8, 8, 8]
    plans = [train_plan(counts, 4, seed=1, epoch=0, rank=r, world_size=2, workers=2) for r in range(2)]
    shards = []
    for plan in plans:
        assert all(len({int(s) for s in b[:, 0]}) == 1 for b in plan.batches)
        shards.append({int(s) for b in plan.batches for s in b[:, 0]})
        assert len(shards[-1]) == 2
    assert not shards[0] & shards[1]


def test_fewer_shards_than_slots_splits_by_sample():
    """3 shards, 2 ranks x 2 workers (3 < 4 slots): sample i of the permuted stream goes to slot
    i mod 4, so both ranks read every shard and no sample is read twice."""
    counts = [12, 12, 12]
    plans = [train_plan(counts, 3, seed=2, epoch=0, rank=r, world_size=2, workers=2) for r in range(2)]
    for plan in plans:
        assert {int(s) for b in plan.batches for s in b[:, 0]} == {0, 1, 2}
    seen = pairs(plans[0]) + pairs(plans[1])
    assert len(seen) == len(set(seen)) == 36


def test_one_worker_reads_its_shards_one_after_another():
    """world 1, one worker (also when 0 workers are asked for): the epoch stream is the shards in
    the permuted order, each shard's samples together."""
    counts = [6, 6, 6]
    for workers in (0, 1):
        plan = train_plan(counts, 3, seed=3, epoch=1, workers=workers)
        shard_of_sample = [s for s, _ in pairs(plan)]
        changes = sum(a != b for a, b in itertools.pairwise(shard_of_sample))
        assert changes == 2 and sorted(set(shard_of_sample)) == [0, 1, 2]
    assert same_plan(
        train_plan(counts, 3, seed=3, epoch=1, workers=0), train_plan(counts, 3, seed=3, epoch=1)
    )
    two = train_plan(counts, 3, seed=3, epoch=1, workers=2)
    assert sum(a != b for a, b in itertools.pairwise([s for s, _ in pairs(two)])) > 2  # workers alternate


def test_more_workers_than_samples_owe_nothing_and_the_rest_read_each_sample_once():
    """2 samples, 4 workers, batch 1: two workers are idle (their slot of the stream is empty)."""
    plan = train_plan([1, 1], 1, seed=0, epoch=0, workers=4)
    assert sorted(pairs(plan)) == [(0, 0), (1, 0)]
    plan = train_plan([3, 3], 1, seed=4, epoch=0, workers=4)  # 6 samples over 4 workers: 2, 2, 1, 1
    assert sorted(pairs(plan)) == [(s, p) for s in range(2) for p in range(3)]


@pytest.mark.parametrize(
    "counts, batch, world, workers",
    [
        ([8] * 6, 4, 1, 5),  # 6 shards over 5 workers: one worker reads two
        ([8] * 6, 4, 1, 7),  # 7 workers: one has no shard
        ([5, 9, 3, 7, 4, 6], 2, 4, 1),  # 6 unequal shards over 4 ranks
        ([5, 9, 3, 7, 4, 6], 2, 2, 3),  # and over 2 ranks x 3 workers
        ([12, 12, 12], 3, 2, 2),  # by sample (3 shards < 4 slots)
        ([40, 1, 1], 4, 1, 2),  # one big shard feeds the other worker
    ],
)
def test_shards_that_do_not_split_evenly_still_give_every_sample_at_most_once(counts, batch, world, workers):
    """Over all ranks the epoch holds world x (total // world // batch) x batch distinct samples:
    a slot whose shards are short reads the rest of another slot's, instead of repeating its own."""
    per_rank = sum(counts) // world // batch
    seen = []
    for rank in range(world):
        plan = train_plan(counts, batch, seed=9, epoch=3, rank=rank, world_size=world, workers=workers)
        assert [len(b) for b in plan.batches] == [batch] * per_rank
        seen += pairs(plan)
    assert len(seen) == len(set(seen)) == world * per_rank * batch
    assert set(seen) <= {(s, p) for s, n in enumerate(counts) for p in range(n)}


def test_a_worker_reads_its_own_shards_first_and_only_then_another_workers_rest():
    """6 shards of 8 over 5 workers, batch 4, 12 batches: workers 0 and 1 serve 3 batches (12
    samples), workers 2-4 serve 2 (8). Worker 0 holds two shards (16 samples), worker 1 one (8):
    every worker's batches begin with its own first shard, whole, and the 4 samples worker 1
    lacks are the tail of worker 0's second shard."""
    counts = [8] * 6
    plan = train_plan(counts, 4, seed=11, epoch=0, workers=5)
    perm = np.random.default_rng([11, 0]).permutation(6)
    own = {w: {int(s) for s in perm[w::5]} for w in range(5)}
    by_worker = {w: [tuple(map(int, x)) for b in plan.batches[w::5] for x in b] for w in range(5)}
    for w, got in by_worker.items():
        owed = 4 * len(range(w, 12, 5))
        assert len(got) == owed
        assert {s for s, _ in got[:8]} == {int(perm[w])}  # its first shard, whole, first
    lender = int(perm[5])  # worker 0's second shard: what it does not owe goes to the others
    borrowed = [p for w in range(1, 5) for p in by_worker[w][8:]]
    assert {s for s, _ in borrowed} <= {lender} and own[0] == {int(perm[0]), lender}


def test_a_rank_reads_another_ranks_shard_only_when_its_own_are_short():
    """7 shards of 6 over 3 ranks x 2 workers, batch 4 (12 samples a rank): rank 0 holds 3
    shards, its workers 2 and 1; its worker 1 fills up from worker 0's second shard, so the
    ranks still read disjoint shards. A 10- and a 2-sample shard over 2 ranks, batch 2 (6
    samples a rank): the rank with 2 reads them, then 4 from the tail of the other's shard."""
    plans = [train_plan([6] * 7, 4, seed=0, epoch=0, rank=r, world_size=3, workers=2) for r in range(3)]
    shards = [{s for s, _ in pairs(plan)} for plan in plans]
    assert all(not shards[i] & shards[j] for i in range(3) for j in range(i + 1, 3))
    assert sorted(len(s) for s in shards) == [2, 2, 3]
    plans = [train_plan([10, 2], 2, seed=0, epoch=0, rank=r, world_size=2) for r in range(2)]
    got = [pairs(plan) for plan in plans]
    short = next(r for r in range(2) if {s for s, _ in got[r][:2]} == {1})
    assert sorted(got[short][:2]) == [(1, 0), (1, 1)] and {s for s, _ in got[short][2:]} == {0}
    assert {s for s, _ in got[1 - short]} == {0}
    assert sorted(got[0] + got[1]) == [(0, p) for p in range(10)] + [(1, 0), (1, 1)]


def test_samples_inside_a_shard_are_shuffled_and_the_val_order_is_file_order():
    counts = [40, 40]
    for workers, world in ((1, 1), (1, 2)):  # by shard, and by sample (1 shard < 2 slots below)
        plan = train_plan(
            counts if world == 1 else [80], 8, seed=5, epoch=0, world_size=world, workers=workers
        )
        for shard in {s for s, _ in pairs(plan)}:
            order = [p for s, p in pairs(plan) if s == shard]
            assert order != sorted(order), "samples of a shard in file order: not shuffled"
    val = val_plan(counts, 8)
    assert pairs(val) == [(s, p) for s in range(2) for p in range(40)]


# ----------------------------------------------------------------------------- spares


@pytest.mark.parametrize("make", ["train", "val"])
def test_spares_run_from_the_end_of_a_batch_round_the_whole_stream(make):
    if make == "train":
        full = train_plan([5, 7], 4, seed=6, epoch=1)
        resumed = train_plan([5, 7], 4, seed=6, epoch=1, start_sample=4)
    else:
        full = val_plan([5, 7], 4)
        resumed = val_plan([5, 7], 4, start_sample=4)
    stream = [(int(s), int(p)) for s, p in full.stream]
    assert len(stream) == 12
    for b in range(len(full)):
        end = 4 * (b + 1)
        spares = list(full.spares(b))
        assert spares == stream[end:] + stream[:end]
        assert all(type(s) is int and type(p) is int for s, p in spares)
    assert resumed.start == 4 and pairs(resumed) == pairs(full)[4:]
    for b in range(len(resumed)):  # a resumed epoch replaces a bad sample from the same spares
        assert list(resumed.spares(b)) == list(full.spares(b + 1))


# ----------------------------------------------------------------------------- resumption


@pytest.mark.parametrize("make", ["train", "val"])
@pytest.mark.parametrize("start", [0, 3, 4, 9])
def test_a_resumed_epoch_has_the_remaining_samples_with_their_augmentation(make, start):
    kw = dict(seed=8, epoch=3, rotation=30.0, scale_range=(0.8, 1.2), flip_prob=0.5)
    if make == "train":
        full, rest = train_plan([6, 6], 4, **kw), train_plan([6, 6], 4, start_sample=start, **kw)
    else:
        full = val_plan([6, 6], 4, augment=True, **kw)
        rest = val_plan([6, 6], 4, augment=True, start_sample=start, **kw)
    assert pairs(rest) == pairs(full)[start:]
    assert aug_rows(rest) == aug_rows(full)[start:]
    assert [len(a) for a in rest.augment] == [len(b) for b in rest.batches]
    assert [len(b) for b in rest.batches[:-1]] == [4] * (len(rest) - 1)


def test_start_sample_outside_the_epoch_is_named_and_its_end_is_an_empty_epoch():
    assert len(train_plan([8], 4, seed=0, epoch=0, start_sample=8)) == 0
    for start in (9, -1):
        with pytest.raises(ValueError) as err:
            train_plan([8], 4, seed=0, epoch=0, start_sample=start)
        assert str(err.value) == f"start_sample {start} is outside this rank's epoch of 8 samples"


# ----------------------------------------------------------------------------- augmentation


def test_augmentation_follows_its_ranges_and_is_off_when_asked():
    plan = train_plan([50, 50], 10, seed=9, epoch=0, rotation=10.0, scale_range=(0.9, 1.1), flip_prob=1.0)
    rows = aug_rows(plan)
    assert all(0.9 <= s <= 1.1 and -10 <= r <= 10 and f for s, r, f in rows)
    assert len({r for _, r, _ in rows}) == 100
    none = train_plan([50, 50], 10, seed=9, epoch=0, flip_prob=0.0)
    assert not any(f for _, _, f in aug_rows(none))
    off = train_plan([50, 50], 10, seed=9, epoch=0, augment=False)
    assert aug_rows(off) == [(1.0, 0.0, False)] * 100
    assert [len(a) for a in off.augment] == [10] * 10


def test_val_augmentation_is_off_by_default_and_follows_its_arguments_when_on():
    assert aug_rows(val_plan([7, 5], 4)) == [(1.0, 0.0, False)] * 12
    plan = val_plan(
        [7, 5], 4, augment=True, seed=1, epoch=2, rotation=5.0, scale_range=(1.0, 1.5), flip_prob=1.0
    )
    rows = aug_rows(plan)
    assert len(rows) == 12 and all(1.0 <= s <= 1.5 and -5 <= r <= 5 and f for s, r, f in rows)
    assert [len(a) for a in plan.augment] == [4, 4, 4]
    other = val_plan(
        [7, 5], 4, augment=True, seed=1, epoch=3, rotation=5.0, scale_range=(1.0, 1.5), flip_prob=1.0
    )
    assert aug_rows(other) != rows  # drawn per (seed, epoch, rank)
    rank1 = val_plan([7, 5], 4, rank=1, world_size=2, augment=True, seed=1, epoch=2)
    assert aug_rows(rank1) != aug_rows(
        val_plan([7, 5], 4, rank=0, world_size=2, augment=True, seed=1, epoch=2)
    )


def test_the_defaults_are_one_rank_one_worker_and_the_documented_augmentation():
    """Defaults as the config's (data.rotation 45, data.scale_range [0.7, 1.3], data.flip_prob 0.5)."""
    explicit = dict(rotation=45.0, scale_range=(0.7, 1.3), flip_prob=0.5)
    assert same_plan(
        train_plan([9, 7], 4, seed=2, epoch=1),
        train_plan(
            [9, 7],
            4,
            seed=2,
            epoch=1,
            rank=0,
            world_size=1,
            workers=1,
            start_sample=0,
            augment=True,
            **explicit,
        ),
    )
    assert same_plan(
        val_plan([9, 7], 4, augment=True),
        val_plan([9, 7], 4, rank=0, world_size=1, start_sample=0, augment=True, seed=0, epoch=0, **explicit),
    )
    assert same_plan(val_plan([9, 7], 4), val_plan([9, 7], 4, augment=False))


def test_an_empty_val_set_is_an_empty_plan():
    plan = val_plan([], 4)
    assert len(plan) == 0 and plan.stream.shape == (0, 2) and plan.stream.dtype == np.int64
    assert isinstance(plan.augment, list) and plan.augment == []
    assert len(val_plan([1], 4, rank=0, world_size=2)) == 0  # rank 0's block of one sample is empty


# ----------------------------------------------------------------------------- recorded


def test_a_recorded_plan_pins_the_seeding():
    """The plan of (seed 7, epoch 2) as recorded on 2026-12-06. A run resumed from a checkpoint
    replays its epoch from these seeds: a change to how shard order, sample order or the
    augmentation are seeded changes this plan and must be a deliberate one."""
    plan = train_plan([3, 4], 3, seed=7, epoch=2, rotation=40.0, scale_range=(0.75, 1.25), flip_prob=0.5)
    assert pairs(plan) == RECORDED_TRAIN
    assert [f for _, _, f in aug_rows(plan)] == RECORDED_TRAIN_FLIPS
    assert [round(r, 3) for _, r, _ in aug_rows(plan)] == RECORDED_TRAIN_ROTATIONS
    val = val_plan([3, 4], 3, augment=True, seed=7, epoch=2, flip_prob=0.5)
    assert [f for _, _, f in aug_rows(val)] == RECORDED_VAL_FLIPS
    assert [round(r, 3) for _, r, _ in aug_rows(val)] == RECORDED_VAL_ROTATIONS


RECORDED_TRAIN = [(1, 3), (1, 0), (1, 1), (1, 2), (0, 2), (0, 0)]
RECORDED_TRAIN_FLIPS = [True, False, False, False, True, True]
RECORDED_TRAIN_ROTATIONS = [-2.103, 38.266, -24.873, -22.045, 11.997, 2.506]
RECORDED_VAL_FLIPS = [False, False, True, True, False, True, False]
RECORDED_VAL_ROTATIONS = [43.049, -27.982, -24.801, 13.496, 2.819, -30.401, 19.759]
