"""Train / search PNFS: one process, DDP under torchrun (one node or many), or DeepSpeed.

    python launch/train.py --config pnfs/configs/demo.yaml
    torchrun --nproc_per_node=2 launch/train.py --config demo train.epochs=3
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        launch/train.py --config mpii_mobilenetv2_p3_256 --strategy darts1 --resume auto
    torchrun --nproc_per_node=2 launch/train.py --config demo --deepspeed launch/deepspeed_zero1.json

Options after the config are ``section.key=value`` overrides. The run folder
(``--out`` or ``train.out_dir``) receives config.yaml, train.log, checkpoints/,
tensorboard/, architecture/ and eval/.
"""

from __future__ import annotations

import argparse
import sys

from pnfs.config import ConfigError, load_config
from pnfs.engine.checkpoint import CheckpointError
from pnfs.engine.guard import NonFiniteLossError
from pnfs.engine.trainer import run_training


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file or preset name in pnfs/configs")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=5e-4")
    p.add_argument("--strategy", choices=["sync", "random", "darts1"], help="search.strategy")
    p.add_argument("--deepspeed", metavar="DS.json", help="train with DeepSpeed using this config")
    p.add_argument("--resume", metavar="auto|PATH", help="'auto': latest checkpoint of the run folder")
    p.add_argument("--out", metavar="DIR", help="run folder (train.out_dir)")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.strategy:
        overrides.append(f"search.strategy={args.strategy}")
    if args.out:
        overrides.append(f"train.out_dir={args.out}")
    try:
        cfg = load_config(args.config, overrides)
        run_training(cfg, resume=args.resume, deepspeed_config=args.deepspeed)
    except (ConfigError, CheckpointError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
