"""Everything a run needs, checked in its first seconds instead of after its first epoch.

    problems = preflight(cfg, world_size=2, deepspeed_config="launch/deepspeed_zero1.json")
    if problems: raise PreflightFailed(problems)   # one line each: key, value, what to do

``launch/train.py`` runs :func:`preflight` on rank 0 before the first step and shares the
verdict, so every rank exits together (exit code 2, no traceback); ``launch/evaluate.py``
runs the evaluation part (:func:`evaluation_problems`). Each check returns a list of
problems and never raises for bad input, so one run lists all of them at once:

* train and val shards exist (local files; a URL: its first shard opens with
  ``webdataset.gopen``), their ``manifest.json`` agrees with the config (sizes and sample
  counts, joint set, crop coverage of ``data.margin`` x ``data.scale_range`` and the aspect
  of ``data.input_size``: a crop that cannot hold the augmentation is an error here);
* the val annotations parse and are of ``data.dataset``'s kind; MPII has head sizes (boxes
  in the annotations, or ``data.val_head_sizes``: json or HRNet's ``gt_valid.mat``); COCO
  annotations hold every image of the val shards (not, say, the train file);
* ``eval.detections`` parses when given; ``model.backbone.weights`` loads when it is a file
  (``imagenet`` / ``none`` are resolved when training starts);
* the run folder is writable with room for ``train.keep_last`` + 1 checkpoints
  (:func:`checkpoint_bytes`);
* the DeepSpeed json parses and its batch fields agree with ``train.batch_size`` and the
  world size; the per-rank batch and world size give at least one step per epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pnfs.config import Config

COVERAGE_TOLERANCE = 1e-6


def problem(key: str, value: Any, what: str, fix: str) -> str:
    """One line: ``key=value: what; fix``."""
    return f"{key}={value!r}: {what}; {fix}"


# --------------------------------------------------------------------------- shards


@dataclass
class ShardFacts:
    """What the preflight learnt about one split's shards (``counts`` None for URLs)."""

    paths: list[str]
    counts: list[int] | None


def _open_first_url(url: str) -> str | None:
    import webdataset

    try:
        with webdataset.gopen(url, "rb") as stream:
            stream.read(512)
    except Exception as err:  # any transport: http, gs, pipe
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


def _manifest_split(paths: list[str]) -> tuple[Path, dict] | None:
    manifest = Path(paths[0]).parent / "manifest.json"
    try:
        splits = json.loads(manifest.read_text()).get("splits", {})
    except (OSError, ValueError, AttributeError):
        return None
    name = Path(paths[0]).name.rsplit("-", 1)[0]
    return (manifest, splits[name]) if isinstance(splits.get(name), dict) else None


def coverage_problems(cfg: Config, key: str, manifest: Path, options: dict) -> list[str]:
    """Can the shards' crops hold every augmented input?

    A crop holds the region around the person box enlarged by ``margin`` x ``max_scale`` for
    input aspects in ``aspect_range`` (:func:`pnfs.data.geometry.reachable_region`); training
    reaches ``data.margin`` x ``data.scale_range[1]`` at aspect W/H of ``data.input_size``."""
    d, out = cfg.data, []
    margin, max_scale = options.get("margin"), options.get("max_scale")
    if margin is not None and max_scale is not None:
        reach, held = d.margin * d.scale_range[1], float(margin) * float(max_scale)
        if reach > held * (1 + COVERAGE_TOLERANCE):
            out.append(
                problem(
                    "data.scale_range",
                    d.scale_range,
                    f"with data.margin={d.margin} the augmentation reaches {reach:.3g} x the box, but the "
                    f"crops of {key}'s shards ({manifest}) hold margin {margin} x max_scale {max_scale} "
                    f"= {held:.3g}",
                    "lower data.scale_range / data.margin or re-shard with "
                    f"--max-scale {reach / float(margin):.3g}",
                )
            )
    aspect = options.get("aspect_range")
    if aspect is not None:
        h, w = d.input_size
        lo, hi = float(aspect[0]), float(aspect[1])
        if not lo * (1 - COVERAGE_TOLERANCE) <= w / h <= hi * (1 + COVERAGE_TOLERANCE):
            out.append(
                problem(
                    "data.input_size",
                    d.input_size,
                    f"input aspect W/H={w / h:.3g} lies outside the crops' aspect range {lo}..{hi} of "
                    f"{key}'s shards ({manifest})",
                    f"re-shard with --aspect-range covering {w / h:.3g}",
                )
            )
    return out


