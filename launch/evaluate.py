"""Evaluate a checkpoint: COCO keypoint AP or MPII PCKh, on one process or many.

    torchrun --nproc_per_node 2 launch/evaluate.py --config CFG --checkpoint CKPT \
        --data 'shards/val-*.tar' [--detections D.json --images DIR] [--no-flip] [--out DIR] [key=value ...]

Inference is sharded across ranks (gloo on CPU, NCCL on GPU) and gathered on rank 0, which
prints the metrics and, with --out, writes metrics.json, results.json and overlays/*.png.
Boxes: the shards' own (ground truth, or a detector's when the shards were written with
``shard_coco.py --detections``), or --detections D.json on the original images of --images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pnfs.config import ConfigError
from pnfs.errors import PreflightFailed, report, run_main
from pnfs.evaluate import strict_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) or a bare state dict")
    p.add_argument("--config", default=None, help="config YAML or preset (default: the checkpoint's own)")
    p.add_argument(
        "--data", default=None, help="val shards (pattern, brace list or folder); default data.val_shards"
    )
    p.add_argument("--annotations", default=None, help="ground truth; default data.val_annotations")
    p.add_argument("--detections", default=None, help="COCO detection-result json (person boxes)")
    p.add_argument(
        "--images",
        default=None,
        help="original images (needed with --detections; with --out, overlays on them)",
    )
    p.add_argument("--no-flip", action="store_true", help="no flip test")
    p.add_argument(
        "--hrnet-compat", action="store_true", help="MPII: compute 'Mean@0.1' at 0.11 like HRNet's code"
    )
    p.add_argument("--out", default=None, help="folder for metrics.json, results.json and overlays")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    return p.parse_args(argv)


def draw_on_originals(cfg, out: Path, images: str) -> list[Path]:
    """Skeletons of out/results.json on the first eval.overlays original images."""
    from pnfs.evaluate.boxes import image_files
    from pnfs.visualize import draw_results_on_images

    results = json.loads((out / "results.json").read_text())
    if cfg.data.dataset == "coco":
        names = image_files(cfg.data.val_annotations)
    else:  # MPII results carry the file name
        names = {int(r["image_id"]): r["image"] for r in results}
    joints = cfg.joints
    return draw_results_on_images(
        results, joints, images, names, out / "images", cfg.eval.overlays, cfg.eval.rescore_threshold
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # torch and the model after the arguments: --help and a mistyped flag answer at once
    import torch

    from pnfs.engine.distributed import init_distributed, shutdown
    from pnfs.engine.runlog import setup_logger
    from pnfs.evaluate import evaluate_model
    from pnfs.evaluate.boxes import BoxLoader, image_files
    from pnfs.evaluate.coco import load_detections
    from pnfs.evaluate.loading import load_for_inference
    from pnfs.process_group import barrier, broadcast_object

    overrides = list(args.overrides)
    if args.no_flip:
        overrides.append("eval.flip_test=false")
    if args.hrnet_compat:
        overrides.append("eval.hrnet_compat=true")
    if args.annotations:
        overrides.append(f"data.val_annotations={args.annotations}")
    if args.data:
        overrides.append(f"data.val_shards={args.data}")
    if args.detections:
        overrides.append(f"eval.detections={args.detections}")
    try:
        model, cfg = load_for_inference(args.checkpoint, args.config, overrides)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        return report(err)
    if cfg.eval.detections and not args.images:
        print("error: --detections needs --images DIR (the detector json holds boxes only)", file=sys.stderr)
        return 2
    ctx = init_distributed(args.device)
    setup_logger(None, ctx.rank)  # one logger per rank: INFO on rank 0, warnings from the others
    try:
        from pnfs.preflight import evaluation_problems

        problems = evaluation_problems(cfg, shards=not cfg.eval.detections) if ctx.is_main else None
        problems = broadcast_object(problems)  # every rank stops together on rank 0's verdict
        if problems:
            code = report(PreflightFailed(problems, "nothing was evaluated"))
            barrier()
            return code
        model = model.to(ctx.device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.eval.detections:
            boxes = load_detections(cfg.eval.detections, cfg.eval.det_score_threshold)
            loader = BoxLoader(
                boxes,
                image_files(cfg.data.val_annotations),
                args.images,
                tuple(cfg.data.input_size),
                cfg.eval.batch_size,
                cfg.joints.num_joints,
                cfg.data.margin,
                rank=ctx.rank,
                world_size=ctx.world_size,
            )
        else:
            from pnfs.data import build_loader

            if not cfg.data.val_shards:
                raise ConfigError("data.val_shards: no validation shards; give --data 'shards/val-*.tar'")
            loader = build_loader(cfg, "val", rank=ctx.rank, world_size=ctx.world_size)
        metrics = evaluate_model(
            model, loader, cfg, device=ctx.device, out_dir=args.out, rank=ctx.rank, world_size=ctx.world_size
        )
        if ctx.rank == 0:
            print(strict_json.dumps(metrics))
            if args.out:
                print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'results.json'}")
            if args.out and args.images:
                drawn = draw_on_originals(cfg, Path(args.out), args.images)
                print(f"wrote {len(drawn)} overlays on the original images to {Path(args.out) / 'images'}")
    except (ConfigError, ValueError, FileNotFoundError) as err:
        return report(err)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
