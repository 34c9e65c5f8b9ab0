"""The training/search loop behind ``launch/train.py`` (DDP or DeepSpeed, one node or many).

One iteration on a batch of images x and Gaussian targets y (DESIGN §1):

    loss = pose_loss(model(x), y, w)                      # weighted MSE of the score maps
    sync:    (w, alpha, beta) <- Adam step on grad_{w,alpha,beta} loss
    random:  w <- Adam step on grad_w loss                (alpha, beta frozen at N(0, 1))
    darts1:  (alpha, beta) <- Adam_arch step on grad_{alpha,beta} loss(held-out batch)
             w <- Adam step on grad_w loss(training batch)

The learning rate is a pure function of the epoch (:func:`pnfs.engine.schedule.learning_rate`).
Where the run stands is (epoch, samples seen in the epoch, global step); with the RNG states
of every rank and the optimizer states this is the whole resume dict, so a run stopped at
any step and resumed ends bitwise where an uninterrupted run ends (CPU, deterministic).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pnfs.config import Config, config_to_dict, dump_config
from pnfs.data.targets import gaussian_targets
from pnfs.engine import checkpoint as ckpt
from pnfs.engine.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_distributed,
    shutdown,
)
from pnfs.engine.export import architecture_entropies, export_architecture
from pnfs.engine.guard import NonFiniteGuard
from pnfs.engine.runlog import Scalars, setup_logger
from pnfs.engine.schedule import learning_rate
from pnfs.engine.strategies import build_optimizers, describe_optimizers, prepare_architecture, split_shards
from pnfs.loss import pose_loss
from pnfs.model import build_model
from pnfs.model.backbones import load_pretrained_backbone


@dataclass
class Position:
    """Where the run stands: the next sample to read is sample ``samples_seen`` (counted over
    all ranks) of epoch ``epoch``; ``global_step`` optimizer steps were taken so far."""

    epoch: int = 0
    samples_seen: int = 0
    global_step: int = 0
    arch_epoch: int = 0  # darts1: the held-out stream's own epoch and position
    arch_samples_seen: int = 0

    def state_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class RunState:
    """What a checkpoint carries besides tensors: the position, the best score, the last metrics."""

    position: Position = field(default_factory=Position)
    best_score: float = -math.inf
    last_metrics: dict[str, float] = field(default_factory=dict)


def set_determinism(cfg: Config) -> None:
    """``train.deterministic``: deterministic kernels (bitwise resume); else cuDNN autotuning on GPU."""
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (``train.amp`` auto or bf16); fp32 on CPU unless bf16 is asked for."""
    if cfg.train.amp == "none":
        return None
    if cfg.train.amp == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return None


def model_digest(model: nn.Module) -> str:
    """sha256 over every tensor of the state dict (names and bytes): equal iff bitwise equal."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def batch_loss(
    model: nn.Module, batch: Any, cfg: Config, device: torch.device, dtype: torch.dtype | None
) -> torch.Tensor:
    """pose_loss(model(image), gaussian_targets(keypoints)) of one PoseBatch."""
    images = batch.image.to(device, non_blocking=True)
    if cfg.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    with ctx:
        scores = model(images)
    h, w = scores.shape[-2:]
    targets, weights = gaussian_targets(batch.keypoints.to(device, non_blocking=True), (h, w), cfg.data.sigma)
    return pose_loss(scores.float(), targets, weights)


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """All-reduce mean of ``p.grad`` (used for the architecture step, which bypasses DDP)."""
    if world_size == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world_size)


def average_buffers(model: nn.Module, world_size: int) -> None:
    """All-reduce mean of the floating-point buffers (BatchNorm running statistics).

    DDP broadcasts rank 0's buffers at every forward, so between epochs the ranks' running
    statistics differ by the last batch; averaging them at the end of each epoch gives every
    rank (and the evaluation) the same model, with statistics from all ranks' data."""
    if world_size == 1:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(world_size)


def _global_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to ``max_norm`` (0: no clipping) and return the total norm before clipping."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else math.inf)