def shard_problems(cfg: Config, split: str) -> tuple[list[str], ShardFacts | None]:
    """Problems of ``data.<split>_shards`` and, when they exist, what they hold."""
    from pnfs.data.shards.manifest import check_manifest
    from pnfs.data.shards.reader import expand_shards, is_url

    key = f"data.{split}_shards"
    spec = getattr(cfg.data, f"{split}_shards")
    if not spec:
        return [
            problem(key, spec, "is empty", f"give the {split} shards (a folder, brace pattern or URL)")
        ], None
    try:
        paths = expand_shards(spec, split)
    except (OSError, ValueError) as err:
        return [
            problem(key, spec, str(err), "fix the path (shard with data_prep/shard_coco.py or shard_mpii.py)")
        ], None
    if is_url(paths[0]):
        why = _open_first_url(paths[0])
        if why is not None:
            return [
                problem(key, spec, f"the first shard {paths[0]} does not open ({why})", "fix the URL")
            ], None
        return [], ShardFacts(paths, None)
    # A shard cut short or changed since sharding costs only its bad samples under
    # data.on_error=skip (the loader names and counts them); it stops the run only under raise.
    out = (
        [
            problem(key, spec, p, "re-shard or copy the shards again")
            for p in check_manifest(paths, verify=False)
        ]
        if cfg.data.on_error == "raise"
        else []
    )
    from pnfs.data.shards.reader import read_index

    try:
        counts = [len(read_index(Path(p))) for p in paths]
    except Exception as err:  # a tar whose headers do not parse
        out.append(problem(key, spec, f"a shard cannot be indexed ({err})", "re-shard it"))
        counts = None
    found = _manifest_split(paths)
    if found is not None:
        manifest, entry = found
        joint_set = entry.get("joint_set")
        want = cfg.joints.name
        if joint_set is not None and joint_set != want:
            out.append(
                problem(
                    key,
                    spec,
                    f"the shards hold joint set {joint_set!r} ({manifest}), the config trains {want!r} "
                    f"(data.dataset={cfg.data.dataset!r}, data.keypoints={cfg.data.keypoints!r})",
                    "point at shards of the configured dataset or fix data.dataset / data.keypoints",
                )
            )
        out += coverage_problems(cfg, key, manifest, entry.get("options", {}))
    return out, ShardFacts(paths, counts)


# --------------------------------------------------------------------------- annotations


def annotation_problems(cfg: Config) -> list[str]:
    """The val annotations parse, are of ``data.dataset``'s kind, and MPII has head sizes."""
    d = cfg.data
    key, path = "data.val_annotations", d.val_annotations
    if not path:
        return [problem(key, path, "is empty", "give the validation annotations")]
    if not Path(path).is_file():
        return [problem(key, path, "no such file", "fix the path")]
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        return [problem(key, path, f"not readable JSON ({err})", "give the annotation json")]
    is_coco = isinstance(data, dict) and "annotations" in data and "images" in data
    is_mpii = isinstance(data, list)
    if d.dataset == "coco" and not is_coco:
        kind = "an MPII-style list of persons" if is_mpii else "not a COCO keypoint file"
        return [
            problem(
                key,
                path,
                f"is {kind}, but data.dataset='coco'",
                "give person_keypoints_val*.json or set data.dataset",
            )
        ]
    if d.dataset == "mpii":
        if not is_mpii:
            kind = "a COCO-style file" if is_coco else "not an MPII valid.json"
            return [
                problem(
                    key,
                    path,
                    f"is {kind}, but data.dataset='mpii'",
                    "give annot/valid.json or set data.dataset",
                )
            ]
        from pnfs.evaluate.mpii import load_mpii_ground_truth

        heads = d.val_head_sizes or None
        if heads is not None and not Path(heads).is_file():
            return [
                problem(
                    "data.val_head_sizes", heads, "no such file", "fix the path (HRNet's annot/gt_valid.mat)"
                )
            ]
        try:
            load_mpii_ground_truth(path, heads)
        except ValueError as err:
            if heads is None and "no head boxes" in str(err):
                return [
                    problem(
                        "data.val_head_sizes",
                        d.val_head_sizes,
                        f"MPII PCKh needs head sizes and {path} has no head boxes",
                        "set data.val_head_sizes to HRNet's annot/gt_valid.mat (or a head-size json)",
                    )
                ]
            return [problem("data.val_head_sizes" if heads else key, heads or path, str(err), "fix the file")]
    return []


