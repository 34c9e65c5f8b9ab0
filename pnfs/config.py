"""Typed configuration: plain dataclasses, YAML presets in ``pnfs/configs/``, CLI overrides.

    cfg = load_config("pnfs/configs/mpii_mobilenetv2_p3_256.yaml", ["train.lr=5e-4"])

Loading checks everything it can before any work starts: an unknown key, a value of the
wrong type or an impossible value raises :class:`ConfigError` naming the key
(``model.vector_dim``) and the value. Types come from the dataclass annotations, so a new
field needs no parser code; cross-field rules live in :func:`validate`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"

OpName = Literal["zero", "skip_connect", "sep_conv_3x3", "dil_conv_3x3", "avg_pool_3x3", "max_pool_3x3"]
BackboneName = Literal["mobilenetv2", "resnet50", "hrnet_w32", "fabric"]
# pnfs: the searched PoseNFS; the other two are Table VI's fixed baselines (no alpha/beta)
ModelName = Literal["pnfs", "simplebaseline_resnet50", "hrnet_w32"]
# the trunk each Table VI baseline is built on (model.backbone.name must name it)
BASELINE_BACKBONES: dict[str, str] = {"simplebaseline_resnet50": "resnet50", "hrnet_w32": "hrnet_w32"}
DatasetName = Literal["coco", "mpii"]
StrategyName = Literal["sync", "random", "darts1"]
CompileScope = Literal["cells", "model"]  # train.compile_scope (pnfs.engine.compilation)

SUBNETWORK_OPS: list[OpName] = ["zero", "skip_connect", "sep_conv_3x3", "dil_conv_3x3"]
ALL_OPS: list[str] = list(get_args(OpName))


_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


class ConfigError(ValueError):
    """A configuration key has a value we cannot use; the message names both."""


@dataclass
class BackboneConfig:
    name: BackboneName = "mobilenetv2"
    weights: str | None = None  # imagenet (torchvision/timm weights by name), none (scratch), or a .pth
    fabric_channels: int = 10  # Fabric backbone: channel factor F (a node at 1/s has F*s ch)
    fabric_layers: int = 4  # Fabric backbone: m >= 3, the layers kept from the fabric
    fabric_hidden_nodes: int = 1  # Fabric backbone: H of its cells
    fabric_stem_channels: int = 64  # Fabric backbone: width of its two-layer conv stem


@dataclass
class ModelConfig:
    name: ModelName = "pnfs"  # a Table VI baseline uses backbone and vector_dim only (pnfs.model.baseline)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    num_parts: int = 3  # P of Table I (1, 3, 5 or 8) unless custom_parts is given
    custom_parts: list[list[int]] | None = None  # a grouping of our joint indices
    hidden_nodes: int = 1  # H
    channels: int = 10  # C: a node at scale 1/s has C*s channels
    vector_dim: int = 8  # d; 1 is the scalar-heatmap baseline (a Table VI baseline: raw heatmaps)
    ops: list[OpName] = field(default_factory=lambda: list(SUBNETWORK_OPS))
    # the P part fabrics as one batched fabric (same math and checkpoints; pnfs.model.batched);
    # auto: batched where the run trains on CUDA (docs/design.md §2)
    batched_parts: bool | Literal["auto"] = "auto"


@dataclass
class DataConfig:
    dataset: DatasetName = "coco"  # the annotation format and protocol (COCO AP / MPII PCKh)
    keypoints: str | None = None  # keypoint set: coco|mpii|crowdpose or a YAML path; None: the dataset's
    train_shards: str = ""  # brace pattern of WebDataset shards, e.g. data/coco/train-{000000..000099}.tar
    val_shards: str = ""
    val_annotations: str = ""  # COCO: ground-truth json; MPII: annot/valid.json
    val_head_sizes: str = ""  # MPII: json with head_size per person (optional)
    input_size: list[int] = field(default_factory=lambda: [256, 256])  # [H, W]
    sigma: float = 2.0  # Gaussian target sigma in heatmap pixels
    rotation: float = 45.0  # degrees, uniform in [-r, r]
    scale_range: list[float] = field(default_factory=lambda: [0.7, 1.3])
    flip_prob: float = 0.5
    margin: float = 1.25  # box enlargement around the person
    loader: Literal["torch", "dali", "gpu"] = "torch"
    num_workers: int = 4
    cache_dir: str = ""  # local folder for shards named by URL (one download per node); "": a temp folder
    on_error: Literal["skip", "raise"] = "skip"  # a bad sample (JPEG, arrays, truncated shard)
    max_bad_samples: int = -1  # stop past this many bad samples per rank and epoch; -1: 0.1% of the epoch
    verify_shards: bool = False  # check every shard's sha256 against manifest.json at start (sizes always)


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 24  # per process
    lr: float = 1e-3
    lr_milestones: list[int] = field(default_factory=lambda: [90, 120, 150])
    lr_factor: float = 0.25
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max global norm of the weight Adam's gradients (darts1's arch: none); 0: off
    amp: Literal["auto", "bf16", "none"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    channels_last: bool = True
    compile: bool = False  # the training forward through torch.compile (docs/design.md §8)
    compile_scope: CompileScope = "cells"  # cells: each fabric cell (regional); model: whole
    cuda_graph: bool = False  # replay the whole step from one CUDA graph (CUDA only; docs/design.md §8)
    flat_params: bool = True  # params and grads as views of flat buffers, Adam over them (docs/design.md §7)
    seed: int = 0
    deterministic: bool = False
    out_dir: str = "runs/default"
    keep_last: int = 3
    max_bad_steps: int = 10  # consecutive non-finite losses before the run aborts
    log_every: int = 20
    eval_every: int = 1  # epochs
    max_steps_per_epoch: int = 0  # 0: the whole epoch
    checkpoint_every: int = 0  # also write a checkpoint every N optimizer steps; 0: at epoch ends only
    stop_at_step: int = 0  # write a checkpoint and stop after this global step (split a run); 0: off
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: this rank's GPU when CUDA is available


@dataclass
class SearchConfig:
    strategy: StrategyName = "sync"
    seed: int = 0  # random search: alpha, beta ~ N(0, 1) from this seed
    arch_lr: float = 3e-3
    arch_weight_decay: float = 1e-3
    arch_split: list[int] = field(default_factory=lambda: [2, 1])  # darts1: weights : architecture


@dataclass
class EvalConfig:
    flip_test: bool = True
    flip_shift: bool = False  # shift the flipped map one heatmap pixel (HRNet habit); off by default
    batch_size: int = 64
    detections: str | None = None  # COCO detection-result json; None: ground-truth boxes
    det_score_threshold: float = 0.0
    rescore_threshold: float = 0.2  # joints above this score enter the instance score
    oks_nms_threshold: float = 0.9
    sigmas: list[float] | None = None  # OKS sigmas for custom joint sets
    pckh_threshold: float = 0.5
    pck_alpha: float = 0.2  # PCK@alpha of the box size, for keypoint sets without OKS sigmas
    hrnet_compat: bool = False  # report MPII "@0.1" at 0.11 like HRNet/SimpleBaseline code
    refine: Literal["quarter", "gaussian"] = "quarter"  # paper's quarter offset, or a log-Gaussian fit
    overlays: int = 8  # pose overlay PNGs written by an evaluation with an output folder
    amp: Literal["auto", "bf16", "none"] = "auto"  # inference autocast: auto = bf16 on CUDA, fp32 on CPU


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def joints(self):
        """The keypoint set (:class:`pnfs.keypoints.JointSet`) of ``data.keypoints`` or the dataset."""
        from pnfs.keypoints import load_keypoint_set

        return load_keypoint_set(self.data.keypoints or self.data.dataset)

    @property
    def num_joints(self) -> int:
        return self.joints.num_joints

    @property
    def parts(self) -> tuple[tuple[int, ...], ...]:
        """The grouping in use: ``model.custom_parts`` or the keypoint set's for P (Table I)."""
        from pnfs.parts import part_grouping

        if self.model.custom_parts is not None:
            return tuple(tuple(p) for p in self.model.custom_parts)
        return part_grouping(self.joints, self.model.num_parts)

    @property
    def part_names(self) -> tuple[str, ...]:
        """One name per part: the keypoint set's for P, ``part<k>`` for ``model.custom_parts``."""
        from pnfs.parts import part_names

        if self.model.custom_parts is not None:
            return tuple(f"part{k}" for k in range(len(self.model.custom_parts)))
        return part_names(self.joints, self.model.num_parts)


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; returns the value (ints widen to float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: unknown value {value!r}; expected one of {list(allowed)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, key)
    if tp is float:
        if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
            return float(value)  # YAML 1.1 reads 5e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"{where}: unknown key; {cls.__name__} has {sorted(names)}")
    kwargs = {}
    for k, v in data.items():
        where = f"{prefix}.{k}" if prefix else k
        kwargs[k] = _coerce(v, hints[k], where)
    return cls(**kwargs)


def deep_merge(base: dict, update: dict) -> dict:
    """``base`` updated by ``update``, nested dicts merged key by key (a new dict; neither is changed)."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict:
    """``"model.backbone.name=resnet50"`` -> ``{"model": {"backbone": {"name": "resnet50"}}}``.

    The value is read as YAML, so numbers, booleans, ``null`` and ``[1, 2]`` work.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    dotted, raw = text.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {text!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    out: dict = {keys[-1]: value}
    for k in reversed(keys[:-1]):
        out = {k: out}
    return out


def resolve_config_path(name: str | Path) -> Path:
    """A path as given, or a preset name (``demo`` or ``demo.yaml``) in ``pnfs/configs``."""
    path = Path(name)
    if path.exists():
        return path
    preset = CONFIG_DIR / (path.name if path.suffix else f"{path.name}.yaml")
    if preset.exists():
        return preset
    raise ConfigError(f"config file {str(name)!r} not found (nor as a preset in {CONFIG_DIR})")


def config_from_dict(data: dict) -> Config:
    cfg = _from_dict(Config, data)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML preset (or the defaults when ``path`` is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        resolved = resolve_config_path(path)
        try:
            data = yaml.safe_load(resolved.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{resolved}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{resolved}: expected a mapping at the top level")
    for text in overrides:
        data = deep_merge(data, parse_override(text))
    return config_from_dict(data)


def config_to_dict(cfg: Config) -> dict:
    """Plain dict (YAML/JSON-safe) of a config: what checkpoints and run folders store."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------- validation


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} {why}")


def validate(cfg: Config) -> None:
    """Rules that span fields or bound values; types were checked while parsing."""
    m, d, t, s, e = cfg.model, cfg.data, cfg.train, cfg.search, cfg.eval
    from pnfs.keypoints import KeypointSetError
    from pnfs.parts import validate_grouping

    try:
        joints = cfg.joints
    except KeypointSetError as err:
        raise ConfigError(f"data.keypoints: {d.keypoints!r}: {err}") from None
    num_joints = joints.num_joints
    if m.name in BASELINE_BACKBONES:
        _require(
            m.backbone.name == BASELINE_BACKBONES[m.name],
            "model.backbone.name",
            m.backbone.name,
            f"is not the trunk of model.name {m.name!r} (it is built on {BASELINE_BACKBONES[m.name]!r})",
        )
        _require(
            m.custom_parts is None,
            "model.custom_parts",
            m.custom_parts,
            f"has no use in model.name {m.name!r} (a baseline has one head for every joint)",
        )
    elif m.custom_parts is None:
        _require(
            m.num_parts in joints.groupings,
            "model.num_parts",
            m.num_parts,
            f"has no grouping in keypoint set {joints.name!r} (P in {sorted(joints.groupings)}); "
            "give model.custom_parts for another",
        )
    else:
        try:
            validate_grouping(tuple(tuple(p) for p in m.custom_parts), num_joints)
        except ValueError as err:
            raise ConfigError(f"model.custom_parts: {m.custom_parts!r}: {err}") from None
    _require(m.vector_dim >= 1, "model.vector_dim", m.vector_dim, "must be >= 1")
    _require(m.hidden_nodes >= 1, "model.hidden_nodes", m.hidden_nodes, "must be >= 1")
    _require(m.channels >= 1, "model.channels", m.channels, "must be >= 1")
    _require(len(set(m.ops)) == len(m.ops), "model.ops", m.ops, "lists an op twice")
    _require(any(op != "zero" for op in m.ops), "model.ops", m.ops, "needs at least one op other than zero")
    b = m.backbone
    _require(b.fabric_channels >= 1, "model.backbone.fabric_channels", b.fabric_channels, "must be >= 1")
    _require(
        b.fabric_layers >= 3,
        "model.backbone.fabric_layers",
        b.fabric_layers,
        "must be >= 3 (the Fabric backbone's layer 3 is the first to reach 1/32)",
    )
    _require(
        b.fabric_hidden_nodes >= 1,
        "model.backbone.fabric_hidden_nodes",
        b.fabric_hidden_nodes,
        "must be >= 1",
    )
    _require(
        b.fabric_stem_channels >= 1,
        "model.backbone.fabric_stem_channels",
        b.fabric_stem_channels,
        "must be >= 1",
    )
    if b.weights not in (None, "imagenet", "none"):
        _require(
            Path(b.weights).is_file(),
            "model.backbone.weights",
            b.weights,
            "is not a file (nor imagenet/none)",
        )
    _require(
        not (b.name == "fabric" and b.weights == "imagenet"),
        "model.backbone.weights",
        b.weights,
        "has no ImageNet weights for the fabric backbone (it is searched from scratch)",
    )

    _require(len(d.input_size) == 2, "data.input_size", d.input_size, "must be [height, width]")
    for side in d.input_size:
        _require(
            side > 0 and side % 32 == 0, "data.input_size", d.input_size, "must be positive multiples of 32"
        )
    _require(d.sigma > 0, "data.sigma", d.sigma, "must be > 0")
    _require(0 <= d.rotation <= 180, "data.rotation", d.rotation, "must be in [0, 180] degrees")
    _require(
        len(d.scale_range) == 2 and 0 < d.scale_range[0] <= d.scale_range[1],
        "data.scale_range",
        d.scale_range,
        "must be [low, high] with 0 < low <= high",
    )
    _require(0 <= d.flip_prob <= 1, "data.flip_prob", d.flip_prob, "must be in [0, 1]")
    _require(d.margin >= 1, "data.margin", d.margin, "must be >= 1")
    _require(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")

    _require(t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
    _require(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    _require(t.lr > 0, "train.lr", t.lr, "must be > 0")
    _require(0 < t.lr_factor <= 1, "train.lr_factor", t.lr_factor, "must be in (0, 1]")
    _require(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0")
    _require(t.keep_last >= 1, "train.keep_last", t.keep_last, "must be >= 1")
    _require(t.max_bad_steps >= 1, "train.max_bad_steps", t.max_bad_steps, "must be >= 1")
    _require(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
    _require(t.eval_every >= 0, "train.eval_every", t.eval_every, "must be >= 0 (0: never)")
    _require(t.max_steps_per_epoch >= 0, "train.max_steps_per_epoch", t.max_steps_per_epoch, "must be >= 0")
    _require(t.checkpoint_every >= 0, "train.checkpoint_every", t.checkpoint_every, "must be >= 0")
    _require(t.stop_at_step >= 0, "train.stop_at_step", t.stop_at_step, "must be >= 0")
    _require(
        not (t.cuda_graph and t.device == "cpu"),
        "train.cuda_graph",
        t.cuda_graph,
        "needs CUDA (train.device=cpu)",
    )
    _require(
        not (t.cuda_graph and t.compile),
        "train.cuda_graph",
        t.cuda_graph,
        "and train.compile both capture the step; choose one",
    )
    _require(s.arch_weight_decay >= 0, "search.arch_weight_decay", s.arch_weight_decay, "must be >= 0")

    _require(s.arch_lr > 0, "search.arch_lr", s.arch_lr, "must be > 0")
    _require(
        len(s.arch_split) == 2 and all(x >= 1 for x in s.arch_split),
        "search.arch_split",
        s.arch_split,
        "must be [weight_parts, arch_parts], both >= 1",
    )

    _require(e.batch_size >= 1, "eval.batch_size", e.batch_size, "must be >= 1")
    _require(0 < e.oks_nms_threshold <= 1, "eval.oks_nms_threshold", e.oks_nms_threshold, "must be in (0, 1]")
    _require(0 <= e.rescore_threshold < 1, "eval.rescore_threshold", e.rescore_threshold, "must be in [0, 1)")
    _require(e.pckh_threshold > 0, "eval.pckh_threshold", e.pckh_threshold, "must be > 0")
    _require(e.pck_alpha > 0, "eval.pck_alpha", e.pck_alpha, "must be > 0")
    _require(e.overlays >= 0, "eval.overlays", e.overlays, "must be >= 0")
    if e.sigmas is not None:
        _require(all(v > 0 for v in e.sigmas), "eval.sigmas", e.sigmas, "must all be > 0")
    if e.sigmas is not None:
        _require(
            len(e.sigmas) == num_joints,
            "eval.sigmas",
            e.sigmas,
            f"must give one sigma per joint ({num_joints})",
        )