class Trainer:
    """Owns the model, optimizers, loaders and run folder of one training/search run."""

    def __init__(
        self,
        cfg: Config,
        ctx: DistContext,
        resume: str | None = None,
        deepspeed_config: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.arch_dir = self.out_dir / "architecture"
        self.log = setup_logger(self.out_dir, ctx.rank)
        self.dtype = amp_dtype(cfg, ctx.device)
        self.state = RunState()
        self.last_export: list[Path] = []  # files of this process's latest architecture export
        self.guard = NonFiniteGuard(cfg.train.max_bad_steps)
        self.use_deepspeed = deepspeed_config is not None
        set_determinism(cfg)

        # identical initial weights on every rank: the model is drawn from train.seed
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg)
        prepare_architecture(model, cfg)
        model.to(ctx.device)
        if cfg.train.channels_last and not self.use_deepspeed:
            # (DeepSpeed broadcasts parameters as byte views, which needs contiguous NCHW weights)
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizers = build_optimizers(model, cfg)
        self.arch_params = [p for p in model.arch_parameters() if p.requires_grad]

        checkpoint = self._find_checkpoint(resume)
        if checkpoint is not None:
            self._load(checkpoint)
        else:  # a fresh start: the backbone's pretrained weights (a resume has them in the checkpoint)
            load_pretrained_backbone(model.backbone, cfg.model.backbone, self.log)
            torch.manual_seed(cfg.train.seed + 1000 * ctx.rank)

        if self.use_deepspeed:
            self.engine = self._deepspeed_engine(deepspeed_config, checkpoint)
            self.forward_model: nn.Module = self.engine
        elif ctx.distributed:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.forward_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        else:
            self.forward_model = model
        if cfg.train.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.log.info(describe_optimizers(model, cfg, self._weight_optimizer_parameters()))

        self.train_shards, self.arch_shards = self._training_shards()
        self.scalars = Scalars(self.out_dir / "tensorboard", enabled=ctx.is_main)
        if ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out_dir / "config.yaml")

    # ------------------------------------------------------------------ setup helpers

    def _weight_optimizer_parameters(self) -> list[nn.Parameter]:
        if self.use_deepspeed:
            from pnfs.engine.deepspeed_engine import optimized_parameters

            return optimized_parameters(self.engine)
        return [p for g in self.optimizers.weights.param_groups for p in g["params"]]

    def _find_checkpoint(self, resume: str | None) -> dict[str, Any] | None:
        """Rank 0 picks the file (``--resume auto|PATH``); every rank reads and checks it."""
        if self.ctx.is_main:
            for stale in ckpt.remove_temporaries(self.ckpt_dir):
                self.log.info("removed %s, left by a writer that was killed", stale.name)
        path = ckpt.resolve_resume(resume, self.ckpt_dir) if self.ctx.is_main else None
        path = broadcast_object(str(path) if path else None)
        if path is None:
            if resume:
                self.log.info("resume %s: no checkpoint in %s yet, starting fresh", resume, self.ckpt_dir)
            return None
        loaded = ckpt.load_checkpoint(path, map_location="cpu")
        saved_model = loaded["config"].get("model")
        if saved_model != config_to_dict(self.cfg)["model"]:
            raise ckpt.CheckpointError(
                f"checkpoint {path} was written for another model config ({saved_model}); "
                "pass the same --config/model.* settings or another --resume"
            )
        self.log.info("resuming from %s (%s)", path, loaded["position"])
        loaded["path"] = path
        return loaded

    def _load(self, loaded: dict[str, Any]) -> None:
        self.model.load_state_dict(loaded["model"])
        if not self.use_deepspeed:
            self.optimizers.weights.load_state_dict(loaded["optimizers"]["weights"])
        if self.optimizers.arch is not None:
            self.optimizers.arch.load_state_dict(loaded["optimizers"]["arch"])
        self.state.position = Position(**loaded["position"])
        self.state.best_score = float(loaded.get("best_score", -math.inf))
        self.state.last_metrics = dict(loaded.get("metrics", {}))
        self.guard.load_state_dict(loaded.get("guard", {"consecutive": 0, "total": 0}))
        rng = loaded["rng"]
        if len(rng) == self.ctx.world_size:
            ckpt.restore_rng_state(rng[self.ctx.rank])
        else:
            self.log.warning(
                "checkpoint has RNG states of %d ranks, this run has %d: reseeding (not an exact resume)",
                len(rng),
                self.ctx.world_size,
            )
            torch.manual_seed(self.cfg.train.seed + 1000 * self.ctx.rank + self.state.position.global_step)

    def _deepspeed_engine(self, config_path: str, loaded: dict[str, Any] | None):
        from pnfs.engine.deepspeed_engine import initialize_deepspeed

        engine = initialize_deepspeed(self.model, self.optimizers.weights, self.cfg, config_path, self.ctx)
        if loaded is not None:
            ds_dir = ckpt.deepspeed_dir(Path(loaded["path"]))
            engine.load_checkpoint(
                str(ds_dir.parent), tag=ds_dir.name, load_module_only=False, load_lr_scheduler_states=False
            )
        self.optimizers.weights = engine.optimizer
        return engine

    def _training_shards(self) -> tuple[list[str] | None, list[str] | None]:
        """darts1 splits the training shards ``search.arch_split``; other strategies use all."""
        if self.cfg.search.strategy != "darts1":
            return None, None
        from pnfs.data.shards import expand_shards

        shards = expand_shards(self.cfg.data.train_shards, "train")
        weights, arch = split_shards(shards, self.cfg.search.arch_split)
        self.log.info("darts1: %d shards train the weights, %d the architecture", len(weights), len(arch))
        return weights, arch

    def _loader(self, split: str, epoch: int, samples_seen: int, shards: list[str] | None = None, **kw):
        """``samples_seen`` counts over all ranks; each rank skips its equal share."""
        from pnfs.data.loader import build_loader

        return build_loader(
            self.cfg,
            split,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            epoch=epoch,
            start_sample=samples_seen // self.ctx.world_size,
            shards=shards,
            **kw,
        )

    # ------------------------------------------------------------------ steps

    def _set_lr(self, epoch: int) -> float:
        t = self.cfg.train
        lr = learning_rate(epoch, t.lr, t.lr_milestones, t.lr_factor)
        for group in self.optimizers.weights.param_groups:
            group["lr"] = lr
        return lr

    def _losses_finite(self, loss: torch.Tensor) -> tuple[bool, float]:
        """(every rank's loss is finite, mean loss over ranks) — the same on all ranks."""
        total = all_reduce_sum([loss.detach().float().item()], self.ctx.device)[0]
        return math.isfinite(total), total / self.ctx.world_size

    def _arch_step(self, batch: Any, lr: float) -> float:
        """darts1: one Adam_arch step on grad_{alpha,beta} of the held-out batch's loss.

        Runs the bare module (no DDP reduction of the weight gradients) and all-reduces only
        the architecture gradients."""
        module = self.engine.module if self.use_deepspeed else self.model
        loss = batch_loss(module, batch, self.cfg, self.ctx.device, self.dtype)
        finite, mean_loss = self._losses_finite(loss)
        grads = torch.autograd.grad(loss, self.arch_params, allow_unused=True)
        for p, g in zip(self.arch_params, grads):
            p.grad = g
        average_gradients(self.arch_params, self.ctx.world_size)
        norm = _global_norm(self.arch_params, self.cfg.train.grad_clip)
        ok = self.guard.check(
            finite and bool(torch.isfinite(norm)),
            step=self.state.position.global_step,
            what="architecture step",
            loss=mean_loss,
            lr=lr,
        )
        if ok:
            self.optimizers.arch.step()
        for p in self.arch_params:
            p.grad = None
        return mean_loss

    def _weight_step(self, batch: Any, lr: float) -> float:
        """One step of the weight optimizer (alpha/beta included under ``sync``)."""
        loss = batch_loss(self.forward_model, batch, self.cfg, self.ctx.device, self.dtype)
        finite, mean_loss = self._losses_finite(loss)
        if self.use_deepspeed:
            if self.guard.check(
                finite, step=self.state.position.global_step, what="weight step", loss=mean_loss, lr=lr
            ):
                self.engine.backward(loss)
                self.engine.step()
            for p in self.arch_params if self.optimizers.arch is not None else ():
                p.grad = None  # darts1: DeepSpeed leaves alone the grads of tensors it does not optimize
            return mean_loss
        loss.backward()
        params = [p for g in self.optimizers.weights.param_groups for p in g["params"]]
        norm = _global_norm(params, self.cfg.train.grad_clip)
        ok = self.guard.check(
            finite and bool(torch.isfinite(norm)),
            step=self.state.position.global_step,
            what="weight step",
            loss=mean_loss,
            lr=lr,
        )
        if ok:
            self.optimizers.weights.step()
        self.model.zero_grad(set_to_none=True)
        return mean_loss

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, is_best: bool = False) -> Path | None:
        """Collective: gathers every rank's RNG state; rank 0 writes the file."""
        rng = all_gather_objects(ckpt.capture_rng_state())
        pos = self.state.position
        path = ckpt.step_path(self.ckpt_dir, pos.global_step)
        if self.use_deepspeed:
            ds_dir = ckpt.deepspeed_dir(path)
            self.engine.save_checkpoint(str(ds_dir.parent), tag=ds_dir.name)
        if self.ctx.is_main:
            state = ckpt.new_checkpoint(
                model=self.model.state_dict(),
                optimizers={
                    "weights": None if self.use_deepspeed else self.optimizers.weights.state_dict(),
                    "arch": self.optimizers.arch.state_dict() if self.optimizers.arch else None,
                },
                schedule={"epoch": pos.epoch, "lr": self.optimizers.weights.param_groups[0]["lr"]},
                position=pos.state_dict(),
                rng=rng,
                config=config_to_dict(self.cfg),
                metrics=dict(self.state.last_metrics),
                best_score=self.state.best_score,
                guard=self.guard.state_dict(),
                world_size=self.ctx.world_size,
            )
            ckpt.atomic_save(state, path)
            if is_best:
                ckpt.atomic_save(state, self.ckpt_dir / ckpt.BEST_FILE)
            for old in ckpt.prune_step_checkpoints(self.ckpt_dir, self.cfg.train.keep_last):
                self.log.info("removed old checkpoint %s", old.name)
        barrier()
        return path if self.ctx.is_main else None

    # ------------------------------------------------------------------ evaluation/export

    def evaluate(self) -> dict[str, float]:
        from pnfs.evaluate import evaluate_model

        loader = self._loader("val", 0, 0, augment=False, batch_size=self.cfg.eval.batch_size)
        self.model.eval()
        try:
            metrics = evaluate_model(
                self.model,
                loader,
                self.cfg,
                device=self.ctx.device,
                out_dir=self.out_dir / "eval",
                rank=self.ctx.rank,
                world_size=self.ctx.world_size,
            )
        finally:
            self.model.train()
        metrics = broadcast_object(metrics)  # computed on rank 0 only
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

    def export_architecture(self, stem: str, epoch: int | None) -> None:
        """Rank 0: ``architecture/<stem>.json`` and ``.png``, and the alpha/beta entropies to TensorBoard."""
        if self.ctx.is_main:
            arch = self.model.architecture()
            self.last_export = export_architecture(arch, self.arch_dir, stem, epoch)
            ent = architecture_entropies(arch)
            self.scalars.add(
                {f"arch/entropy_{k}": v for k, v in ent.items()}, self.state.position.global_step
            )

    def export_final_architecture(self) -> None:
        """``architecture/final.*``: a copy of the last epoch's export (the weights have not moved
        since), or a fresh one when this process exported nothing (a finished run resumed)."""
        if not self.ctx.is_main:
            return
        if not self.last_export:
            self.export_architecture("final", self.state.position.epoch - 1)
            return
        for path in self.last_export:
            shutil.copyfile(path, path.with_name("final" + path.suffix))

    # ------------------------------------------------------------------ loop

    def _arch_batches(self):
        """darts1: an endless stream of held-out batches that resumes where it stopped."""
        pos = self.state.position
        while True:
            loader = self._loader("train", pos.arch_epoch, pos.arch_samples_seen, shards=self.arch_shards)
            for batch in loader:
                pos.arch_samples_seen += len(batch) * self.ctx.world_size
                yield batch
            pos.arch_epoch += 1
            pos.arch_samples_seen = 0

    def _engine_name(self) -> str:
        if self.use_deepspeed:
            return f"deepspeed (ZeRO stage {self.engine.zero_optimization_stage()})"
        return "ddp" if self.ctx.distributed else "single process"

    def fit(self) -> dict[str, Any]:
        cfg, ctx, pos = self.cfg, self.ctx, self.state.position
        t = cfg.train
        self.model.train()
        self.log.info(
            "training %s on %d process(es), device %s, strategy %s, engine %s, "
            "from epoch %d step %d, restart %d",
            self.out_dir,
            ctx.world_size,
            ctx.device,
            cfg.search.strategy,
            self._engine_name(),
            pos.epoch,
            pos.global_step,
            ctx.restart_count,
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
        # every rank prints this line: tests compare the ranks' weights through it
        print(
            f"[rank {ctx.rank}] {'stopped' if stopped else 'finished'}: global_step={pos.global_step} "
            f"epoch={pos.epoch} weights_sha256={digest} skipped_steps={self.guard.total}",
            flush=True,
        )
        result = {
            "global_step": pos.global_step,
            "epoch": pos.epoch,
            "stopped": stopped,
            "weights_sha256": digest,
            "skipped_steps": self.guard.total,
            "metrics": self.state.last_metrics,
            "best_score": self.state.best_score,
        }
        if ctx.is_main:
            (self.out_dir / "result.json").write_text(json.dumps(result, indent=1))
        self.scalars.close()
        return result

    def _train_epoch(self, arch_stream) -> bool:
        """Train until the epoch ends; True when ``train.stop_at_step`` stopped the run."""
        cfg, ctx, pos = self.cfg, self.ctx, self.state.position
        t = cfg.train
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
        window_images, window_start, window_loss, window_steps = 0, time.perf_counter(), 0.0, 0
        for batch in loader:
            if steps_done >= total:
                break
            if arch_stream is not None:
                self._arch_step(next(arch_stream), cfg.search.arch_lr)
            loss = self._weight_step(batch, lr)
            pos.samples_seen += len(batch) * ctx.world_size
            pos.global_step += 1
            steps_done += 1
            window_images += len(batch) * ctx.world_size
            window_loss += loss
            window_steps += 1
            if bar is not None:
                bar.update(1)
            if pos.global_step % t.log_every == 0 or steps_done == total:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                rate = window_images / elapsed
                mean = window_loss / max(1, window_steps)
                if bar is not None:
                    bar.set_postfix(loss=f"{mean:.5f}", img_s=f"{rate:.1f}")
                self.log.info(
                    "epoch %d step %d loss %.6f lr %.3g img/s %.1f",
                    pos.epoch,
                    pos.global_step,
                    mean,
                    lr,
                    rate,
                )
                self.scalars.add(
                    {"train/loss": mean, "train/lr": lr, "train/img_per_s": rate}, pos.global_step
                )
                window_images, window_start, window_loss, window_steps = 0, time.perf_counter(), 0.0, 0
            if t.stop_at_step and pos.global_step == t.stop_at_step:
                if bar is not None:
                    bar.close()
                self.save_checkpoint()
                self.log.info(
                    "stopped at step %d (train.stop_at_step); resume with --resume auto", pos.global_step
                )
                return True
            if t.checkpoint_every and pos.global_step % t.checkpoint_every == 0 and steps_done < total:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        return False


def run_training(
    cfg: Config, resume: str | None = None, deepspeed_config: str | None = None
) -> dict[str, Any]:
    """Set up the process group from the environment, train, tear down."""
    ctx = init_distributed(cfg.train.device)
    try:
        return Trainer(cfg, ctx, resume=resume, deepspeed_config=deepspeed_config).fit()
    finally:
        shutdown()
