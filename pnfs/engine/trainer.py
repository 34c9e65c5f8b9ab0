"""The training/search loop behind ``launch/train.py`` (DDP or DeepSpeed, one node or many).

One iteration on a batch of images x and Gaussian targets y (docs/design.md §1; the step
itself is :mod:`pnfs.engine.step`):

    loss = pose_loss(model(x), y, w)                      # weighted MSE of the score maps
    sync:    (w, alpha, beta) <- Adam step on grad_{w,alpha,beta} loss
    random:  w <- Adam step on grad_w loss                (alpha, beta frozen at N(0, 1))
    darts1:  (alpha, beta) <- Adam_arch step on grad_{alpha,beta} loss(held-out batch)
             w <- Adam step on grad_w loss(training batch)

The learning rate is a pure function of the epoch (:func:`pnfs.engine.schedule.learning_rate`).
Where the run stands is (epoch, samples seen in the epoch, global step); with the RNG states
of every rank and the optimizer states this is the whole resume dict, so a run stopped at
any step and resumed ends bitwise where an uninterrupted run ends (CPU, deterministic).

The host reads the device (loss, skipped steps, the NaN guard) only every ``train.log_every``
steps, at the end of an epoch and before a checkpoint (docs/design.md §7). With
``train.cuda_graph`` each step (and darts1's architecture step) is replayed from a CUDA graph
after a few eager warm-up steps (:mod:`pnfs.engine.graph`, docs/design.md §8).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from pnfs.config import Config
from pnfs.data.bad_samples import merge_rank_reports
from pnfs.engine.distributed import DistContext, average_buffers, init_distributed, shutdown
from pnfs.engine.graph import WARMUP_STEPS, WARMUP_STEPS_DDP, GraphedStep, cuda_graph_capture
from pnfs.engine.guard import StepRecord
from pnfs.engine.run import Run
from pnfs.engine.runtime import model_digest
from pnfs.engine.state import Window
from pnfs.engine.step import StepParts, arch_step, weight_step
from pnfs.loss import loss_setup, pose_loss
from pnfs.process_group import all_gather_objects


class Trainer(Run):
    """One training/search run: the parts of :class:`pnfs.engine.run.Run` and the loop."""

    def __init__(
        self, cfg: Config, ctx: DistContext, resume: str | None = None, deepspeed_config: str | None = None
    ) -> None:
        super().__init__(cfg, ctx, resume=resume, deepspeed_config=deepspeed_config)
        model = self.model
        self.record = StepRecord(self.guard, ctx.device)
        setup = loss_setup(model, cfg.data.sigma, ctx.device, self.dtype, cfg.train.channels_last)
        self.weights = StepParts(
            self.forward_model, model, self.optimizers.weights, self._weight_optimizer_parameters(),
            setup, self.record, cfg.train.grad_clip,
        )  # fmt: skip
        self.arch = None
        if self.optimizers.arch is not None:
            bare = self.engine.module if self.use_deepspeed else model
            # max_norm 0: train.grad_clip bounds the weights only; DARTS's architecture step is
            # not clipped (docs/training.md, "Search strategies")
            self.arch = StepParts(bare, bare, self.optimizers.arch, self.arch_params, setup, self.record, 0.0)
        self.weight_step, self.arch_step = self._step_functions()

    def _step_functions(self) -> tuple[Callable[[Any], None], Callable[[Any], None] | None]:
        """(weight step, darts1's architecture step or None), each a function of the batch; with
        ``train.cuda_graph`` both are replayed from CUDA graphs sharing one memory pool."""
        weights = partial(weight_step, self.weights, loss_fn=pose_loss)
        arch = None
        if self.arch is not None:
            arch = partial(arch_step, self.arch, world_size=self.ctx.world_size, loss_fn=pose_loss)
        if not self.cfg.train.cuda_graph:
            return weights, arch
        capture = cuda_graph_capture(torch.cuda.graph_pool_handle())
        warmup = WARMUP_STEPS_DDP if self.ctx.distributed else WARMUP_STEPS
        self.log.info("train.cuda_graph: %d eager warm-up steps, then each step replays a CUDA graph", warmup)

        def graphed(step: Callable[[Any], None]) -> GraphedStep:
            return GraphedStep(step, self.ctx.device, warmup, capture)

        # (darts1: the architecture graph is captured and replayed before the weight graph, as it
        # runs first in every iteration; the order two graphs sharing a pool must keep)
        return graphed(weights), graphed(arch) if arch is not None else None

    def _step(self, batch: Any, arch_batch: Any | None) -> None:
        """darts1's architecture step on a held-out batch first, then the weight step."""
        if self.arch_step is not None:
            self.arch_step(arch_batch)
        if self.use_deepspeed:
            from pnfs.engine.deepspeed_engine import deepspeed_step

            held = self.arch_params if self.arch is not None else []
            deepspeed_step(self.engine, batch, self.weights.setup, self.record, held, pose_loss)
        else:
            self.weight_step(batch)

    def fit(self) -> dict[str, Any]:
        cfg, ctx, pos = self.cfg, self.ctx, self.state.position
        t = cfg.train
        self.model.train()
        self.bad_samples: list[dict] = []  # per epoch with any: pnfs.data.bad_samples.merge_rank_reports
        self.log.info(
            f"training {self.out_dir} on {ctx.world_size} process(es), device {ctx.device}, strategy "
            f"{cfg.search.strategy}, engine {self._engine_name()}, from epoch {pos.epoch} step "
            f"{pos.global_step}, restart {ctx.restart_count}"
        )
        arch_stream = self._arch_batches() if self.optimizers.arch is not None else None
        stopped = False
        while pos.epoch < t.epochs and not stopped:
            stopped = self._train_epoch(arch_stream)
            if stopped:
                break
            epoch_done = pos.epoch
            average_buffers(self.model, ctx.world_size)
            pos.epoch += 1
            pos.samples_seen = 0
            is_best = False
            if t.eval_every and ((epoch_done + 1) % t.eval_every == 0 or pos.epoch == t.epochs):
                metrics = self.evaluate()
                self.state.last_metrics = metrics
                score = metrics.get("score", -math.inf)
                is_best = score > self.state.best_score
                if is_best:
                    self.state.best_score = score
                self.log.info(
                    "epoch %d: %s%s",
                    epoch_done,
                    " ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
                    " (best)" if is_best else "",
                )
                self.scalars.add({f"val/{k}": v for k, v in metrics.items()}, pos.global_step)
            self.export_architecture(f"epoch-{epoch_done:03d}", epoch_done)
            self.save_checkpoint(is_best=is_best)
        if not stopped:
            self.export_final_architecture()
        digest = model_digest(self.model)
        # Every rank prints this line: tests compare the ranks' weights through it. One write of
        # line and newline together: the ranks share torchrun's stdout, and print() under
        # PYTHONUNBUFFERED=1 writes the newline separately, so two ranks' lines could run together.
        sys.stdout.write(
            f"[rank {ctx.rank}] {'stopped' if stopped else 'finished'}: global_step={pos.global_step} "
            f"epoch={pos.epoch} weights_sha256={digest} skipped_steps={self.guard.total}\n"
        )
        sys.stdout.flush()
        result = {
            "global_step": pos.global_step,
            "epoch": pos.epoch,
            "stopped": stopped,
            "weights_sha256": digest,
            "skipped_steps": self.guard.total,
            "metrics": self.state.last_metrics,
            "best_score": self.state.best_score,
            "bad_samples": self.bad_samples,
        }
        if ctx.is_main:
            (self.out_dir / "result.json").write_text(json.dumps(result, indent=1))
        self.scalars.close()
        return result

    def _train_epoch(self, arch_stream) -> bool:
        """Train until the epoch ends; True when ``train.stop_at_step`` stopped the run."""
        ctx, pos, t = self.ctx, self.state.position, self.cfg.train
        lr = self._set_lr(pos.epoch)
        loader = self._loader("train", pos.epoch, pos.samples_seen, shards=self.train_shards)
        steps_done = pos.samples_seen // (t.batch_size * ctx.world_size)
        total = len(loader) + steps_done
        if t.max_steps_per_epoch:
            total = min(total, t.max_steps_per_epoch)
        bar = None
        if ctx.is_main:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=steps_done, desc=f"epoch {pos.epoch}", mininterval=2, leave=False)
        window = Window()
        for batch in loader:
            if steps_done >= total:
                break
            self._step(batch, next(arch_stream) if arch_stream is not None else None)
            pos.samples_seen += len(batch) * ctx.world_size
            pos.global_step += 1
            steps_done += 1
            window.images += len(batch) * ctx.world_size
            if bar is not None:
                bar.update(1)
            stop = bool(t.stop_at_step) and pos.global_step == t.stop_at_step
            save = (
                bool(t.checkpoint_every) and pos.global_step % t.checkpoint_every == 0 and steps_done < total
            )
            if pos.global_step % t.log_every == 0 or steps_done == total or stop or save:
                self._read_window(window, lr, bar)  # the only host read of the device (may raise)
                window = Window()
            if stop:
                if bar is not None:
                    bar.close()
                self.save_checkpoint()
                self.log.info(
                    "stopped at step %d (train.stop_at_step); resume with --resume auto", pos.global_step
                )
                return True
            if save:
                self.save_checkpoint()
        if window.images:  # the loader ran out before ``total``
            self._read_window(window, lr, bar)
        if bar is not None:
            bar.close()
        own = loader.bad_samples.to_dict() if hasattr(loader, "bad_samples") else None
        bad = merge_rank_reports(all_gather_objects(own))  # every rank reaches this line
        if bad["total"]:
            self.bad_samples.append({"epoch": pos.epoch, **bad})
            self.log.warning(
                "epoch %d: %d bad samples dropped over all ranks %s", pos.epoch, bad["total"], bad["counts"]
            )
        return False

    def _read_window(self, window: Window, lr: float, bar) -> None:
        """Read the device's record of the steps since the last read, log it, let the guard act."""
        pos = self.state.position
        mean = self.record.read(step=pos.global_step, lr=lr, world_size=self.ctx.world_size)
        rate = window.images / max(time.perf_counter() - window.start, 1e-9)
        if bar is not None:
            bar.set_postfix(loss=f"{mean:.5f}", img_s=f"{rate:.1f}")
        self.log.info(
            "epoch %d step %d loss %.6f lr %.3g img/s %.1f", pos.epoch, pos.global_step, mean, lr, rate
        )
        self.scalars.add({"train/loss": mean, "train/lr": lr, "train/img_per_s": rate}, pos.global_step)


def run_training(
    cfg: Config, resume: str | None = None, deepspeed_config: str | None = None
) -> dict[str, Any]:
    """Set up the process group from the environment, train, tear down."""
    ctx = init_distributed(cfg.train.device, cuda_graph=cfg.train.cuda_graph)
    try:
        return Trainer(cfg, ctx, resume=resume, deepspeed_config=deepspeed_config).fit()
    finally:
        shutdown()