def shard_image_ids(facts: ShardFacts) -> list[int]:
    """Image ids of every sample of local shards, from the sample keys ``<image_id>_<ann_id>``
    of their indexes."""
    from pnfs.data.shards.reader import read_index

    ids = []
    for path in facts.paths:
        for key, _ in read_index(Path(path)):
            head = key.split("_", 1)[0]
            if head.isdigit():
                ids.append(int(head))
    return ids


def annotation_match_problems(cfg: Config, facts: ShardFacts | None) -> list[str]:
    """COCO: every image of the val shards is in ``data.val_annotations`` (the file the metrics
    are scored against). A train file given with the val shards holds none of them."""
    if cfg.data.dataset != "coco" or facts is None or facts.counts is None:
        return []
    try:
        data = json.loads(Path(cfg.data.val_annotations).read_text())
        known = {int(image["id"]) for image in data["images"]}
        ids = shard_image_ids(facts)
    except (OSError, ValueError, KeyError, TypeError):
        return []  # annotation_problems and shard_problems name those
    missing = sorted({i for i in ids if i not in known})
    if not missing:
        return []
    absent = sum(1 for i in ids if i not in known)
    shown = ", ".join(map(str, missing[:3])) + (", ..." if len(missing) > 3 else "")
    return [
        problem(
            "data.val_annotations",
            cfg.data.val_annotations,
            f"{absent} of the {len(ids)} samples of data.val_shards={cfg.data.val_shards!r} show images "
            f"it does not have (image ids {shown})",
            "give the annotation file the val shards were written from (their manifest.json names it)",
        )
    ]


def detection_problems(cfg: Config) -> list[str]:
    """``eval.detections``: a COCO detection-result json (list of image_id, bbox, score)."""
    path = cfg.eval.detections
    if not path:
        return []
    key = "eval.detections"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return [problem(key, path, "no such file", "fix the path or leave it unset for ground-truth boxes")]
    except (OSError, ValueError) as err:
        return [problem(key, path, f"not readable JSON ({err})", "give a COCO detection-result json")]
    if not isinstance(data, list) or not all(
        isinstance(e, dict) and {"image_id", "bbox", "score"} <= set(e) for e in data
    ):
        return [
            problem(
                key, path, "is not a list of {image_id, bbox, score}", "give a COCO detection-result json"
            )
        ]
    return []


# --------------------------------------------------------------------------- model, run folder


