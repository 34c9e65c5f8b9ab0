"""Export a trained model: ONNX, TorchScript or a torch.export ExportedProgram.

    python launch/export.py --checkpoint CK [--config CFG] --format onnx|torchscript|exported-program
        --out FILE [--decode] [--flip] [--batch N|dynamic] [--prune-below W]

The exported network is the frozen model (:func:`pnfs.deploy.freeze`: BatchNorm, alpha and
beta folded in). Without ``--decode`` it maps ``images [N, 3, H, W]`` (normalised like the
loaders) to ``scores [N, K, H/4, W/4]``. With ``--decode`` it takes ``images`` and ``affine
[N, 2, 3]`` (input px -> original image px, as :func:`pnfs.inference.person_inputs` returns)
and returns ``keypoints [N, K, 2]`` in original-image pixels and ``scores [N, K]``: argmax, the
quarter offset (or ``eval.refine=gaussian``), the flip test with ``--flip``, back-projection.
The custom kernels export through their PyTorch references (``PNFS_KERNELS=torch``).
``--batch dynamic`` (default) leaves the batch size free; ``--batch N`` fixes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# torch and the model load after the arguments are parsed: --help and a mistyped flag answer at once
EXPORT_FORMATS = (
    "onnx",
    "torchscript",
    "exported-program",
)  # pnfs.deploy.EXPORT_FORMATS (a test keeps them equal)


def parse_batch(text: str) -> int | None:
    if text == "dynamic":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--batch {text!r}: expected a positive integer or 'dynamic'")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) or a bare state dict")
    p.add_argument("--config", default=None, help="config YAML or preset (default: the checkpoint's own)")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--out", required=True, help="output file (.onnx, .ts, .pt2)")
    p.add_argument("--decode", action="store_true", help="decode inside the graph: keypoints and scores")
    p.add_argument("--flip", action="store_true", help="flip test inside the graph (with --decode)")
    p.add_argument("--batch", type=parse_batch, default=None, help="batch size N or 'dynamic' (default)")
    p.add_argument(
        "--prune-below", type=float, default=0.0, help="drop ops whose softmax weight is below this"
    )
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from pnfs.config import ConfigError
    from pnfs.deploy import DecodingModel, count_ops, export_file, freeze, output_change
    from pnfs.evaluate.loading import load_for_inference

    try:
        if args.flip and not args.decode:
            raise ValueError("--flip needs --decode (the flip test averages score maps inside the graph)")
        model, cfg = load_for_inference(args.checkpoint, args.config, args.overrides)
        frozen = freeze(model, prune_below=args.prune_below)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    h, w = cfg.data.input_size
    n = args.batch or 2
    torch.manual_seed(0)
    images = torch.randn(n, 3, h, w)
    if args.prune_below > 0:
        change = output_change(model, frozen, images)
        print(
            f"pruned below {args.prune_below}: {count_ops(frozen)} of {count_ops(model)} ops kept; "
            f"score change on random inputs: max {change['max_abs']:.2e}, mean {change['mean_abs']:.2e}, "
            f"argmax moved for {100 * change['argmax_moved']:.1f}% of the joints"
        )
    if args.decode:
        joints = cfg.joints
        module = DecodingModel(
            frozen, joints.flip_permutation() if args.flip else None, cfg.eval.flip_shift, cfg.eval.refine
        ).eval()
        affine = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(n, 2, 3).contiguous()
        inputs, names = (images, affine), ["images", "affine"]
    else:
        module, inputs, names = frozen, (images,), ["images"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    export_file(module, inputs, names, args.format, out, dynamic=args.batch is None)
    batch = "dynamic" if args.batch is None else str(args.batch)
    print(f"wrote {out} ({args.format}, inputs {names} of batch {batch}, {h}x{w}, decode={args.decode})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
