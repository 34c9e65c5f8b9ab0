"""The parts of a training/search run (docs/design.md §4): the model on its device, the
optimizers of the strategy, the DDP or DeepSpeed wrapper, checkpoints (find, load, save),
loaders, evaluation and the architecture exports. The loop is :mod:`pnfs.engine.trainer`.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pnfs.config import Config, ConfigError, config_to_dict, dump_config
from pnfs.engine import checkpoint as ckpt
from pnfs.engine.architecture import architecture_entropies, export_architecture
from pnfs.engine.compilation import compile_forward
from pnfs.engine.distributed import DistContext, wrap_ddp
from pnfs.engine.flat import FlatAdam
from pnfs.engine.guard import NonFiniteGuard
from pnfs.engine.runlog import Scalars, setup_logger
from pnfs.engine.runtime import amp_dtype, set_determinism
from pnfs.engine.schedule import learning_rate, set_learning_rate
from pnfs.engine.state import Position, RunState
from pnfs.engine.strategies import (
    build_optimizers,
    describe_optimizers,
    make_capturable,
    prepare_architecture,
    split_shards,
)
from pnfs.model import PoseNFS, build_model
from pnfs.model.backbones import load_pretrained_backbone
from pnfs.process_group import all_gather_objects, barrier, broadcast_object


class Run:
    """Owns the model, optimizers, checkpoints, loaders and run folder of one training/search run;
    :class:`pnfs.engine.trainer.Trainer` adds the loop."""

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
        check_cuda_graph(cfg, ctx.device, self.use_deepspeed)
        check_compile(cfg, self.use_deepspeed)
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
        self.optimizers = build_optimizers(
            model,
            cfg,
            fused_weights=not self.use_deepspeed,
            flat=cfg.train.flat_params and not self.use_deepspeed,
        )
        self.arch_params = [p for p in model.arch_parameters() if p.requires_grad]

        checkpoint = self._find_checkpoint(resume)
        if checkpoint is not None:
            self._load(checkpoint)
        else:  # a fresh start: the backbone's pretrained weights (a resume has them in the checkpoint)
            load_pretrained_backbone(model.backbone, cfg.model.backbone, self.log)
            torch.manual_seed(cfg.train.seed + 1000 * ctx.rank)
        if cfg.train.cuda_graph:
            for optimizer in (self.optimizers.weights, self.optimizers.arch):
                if optimizer is not None:
                    make_capturable(optimizer, ctx.device)

        if deepspeed_config is not None:
            self.engine = self._deepspeed_engine(deepspeed_config, checkpoint)
            self.forward_model: nn.Module = self.engine
        elif ctx.distributed:
            self.forward_model = wrap_ddp(model, ctx.device, for_cuda_graph=cfg.train.cuda_graph)
        else:
            self.forward_model = model
        if checkpoint is not None and len(checkpoint.get("rank_buffers") or []) == ctx.world_size:
            # each rank's own BatchNorm statistics, after the wrapper's start-up broadcast of rank 0's
            ckpt.load_buffers(model, checkpoint["rank_buffers"][ctx.rank])
        if isinstance(self.optimizers.weights, FlatAdam):  # loading and wrapping kept the views
            self.optimizers.weights.flat.check_views()
        if cfg.train.compile:  # cell by cell or whole; CUDA graphs on a GPU (docs/design.md §8)
            self.forward_model, compiled = compile_forward(
                self.forward_model, model, cfg.train.compile_scope, ctx.device
            )
            self.log.info(f"train.compile: {compiled}")
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
        from pnfs.data.shards.reader import expand_shards

        shards = expand_shards(self.cfg.data.train_shards, "train")
        weights, arch = split_shards(shards, self.cfg.search.arch_split)
        self.log.info("darts1: %d shards train the weights, %d the architecture", len(weights), len(arch))
        return weights, arch

    def _loader(self, split: str, epoch: int, samples_seen: int, shards: list[str] | None = None, **kw):
        """``samples_seen`` counts over all ranks; each rank skips its equal share."""
        from pnfs.data.loaders.build import build_loader

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
        set_learning_rate(self.optimizers.weights, lr)
        return lr

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, is_best: bool = False) -> Path | None:
        """Collective: gathers every rank's RNG state (and under DDP its BatchNorm statistics);
        rank 0 writes the file."""
        own_buffers = ckpt.floating_buffers(self.model) if self.ctx.distributed else None
        rng, rank_buffers = zip(*all_gather_objects((ckpt.capture_rng_state(), own_buffers)))
        pos = self.state.position
        path = ckpt.step_path(self.ckpt_dir, pos.global_step)
        if self.use_deepspeed:
            ds_dir = ckpt.deepspeed_dir(path)
            self.engine.save_checkpoint(str(ds_dir.parent), tag=ds_dir.name)
        if self.ctx.is_main:
            state = ckpt.new_checkpoint(
                model=ckpt.own_storage(self.model.state_dict()),
                optimizers={
                    "weights": None if self.use_deepspeed else ckpt.optimizer_state(self.optimizers.weights),
                    "arch": ckpt.optimizer_state(self.optimizers.arch) if self.optimizers.arch else None,
                },
                schedule={"epoch": pos.epoch, "lr": float(self.optimizers.weights.param_groups[0]["lr"])},
                position=pos.state_dict(),
                rng=list(rng),
                rank_buffers=list(rank_buffers) if self.ctx.distributed else None,
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
        """Rank 0: ``architecture/<stem>.json`` and ``.png``, and the alpha/beta entropies to TensorBoard
        (nothing for a model without alpha/beta: a Table VI baseline)."""
        if self.ctx.is_main and isinstance(self.model, PoseNFS) and self.model.arch_parameters():
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


def check_cuda_graph(cfg: Config, device: torch.device, use_deepspeed: bool) -> None:
    """ConfigError naming ``train.cuda_graph`` when this process cannot capture its step: not on
    CUDA (``train.device=auto`` found no GPU), or under DeepSpeed, which owns its step."""
    if not cfg.train.cuda_graph:
        return
    if device.type != "cuda":
        raise ConfigError(f"train.cuda_graph: true needs a CUDA device; this process runs on {device}")
    if use_deepspeed:
        raise ConfigError(
            "train.cuda_graph: true is not available with --deepspeed (DeepSpeed owns the step)"
        )


def check_compile(cfg: Config, use_deepspeed: bool) -> None:
    """ConfigError naming ``train.compile`` under DeepSpeed: its engine runs the forward and the
    backward of the step itself, so a compiled forward model would never be called."""
    if cfg.train.compile and use_deepspeed:
        raise ConfigError("train.compile: true is not available with --deepspeed (DeepSpeed owns the step)")