def checkpoint_bytes(model) -> int:
    """Estimated bytes of one checkpoint: fp32 weights and buffers, plus Adam's two moments per
    trained parameter (darts1 trains the architecture with a second Adam, sync with the
    first: both count every parameter), plus 5% for the run state and pickling."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return int(1.05 * (params + buffers + 2 * trained))


def weights_problems(cfg: Config, model) -> list[str]:
    """A local ``model.backbone.weights`` file loads into the configured backbone."""
    weights = cfg.model.backbone.weights
    if weights in (None, "none", "imagenet"):
        return []
    from pnfs.model.backbones import load_backbone_weights

    try:
        load_backbone_weights(model.backbone, weights)
    except ValueError as err:
        return [str(err).replace("model.backbone.weights: ", f"model.backbone.weights={weights!r}: ", 1)]
    return []


def run_folder_problems(cfg: Config, model) -> list[str]:
    """``train.out_dir`` can be created and written, with room for keep_last + 1 checkpoints."""
    key, out = "train.out_dir", Path(cfg.train.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".preflight-"):
            pass
    except OSError as err:
        return [problem(key, str(out), f"not writable ({err.strerror or err})", "choose another --out")]
    need = (cfg.train.keep_last + 1) * checkpoint_bytes(model)
    free = shutil.disk_usage(out).free
    if free < need:
        return [
            problem(
                key,
                str(out),
                f"{free / 2**20:.0f} MiB free, {cfg.train.keep_last + 1} checkpoints "
                f"(train.keep_last={cfg.train.keep_last} + 1) need about {need / 2**20:.0f} MiB",
                "free disk space, choose another --out or lower train.keep_last",
            )
        ]
    return []


# --------------------------------------------------------------------------- batches


def deepspeed_problems(cfg: Config, path: str | None, world_size: int) -> list[str]:
    """The DeepSpeed json parses; stage 0/1; its batch fields agree with the config."""
    if path is None:
        return []
    key = "--deepspeed"
    try:
        ds = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return [problem(key, path, "no such file", "fix the path (e.g. launch/deepspeed_zero1.json)")]
    except (OSError, ValueError) as err:
        return [problem(key, path, f"not valid JSON ({err})", "fix the json")]
    if not isinstance(ds, dict):
        return [problem(key, path, "is not a JSON object", "fix the json")]
    out = []
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1):
        out.append(
            problem(
                key, path, f"zero_optimization.stage={stage!r}; pnfs supports 0 and 1", "use stage 0 or 1"
            )
        )
    accumulation = ds.get("gradient_accumulation_steps", 1) or 1
    micro = ds.get("train_micro_batch_size_per_gpu")
    if micro is not None and micro != cfg.train.batch_size:
        what = f"train_micro_batch_size_per_gpu={micro} but train.batch_size={cfg.train.batch_size}"
        out.append(problem(key, path, what, "drop the field (pnfs fills it) or make them equal"))
    total = ds.get("train_batch_size")
    want = cfg.train.batch_size * int(accumulation) * world_size
    if total is not None and total != want:
        what = (
            f"train_batch_size={total} but train.batch_size x gradient_accumulation_steps x world size "
            f"= {cfg.train.batch_size} x {accumulation} x {world_size} = {want}"
        )
        out.append(problem(key, path, what, "drop the field (pnfs fills it) or make them agree"))
    return out


def training_counts(cfg: Config, facts: ShardFacts) -> list[int]:
    """Sample counts of the shards that train the weights (darts1 holds some out)."""
    if cfg.search.strategy != "darts1":
        return list(facts.counts or [])
    from pnfs.engine.strategies import split_shards

    weights, _ = split_shards(facts.paths, cfg.search.arch_split)
    index = {p: n for p, n in zip(facts.paths, facts.counts or [])}
    return [index[p] for p in weights]


def steps_per_epoch(cfg: Config, counts: list[int], world_size: int) -> tuple[int, int]:
    """(samples, steps) of rank 0's training epoch, by the loader's own plan."""
    from pnfs.data.loaders.build import make_epoch_plan

    plan = make_epoch_plan(
        cfg, "train", counts, rank=0, world_size=world_size, epoch=0, start_sample=0,
        batch_size=cfg.train.batch_size, augment=False,
    )  # fmt: skip
    steps = len(plan)
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    return plan.num_samples, steps


def batch_problems(cfg: Config, facts: ShardFacts | None, world_size: int) -> list[str]:
    if facts is None or facts.counts is None:
        return []
    from pnfs.config import ConfigError

    try:
        counts = training_counts(cfg, facts)
        _, steps = steps_per_epoch(cfg, counts, world_size)
    except ConfigError as err:
        return [str(err)]
    except ValueError:  # the loader's plan refuses an epoch without a full batch per rank
        steps = 0
    if steps < 1:
        return [
            problem(
                "train.batch_size",
                cfg.train.batch_size,
                f"{sum(counts)} training samples over {world_size} process(es) give no full step per epoch",
                "lower train.batch_size or use fewer processes",
            )
        ]
    return []


# --------------------------------------------------------------------------- entry points


def evaluation_problems(cfg: Config, shards: bool = True) -> list[str]:
    """What an evaluation needs: val shards (not with detector boxes: ``shards=False``),
    annotations (+ MPII head sizes), detections."""
    out, facts = shard_problems(cfg, "val") if shards else ([], None)
    found = annotation_problems(cfg)
    out += found or annotation_match_problems(cfg, facts)
    return out + detection_problems(cfg)


def preflight(
    cfg: Config, *, world_size: int = 1, deepspeed_config: str | None = None, evaluates: bool | None = None
) -> list[str]:
    """All problems a training run would meet, one line each (empty: ready to train).

    ``evaluates`` (default: ``train.eval_every > 0``) adds the evaluation's needs."""
    from pnfs.model import build_model

    out, facts = shard_problems(cfg, "train")
    if evaluates if evaluates is not None else cfg.train.eval_every > 0:
        out += evaluation_problems(cfg)
    out += batch_problems(cfg, facts, world_size)
    out += deepspeed_problems(cfg, deepspeed_config, world_size)
    model = build_model(cfg)
    out += weights_problems(cfg, model)
    out += run_folder_problems(cfg, model)
    return out


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)
