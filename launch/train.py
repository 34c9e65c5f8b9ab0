"""Train / search PNFS: one process, DDP under torchrun (one node or many), or DeepSpeed.

    python launch/train.py --config pnfs/configs/demo.yaml
    torchrun --nproc_per_node=2 launch/train.py --config demo train.epochs=3
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        launch/train.py --config mpii_mobilenetv2_p3_256 --strategy darts1 --resume auto
    torchrun --nproc_per_node=2 launch/train.py --config demo --deepspeed launch/deepspeed_zero1.json

Options after the config are ``section.key=value`` overrides. The run folder
(``--out`` or ``train.out_dir``) receives config.yaml, train.log, checkpoints/,
tensorboard/, architecture/ and eval/.

Before the first step a preflight (:mod:`pnfs.preflight`) checks shards, annotations, head
sizes, weights, the run folder and the batch arithmetic; any problem ends the run at once
with every problem listed and exit code 2. ``--check`` runs only the preflight, then prints
the plan (steps, global batch, learning rate, checkpoints, a measured wall-time estimate).
The estimate times real steps in the processes of this launch; ``--check --nproc N`` from a
single process plans and times N processes of this machine instead, by running the check
under ``torchrun --standalone --nproc_per_node=N`` with one intra-op thread per core and
process, as ``launch/demo.py`` runs the demo (``--check --nproc 2`` for the demo).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from pnfs.config import load_config
from pnfs.errors import PnfsUserError, PreflightFailed, report, run_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file or preset name in pnfs/configs")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=5e-4")
    p.add_argument("--strategy", choices=["sync", "random", "darts1"], help="search.strategy")
    p.add_argument("--deepspeed", metavar="DS.json", help="train with DeepSpeed using this config")
    p.add_argument("--resume", metavar="auto|PATH", help="'auto': latest checkpoint of the run folder")
    p.add_argument("--out", metavar="DIR", help="run folder (train.out_dir)")
    p.add_argument("--check", action="store_true", help="preflight and the run's plan only; trains nothing")
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="with --check: plan and time N processes of this machine (torchrun --nproc_per_node=N, "
        "as launch/demo.py trains); default: the processes of this launch",
    )
    return p.parse_intermixed_args(argv)


def check_under_torchrun(argv: list[str], nproc: int) -> int:
    """Run this ``--check`` again as ``nproc`` processes under torchrun, each with the threads a
    training process gets (:func:`pnfs.run_plan.threads_per_process`); returns its exit code."""
    from pnfs.run_plan import threads_per_process

    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_process(nproc))}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    # torchrun reads its own options out of the whole line: --nproc would be an ambiguous one
    rest = [a for i, a in enumerate(argv) if a != "--nproc" and (i == 0 or argv[i - 1] != "--nproc")]
    rest = [a for a in rest if not a.startswith("--nproc=")]
    return subprocess.run([*launcher, __file__, *rest], env=env).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.nproc is not None:
        launched = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        if not args.check:
            raise PnfsUserError("--nproc goes with --check; a training run takes its processes from torchrun")
        if args.nproc < 1:
            raise PnfsUserError(f"--nproc {args.nproc}: expected a process count >= 1")
        if "WORLD_SIZE" not in os.environ and args.nproc > 1:
            return check_under_torchrun(argv, args.nproc)
        if launched != args.nproc:
            raise PnfsUserError(
                f"--nproc {args.nproc}, but this launch runs {launched} process(es) per node; "
                "drop --nproc under torchrun"
            )
    overrides = list(args.overrides)
    if args.strategy:
        overrides.append(f"search.strategy={args.strategy}")
    if args.out:
        overrides.append(f"train.out_dir={args.out}")
    cfg = load_config(args.config, overrides)
    # imported after the config is known good: a typo costs no torch start-up
    from pnfs.engine.distributed import init_distributed, shutdown
    from pnfs.preflight import preflight
    from pnfs.process_group import barrier, broadcast_object

    ctx = init_distributed(cfg.train.device, cuda_graph=cfg.train.cuda_graph)
    try:
        problems = None
        if ctx.is_main:
            problems = preflight(cfg, world_size=ctx.world_size, deepspeed_config=args.deepspeed)
        problems = broadcast_object(problems)  # every rank exits together on rank 0's verdict
        if problems:
            # rank 0 prints before any rank exits: torchrun stops the others at the first exit
            code = report(PreflightFailed(problems))
            barrier()
            raise SystemExit(code)
        if args.check:
            return check(cfg, ctx, args.deepspeed)
    except BaseException:
        shutdown()
        raise
    from pnfs.engine.trainer import run_training

    run_training(cfg, resume=args.resume, deepspeed_config=args.deepspeed)
    return 0


def check(cfg, ctx, deepspeed_config: str | None) -> int:
    """``--check``: print the plan with a wall time measured from a few real steps."""
    import torch

    from pnfs.engine.distributed import shutdown
    from pnfs.run_plan import make_run_plan, time_steps

    try:
        plan = make_run_plan(cfg, ctx.world_size, deepspeed_config)
        plan.threads = torch.get_num_threads()
        plan.seconds_per_step, plan.timed_steps = time_steps(cfg, ctx, deepspeed_config)
    finally:
        shutdown()
    if ctx.is_main:
        print("preflight: ok")
        print("\n".join(plan.lines()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
