"""``launch/train.py --check``: what a run will do, and how long it will take (an estimate).

The plan is computed from the same functions the run uses (the loader's epoch plan, the
learning-rate schedule); the wall time is measured: a few training steps on the run's own
device and loader, in as many processes as the run will have and with the intra-op threads
it will have (:func:`threads_per_process`, what torchrun and ``launch/demo.py`` give each
process), timed after two warm-up steps, times the planned number of steps.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from pnfs.config import Config
from pnfs.engine.distributed import DistContext
from pnfs.engine.schedule import learning_rate
from pnfs.preflight import ShardFacts, checkpoint_bytes, shard_problems, steps_per_epoch, training_counts

WARMUP_STEPS = 2  # the loader's workers start and the allocator settles
TIMED_STEPS = 6


def cpu_cores() -> int:
    """The cores this process may run on (the affinity mask, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_process(nproc: int, environ: Mapping[str, str] | None = None) -> int:
    """Intra-op threads each of ``nproc`` training processes on this machine gets: the
    ``OMP_NUM_THREADS`` of the environment if set, else the cores shared out evenly (one per
    core and process, as ``launch/demo.py`` sets it; more threads than cores make every step
    wait for a thread that has no core)."""
    given = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    return max(1, cpu_cores() // max(1, nproc))


@dataclass
class RunPlan:
    samples_per_epoch: int  # per rank
    steps_per_epoch: int  # per rank (= optimizer steps of the run per epoch)
    world_size: int
    global_batch: int
    total_steps: int
    lr_schedule: list[tuple[int, int, float]]  # (first epoch, last epoch, lr)
    checkpoint_dir: Path
    keep_last: int
    checkpoint_mib: float
    seconds_per_step: float | None = None  # measured
    timed_steps: int = 0
    threads: int = 0  # intra-op threads of each process while timed

    def lines(self) -> list[str]:
        lr = ", ".join(
            f"epochs {a}-{b}: {v:.3g}" if a != b else f"epoch {a}: {v:.3g}" for a, b, v in self.lr_schedule
        )
        out = [
            "plan:",
            f"  samples per epoch per rank: {self.samples_per_epoch}",
            f"  steps per epoch per rank:   {self.steps_per_epoch}",
            f"  processes: {self.world_size}, global batch: {self.global_batch}",
            f"  total steps: {self.total_steps}",
            f"  learning rate: {lr}",
            f"  checkpoints: {self.checkpoint_dir} (last {self.keep_last} kept, "
            f"about {self.checkpoint_mib:.1f} MiB each)",
        ]
        if self.seconds_per_step is not None:
            total = self.seconds_per_step * self.total_steps
            out.append(
                f"  wall time (estimate for {self.world_size} process(es) of {self.threads} thread(s) each, "
                f"from {self.timed_steps} timed steps, training only, evaluation not included): "
                f"{self.seconds_per_step:.3f} s/step -> {_duration(total)}"
            )
            if self.world_size == 1:
                out.append("  (one process; --check --nproc N plans and times N processes under torchrun)")
        return out


def _duration(seconds: float) -> str:
    h, rest = divmod(round(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def lr_schedule(cfg: Config) -> list[tuple[int, int, float]]:
    t = cfg.train
    out: list[tuple[int, int, float]] = []
    for epoch in range(t.epochs):
        lr = learning_rate(epoch, t.lr, t.lr_milestones, t.lr_factor)
        if out and out[-1][2] == lr:
            out[-1] = (out[-1][0], epoch, lr)
        else:
            out.append((epoch, epoch, lr))
    return out


def make_run_plan(cfg: Config, world_size: int, deepspeed_config: str | None = None) -> RunPlan:
    """The plan of a run whose preflight passed (local shards: counts known)."""
    import json

    from pnfs.model import build_model

    _, facts = shard_problems(cfg, "train")
    assert isinstance(facts, ShardFacts) and facts.counts is not None, (
        "make_run_plan needs local train shards"
    )
    samples, steps = steps_per_epoch(cfg, training_counts(cfg, facts), world_size)
    accumulation = 1
    if deepspeed_config is not None:
        accumulation = int(
            json.loads(Path(deepspeed_config).read_text()).get("gradient_accumulation_steps", 1) or 1
        )
    t = cfg.train
    total = steps * t.epochs
    if t.stop_at_step:
        total = min(total, t.stop_at_step)
    return RunPlan(
        samples_per_epoch=samples,
        steps_per_epoch=steps,
        world_size=world_size,
        global_batch=t.batch_size * world_size * accumulation,
        total_steps=total,
        lr_schedule=lr_schedule(cfg),
        checkpoint_dir=Path(t.out_dir) / "checkpoints",
        keep_last=t.keep_last,
        checkpoint_mib=checkpoint_bytes(build_model(cfg)) / 2**20,
    )


def time_steps(
    cfg: Config, ctx: DistContext, deepspeed_config: str | None = None, steps: int = TIMED_STEPS
) -> tuple[float, int]:
    """(seconds per step, steps timed): real training steps of a throw-away run (its folder is
    a temporary one) on ``ctx``'s device, batches from the run's loader, after
    :data:`WARMUP_STEPS` untimed ones. Every rank takes the same number of steps."""
    from pnfs.engine.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="pnfs-check-") as tmp:
        scratch = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=tmp))
        trainer = Trainer(scratch, ctx, deepspeed_config=deepspeed_config)
        loader = trainer._loader("train", 0, 0, shards=trainer.train_shards)
        arch = trainer._arch_batches() if trainer.optimizers.arch is not None else None
        batches = iter(loader)
        timed, start = 0, 0.0
        for i in range(steps + WARMUP_STEPS):
            try:
                batch = next(batches)
            except StopIteration:
                break
            trainer._step(batch, next(arch) if arch is not None else None)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            if i == WARMUP_STEPS - 1:
                start = time.perf_counter()
            elif i >= WARMUP_STEPS:
                timed += 1
        elapsed = time.perf_counter() - start
        trainer.scalars.close()
    return (elapsed / timed if timed else float("nan")), timed
