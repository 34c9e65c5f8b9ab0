"""``build_loader``: the one entry point the engine and the evaluation use.

    loader = build_loader(cfg, "train", rank=r, world_size=w, epoch=e, start_sample=k)
    for batch in loader:          # PoseBatch, len(loader) batches on this rank
        ...

``cfg.data.loader`` picks the implementation: ``torch`` (WebDataset shards + DataLoader,
simplejpeg + cv2.warpAffine), ``dali`` (fn.readers.webdataset + DALI decode/warp; CPU graph
without CUDA) or ``gpu`` (torchvision nvJPEG decode + batched grid_sample; CPU without CUDA).
All follow the same :mod:`pnfs.data.plan` for train/val order (see there for the exact
rules: per-epoch seeded order, split by node then by worker, equal batch counts by
resampling, exact resumption; val: every sample once over all ranks, last batch kept).
"""

from __future__ import annotations

import logging
from typing import Any

from pnfs.config import Config
from pnfs.data.bad_samples import BadSampleError, BadSampleReport, default_limit
from pnfs.data.plan import EpochPlan, train_plan, val_plan
from pnfs.data.shards.manifest import check_coverage, check_manifest
from pnfs.data.shards.reader import ShardSet, expand_shards, is_url


def shard_paths(cfg: Config, split: str, shards=None) -> list[str]:
    spec = (
        shards if shards is not None else (cfg.data.train_shards if split == "train" else cfg.data.val_shards)
    )
    if not spec:
        raise ValueError(
            f"data.{'train' if split == 'train' else 'val'}_shards is empty: no shards for {split!r}"
        )
    return expand_shards(spec, split)


def make_epoch_plan(
    cfg: Config,
    split: str,
    counts: list[int],
    *,
    rank: int,
    world_size: int,
    epoch: int,
    start_sample: int,
    batch_size: int,
    augment: bool,
) -> EpochPlan:
    """This rank's :class:`EpochPlan` of ``split`` for ``epoch`` from the config's data and
    seed (``train_plan`` / ``val_plan`` of :mod:`pnfs.data.plan`); ``counts``: samples per
    shard. Not the run's plan: that is :func:`pnfs.run_plan.make_run_plan`."""
    d = cfg.data
    aug_args: dict[str, Any] = dict(
        rotation=d.rotation, scale_range=tuple(d.scale_range), flip_prob=d.flip_prob
    )
    if split == "train":
        return train_plan(
            counts,
            batch_size,
            cfg.train.seed,
            epoch,
            rank,
            world_size,
            max(1, d.num_workers),
            start_sample,
            augment=augment,
            **aug_args,
        )
    return val_plan(
        counts, batch_size, rank, world_size, start_sample, augment, cfg.train.seed, epoch, **aug_args
    )


def _check_joints(shards: ShardSet, num_joints: int, dataset: str) -> None:
    for s, n in enumerate(shards.counts):
        if n:
            kp = shards.read(s, 0, ("kp.f32",))["kp.f32"]
            found = len(kp) // 12
            if found != num_joints:
                raise ValueError(
                    f"{shards.urls[s]}: samples have {found} joints "
                    f"but data.dataset={dataset!r} has {num_joints}"
                )
            return


def build_loader(
    cfg: Config,
    split: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    start_sample: int = 0,
    batch_size: int | None = None,
    augment: bool | None = None,
    shards=None,
):
    """An iterable of PoseBatch for ``split`` ("train" | "val") on this rank; ``len()`` = batches.

    batch_size: default train.batch_size (train) / eval.batch_size (val); augment: default on
    for train, off for val; shards: overrides data.train_shards / data.val_shards (pattern,
    folder or list).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    d = cfg.data
    batch_size = batch_size or (cfg.train.batch_size if split == "train" else cfg.eval.batch_size)
    augment = (split == "train") if augment is None else augment
    paths = shard_paths(cfg, split, shards)
    if d.loader == "dali" and any(is_url(p) for p in paths) and not d.cache_dir:
        raise ValueError(
            f"data.loader=dali reads local files only, but data.{split}_shards names URLs "
            f"({paths[0]}): set data.cache_dir to a local folder (the shards are copied there "
            "once per node) or use data.loader=torch"
        )
    check_coverage(paths, scale_range=d.scale_range, input_size=d.input_size)
    log = logging.getLogger("pnfs.train")
    for problem in check_manifest(paths, d.verify_shards):
        log.warning("shard does not match its manifest: %s", problem)
    shard_set = ShardSet.open(paths, d.cache_dir or None)
    joints = cfg.joints
    _check_joints(shard_set, joints.num_joints, d.dataset)
    plan = make_epoch_plan(
        cfg,
        split,
        shard_set.counts,
        rank=rank,
        world_size=world_size,
        epoch=epoch,
        start_sample=start_sample,
        batch_size=batch_size,
        augment=augment,
    )
    geometry = dict(input_size=tuple(d.input_size), margin=d.margin, flip_perm=joints.flip_permutation())
    bad = BadSampleReport(d.max_bad_samples if d.max_bad_samples >= 0 else default_limit(plan.num_samples))
    for sample in shard_set.dropped:
        if d.on_error == "raise":
            raise BadSampleError(f"{sample} (data.on_error=raise; skip drops such samples)")
        log.warning("bad sample dropped: %s", sample)
        bad.add(sample)
    if d.loader == "torch":
        import torch

        from pnfs.data.loaders.torch_loader import PlanBatches, PoseLoader

        # page-locked batches let the trainer's .to(device, non_blocking=True) overlap the copy
        return PoseLoader(
            PlanBatches(shard_set, plan, **geometry, on_error=d.on_error),
            d.num_workers,
            pin_memory=torch.cuda.is_available(),
            bad_samples=bad,
        )
    if d.loader == "gpu":
        from pnfs.data.loaders.gpu_loader import GpuPoseLoader, PlanBytes

        return GpuPoseLoader(
            PlanBytes(shard_set, plan, **geometry, on_error=d.on_error), d.num_workers, bad_samples=bad
        )
    if d.loader == "dali":
        from pnfs.data.loaders.dali_loader import DaliPoseLoader

        if shard_set.dropped:
            raise BadSampleError(
                f"data.loader=dali reads every sample its .idx lists and cannot drop "
                f"{shard_set.dropped[0]}; re-copy the shard or use data.loader=torch"
            )

        return DaliPoseLoader(
            shard_set,
            plan,
            split=split,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=cfg.train.seed,
            epoch=epoch,
            start_sample=start_sample,
            num_threads=max(1, d.num_workers),
            **geometry,
        )
    raise ValueError(f"data.loader: unknown loader {d.loader!r}")
