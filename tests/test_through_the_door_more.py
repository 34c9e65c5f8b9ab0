"""More options set the way a user sets them (issue 26, continued): a config override or a
script flag, then the effect on what the product writes (weights, checkpoints, metrics,
shards). Each test names the key or flag it sets in its docstring."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pnfs.config import load_config
from pnfs.data.geometry import reachable_region
from pnfs.engine.checkpoint import latest_checkpoint, load_checkpoint
from pnfs.model import build_model
from tests.data_prep.test_shard_coco import _region_of_original, _rgb, _samples, shard_coco, shard_mpii
from tests.support.engine import TINY_OVERRIDES, tiny_dataset


def tiny_cfg(tmp_path_factory, *overrides: str):
    data = tiny_dataset(tmp_path_factory)
    return load_config(None, [*TINY_OVERRIDES, *data["overrides"], *overrides])


def trained(tmp_path_factory, out: Path, *overrides: str, steps: int = 1) -> dict:
    """The last checkpoint of a run of ``steps`` steps on the tiny set (one epoch)."""
    from pnfs.engine.trainer import run_training

    cfg = tiny_cfg(
        tmp_path_factory,
        "train.epochs=1",
        f"train.max_steps_per_epoch={steps}",
        f"train.out_dir={out}",
        *overrides,
    )
    run_training(cfg)
    return load_checkpoint(latest_checkpoint(out / "checkpoints"))


def weights(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The trained tensors (no BatchNorm statistics, no alpha/beta)."""
    return {
        k: v
        for k, v in checkpoint["model"].items()
        if v.is_floating_point() and not k.endswith(("running_mean", "running_var", "alpha", "beta"))
    }


def largest_change(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# --------------------------------------------------------------------------- train.* keys


def test_grad_clip_bounds_the_first_adam_step(tmp_path_factory, tmp_path):
    """train.grad_clip: Adam's first step is lr * g / (|g| + eps) per element, about lr wherever
    |g| >> eps = 1e-8. Clipped to a global norm of 1e-9 every |g| <= 1e-9, so no weight moves by
    more than lr * 1e-9 / 1e-8 = lr / 10 (train.weight_decay=0: decay would add to g after the clip)."""
    lr = 1e-2
    keys = ("train.lr=1e-2", "train.weight_decay=0")
    torch.manual_seed(0)  # train.seed: the run draws its initial weights from it
    start = weights({"model": build_model(tiny_cfg(tmp_path_factory)).state_dict()})
    free = weights(trained(tmp_path_factory, tmp_path / "free", *keys, "train.grad_clip=0"))
    clipped = weights(trained(tmp_path_factory, tmp_path / "clip", *keys, "train.grad_clip=1e-9"))
    assert largest_change(free, start) > 0.9 * lr
    assert largest_change(clipped, start) <= 0.1 * lr + 1e-7
    assert largest_change(clipped, start) > 0  # clipped, not frozen


def test_data_sigma_sets_the_width_of_the_targets_the_loss_sees(tmp_path_factory, tmp_path, monkeypatch):
    """data.sigma: the training step's Gaussian targets have that standard deviation (heatmap px),
    measured as the second moment of each target map around its peak."""
    import pnfs.loss as loss_module

    real = loss_module.gaussian_targets
    seen: list[torch.Tensor] = []

    def spy(*args, **kwargs):
        targets, target_weights = real(*args, **kwargs)
        seen.append(targets.detach().float())
        return targets, target_weights

    monkeypatch.setattr(loss_module, "gaussian_targets", spy)
    widths = {}
    for sigma in (1.5, 3.0):
        seen.clear()
        trained(tmp_path_factory, tmp_path / f"s{sigma}", f"data.sigma={sigma}")
        maps = torch.cat([t.flatten(0, -3) for t in seen])  # [M, h, w]
        h, w = maps.shape[-2:]
        mass = maps.sum((-2, -1))
        inside = mass > 0.9 * mass.max()  # whole Gaussians, not cut by the map's border
        maps = maps[inside] / mass[inside, None, None]
        xs = torch.arange(w, dtype=torch.float32).expand(h, w)
        mx = (maps * xs).sum((-2, -1))
        var_x = (maps * (xs - mx[:, None, None]) ** 2).sum((-2, -1))
        widths[sigma] = float(var_x.sqrt().median())
    assert widths[1.5] == pytest.approx(1.5, rel=0.1) and widths[3.0] == pytest.approx(3.0, rel=0.1)


def test_channels_last_sets_the_layout_of_the_trained_weights(tmp_path_factory, tmp_path):
    """train.channels_last: the run's 3x3 convolution weights are channels_last (NHWC) or not,
    as saved in its checkpoint."""
    nhwc = trained(tmp_path_factory, tmp_path / "nhwc", "train.channels_last=true")["model"]
    nchw = trained(tmp_path_factory, tmp_path / "nchw", "train.channels_last=false")["model"]
    convs = [k for k, v in nhwc.items() if v.dim() == 4 and v.shape[1] > 1 and v.shape[-1] == 3]
    assert convs
    for k in convs:
        assert nhwc[k].is_contiguous(memory_format=torch.channels_last) and not nhwc[k].is_contiguous(), k
        assert nchw[k].is_contiguous(), k


def test_deterministic_turns_on_torchs_deterministic_algorithms(tmp_path_factory, tmp_path):
    """train.deterministic=true: the run switches torch to deterministic algorithms (the same
    weights on a rerun). The setting is process-wide; that false switches it off again after a
    true is engine/test_runtime.py's test."""
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        trained(tmp_path_factory, tmp_path / "off", "train.deterministic=false")
        assert not torch.are_deterministic_algorithms_enabled()
        first = weights(trained(tmp_path_factory, tmp_path / "on", "train.deterministic=true"))
        assert torch.are_deterministic_algorithms_enabled()
        again = weights(trained(tmp_path_factory, tmp_path / "again", "train.deterministic=true"))
        assert all(torch.equal(first[k], again[k]) for k in first)
    finally:
        torch.use_deterministic_algorithms(before, warn_only=True)


@pytest.mark.slow  # Dynamo traces the forward and backward: about 30 s on one core per run
def test_compile_runs_the_step_through_dynamo_to_the_same_weights(tmp_path_factory, tmp_path, monkeypatch):
    """train.compile=true: the run hands its forward to torch.compile, Dynamo traces it, and one
    step ends where the eager run ends. train.compile_scope: ``cells`` (the default) compiles each
    fabric cell (one torch.compile call per cell), ``model`` the whole forward model (one call).
    (Dynamo only: torch.compile is given the "eager" backend here, as Inductor's C++ build per
    graph would take minutes on the CPU.)"""
    from torch._dynamo.utils import counters

    from pnfs.engine.compilation import fabric_cells

    real = torch.compile
    calls = []

    def dynamo_only(model, **kwargs):
        calls.append(kwargs)
        return real(model, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", dynamo_only)
    torch._dynamo.reset()
    counters.clear()
    eager = weights(trained(tmp_path_factory, tmp_path / "eager", "train.compile=false"))
    assert not calls
    cells = len(fabric_cells(build_model(tiny_cfg(tmp_path_factory))))
    for scope, compiled_calls in (("cells", cells), ("model", 1)):
        calls.clear()
        compiled = weights(
            trained(tmp_path_factory, tmp_path / scope, "train.compile=true", f"train.compile_scope={scope}")
        )
        assert calls == [{"mode": None}] * compiled_calls and counters["stats"]["unique_graphs"] >= 1
        for k in eager:
            torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-5, msg=k)
    assert cells > 1


# --------------------------------------------------------------------------- search.* keys


def arch_values(checkpoint: dict) -> torch.Tensor:
    return torch.cat([v.flatten() for k, v in checkpoint["model"].items() if k.endswith(("alpha", "beta"))])


def test_arch_lr_and_weight_decay_drive_the_darts1_architecture_step(tmp_path_factory, tmp_path):
    """search.arch_lr: alpha/beta start at 0 and darts1's first Adam_arch step moves each by about
    arch_lr (0 where its gradient is 0). search.arch_weight_decay adds wd * alpha to the gradient
    from the second step on: 1e3 pulls the values back towards 0, 0 lets them go on."""
    darts = ("search.strategy=darts1", "search.arch_split=[1,1]")
    ck = trained(tmp_path_factory, tmp_path / "lr", *darts, "search.arch_lr=0.02")
    assert arch_values(ck).abs().max() == pytest.approx(0.02, rel=1e-3)
    assert ck["optimizers"]["arch"]["param_groups"][0]["lr"] == 0.02
    runs = {
        wd: arch_values(
            trained(
                tmp_path_factory,
                tmp_path / f"wd{wd}",
                *darts,
                "search.arch_lr=0.05",
                f"search.arch_weight_decay={wd}",
                steps=2,
            )
        )
        for wd in (0.0, 1e3)
    }
    assert runs[1e3].abs().mean() < 0.5 * runs[0.0].abs().mean()


def test_grad_clip_leaves_the_darts1_architecture_step_unclipped(tmp_path_factory, tmp_path):
    """train.grad_clip bounds the weights' gradient only: darts1's Adam_arch step is not clipped,
    as in DARTS's official code, which the paper's darts1 follows. With a bound of 1e-9 the first
    architecture step still moves alpha/beta by about search.arch_lr (clipped, at most lr / 10)."""
    darts = ("search.strategy=darts1", "search.arch_split=[1,1]", "search.arch_lr=0.02")
    ck = trained(tmp_path_factory, tmp_path / "clip", *darts, "train.grad_clip=1e-9")
    assert arch_values(ck).abs().max() == pytest.approx(0.02, rel=1e-3)


def test_arch_split_decides_which_shards_train_the_architecture(tmp_path_factory, tmp_path):
    """search.arch_split=[w,a] over the 6 training shards: shard i trains the architecture when
    i mod (w + a) >= w, as the run's log says: [2,1] holds 2 shards out, [1,2] holds 4."""
    for split, counts in (("[2,1]", (4, 2)), ("[1,2]", (2, 4))):
        out = tmp_path / split.strip("[]").replace(",", "-")
        trained(tmp_path_factory, out, "search.strategy=darts1", f"search.arch_split={split}")
        log = (out / "train.log").read_text()
        assert f"darts1: {counts[0]} shards train the weights, {counts[1]} the architecture" in log, split


# --------------------------------------------------------------------------- eval.* keys


def gt_predictions(annotations: Path, offset: float) -> dict[str, np.ndarray]:
    """Every labelled ground-truth joint moved right by ``offset`` x sqrt(area) (eval.sigmas) —
    predictions as the evaluation gathers them, one per annotated person."""
    data = json.loads(annotations.read_text())
    anns = [a for a in data["annotations"] if a.get("num_keypoints", 0) > 0]
    kp = np.stack([np.asarray(a["keypoints"], float).reshape(-1, 3)[:, :2] for a in anns])
    area = np.array([float(a["area"]) for a in anns])
    kp[..., 0] += offset * np.sqrt(area)[:, None]
    return {
        "keypoints": kp,
        "scores": np.ones(kp.shape[:2]),
        "image_id": np.array([a["image_id"] for a in anns]),
        "ann_id": np.array([a["id"] for a in anns]),
        "box_score": np.ones(len(anns)),
        "area": area,
    }


def test_eval_sigmas_replace_the_oks_sigmas_of_the_coco_ap(tmp_path_factory):
    """eval.sigmas: every joint off by 0.5 sqrt(area). With COCO's sigmas (<= 0.107) the OKS is
    below exp(-0.25 / (8 * 0.107^2)) = 0.06 and AP is 0; with eval.sigmas all 1.0 it is
    exp(-0.25 / 8) = 0.97 and AP is 1 (eval.oks_nms_threshold=1.0: with sigmas that wide the
    OKS-NMS, which uses them too, would take nearby people for one)."""
    from pnfs.evaluate.runner import coco_metrics

    cfg = tiny_cfg(tmp_path_factory, "eval.oks_nms_threshold=1.0")
    pred = gt_predictions(Path(cfg.data.val_annotations), 0.5)
    assert coco_metrics(pred, cfg)[0]["AP"] == pytest.approx(0.0, abs=1e-6)
    wide = tiny_cfg(tmp_path_factory, "eval.oks_nms_threshold=1.0", f"eval.sigmas=[{','.join(['1.0'] * 17)}]")
    assert coco_metrics(pred, wide)[0]["AP"] == pytest.approx(1.0)


def test_eval_pck_alpha_is_the_radius_of_the_box_pck(tmp_path_factory, tmp_path):
    """eval.pck_alpha for a keypoint set without OKS sigmas: every joint off by 0.15 of its box's
    longer side is correct at the default 0.2 and wrong at 0.1."""
    import yaml

    from pnfs.evaluate.runner import coco_metrics
    from pnfs.keypoints import keypoint_set_path

    spec = yaml.safe_load(keypoint_set_path("coco").read_text())
    spec.pop("sigmas")
    spec["name"] = "coco_no_sigmas"
    no_sigmas = tmp_path / "no_sigmas.yaml"
    no_sigmas.write_text(yaml.safe_dump(spec, sort_keys=False))

    cfg = tiny_cfg(tmp_path_factory, f"data.keypoints={no_sigmas}")
    data = json.loads(Path(cfg.data.val_annotations).read_text())
    pred = gt_predictions(Path(cfg.data.val_annotations), 0.0)
    side = {a["id"]: max(a["bbox"][2:]) for a in data["annotations"]}
    pred["keypoints"][..., 0] += 0.15 * np.array([side[int(i)] for i in pred["ann_id"]])[:, None]
    assert coco_metrics(pred, cfg)[0]["PCK"] == 1.0
    assert (
        coco_metrics(pred, tiny_cfg(tmp_path_factory, f"data.keypoints={no_sigmas}", "eval.pck_alpha=0.1"))[
            0
        ]["PCK"]
        == 0.0
    )


# --------------------------------------------------------------------------- shard crop flags


def source(script_name: str, shared_data: Path, tmp_path_factory) -> tuple:
    """(script, image folder, annotation file name): COCO from the tiny synthetic set, whose
    people are small in their images (in the real COCO sample every crop reaches the image's
    edges, so no crop flag could show), MPII from the real sample."""
    if script_name == "shard_coco":
        raw = tiny_dataset(tmp_path_factory)["raw"]
        return shard_coco, raw / "images" / "val", "../../annotations/person_keypoints_val.json"
    return shard_mpii, shared_data / "mpii_sample", "test_mpii.json"


def shard(script, root: Path, annotations: str, out: Path, *flags: str) -> list[tuple[dict, np.ndarray]]:
    argv = ["--images", str(root), "--annotations", str(root / annotations), "--out", str(out)]
    assert script.main([*argv, "--max-side", "0", "--no-progress", *flags]) == 0
    split = "data" if script is shard_mpii else "val"
    return _samples(out, split)


def expected_crop(meta: dict, margin: float, max_scale: float, aspects: tuple[float, float]) -> list[int]:
    """[x0, y0, x1, y1]: every pixel the reachable region touches, inside the image."""
    rx0, ry0, rx1, ry1 = reachable_region(np.asarray(meta["bbox"]), margin, max_scale, aspects)
    w, h = meta["image_size"]
    return [
        max(0, math.floor(rx0 + 0.5)),
        max(0, math.floor(ry0 + 0.5)),
        min(w, math.ceil(rx1 + 0.5)),
        min(h, math.ceil(ry1 + 0.5)),
    ]


CROP_FLAGS = [
    ("--margin", ["1.6"], dict(margin=1.6)),
    ("--max-scale", ["1.0"], dict(max_scale=1.0)),
    ("--aspect-range", ["1.0", "2.0"], dict(aspects=(1.0, 2.0))),
]


@pytest.mark.parametrize("script_name", ["shard_coco", "shard_mpii"])
@pytest.mark.parametrize("flag, values, changed", CROP_FLAGS, ids=[f[0] for f in CROP_FLAGS])
def test_crop_flags_set_the_region_each_crop_covers(
    shared_data, tmp_path_factory, tmp_path, script_name, flag, values, changed
):
    """--margin, --max-scale, --aspect-range: each crop is the square around the box centre that
    holds the box widened to every aspect in the range, times margin, enlarged by max_scale and
    turned by any angle (pnfs/data/geometry.py reachable_region), clipped to the image. The
    manifest records the flag; the crop's pixels are the original's."""
    script, root, annotations = source(script_name, shared_data, tmp_path_factory)
    default = dict(margin=1.25, max_scale=1.3, aspects=(0.75, 1.0))
    base = shard(script, root, annotations, tmp_path / "base")
    samples = shard(script, root, annotations, tmp_path / "flag", flag, *values)
    assert [m["ann_id"] for m, _ in samples] == [m["ann_id"] for m, _ in base]
    grew = 0
    for (meta, crop), (meta0, _) in zip(samples, base):
        x0, y0 = (round(v) for v in np.asarray(meta["crop_to_image"])[:, 2])
        w, h = meta["crop_size"]
        assert [x0, y0, x0 + w, y0 + h] == expected_crop(meta, **{**default, **changed}), meta["ann_id"]
        assert crop.shape[:2] == (h, w)
        region = _region_of_original(_rgb(root / meta["image_file"]), meta)
        assert np.abs(region.astype(float) - crop).mean() < 3
        grew += meta["crop_size"] != meta0["crop_size"]
    assert grew > 0, f"{flag} changed no crop: the test would prove nothing"
    options = json.loads((tmp_path / "flag" / "manifest.json").read_text())["splits"]
    (entry,) = options.values()
    key = flag.lstrip("-").replace("-", "_")
    want = [float(v) for v in values] if len(values) > 1 else float(values[0])
    assert entry["options"][key] == want


@pytest.mark.parametrize("script_name", ["shard_coco", "shard_mpii"])
def test_quality_sets_the_jpeg_quality_of_the_crops(shared_data, tmp_path_factory, tmp_path, script_name):
    """--quality 30: smaller shards whose crops stray further from the original than at the
    default 94."""
    script, root, annotations = source(script_name, shared_data, tmp_path_factory)
    errors, sizes = {}, {}
    for quality in ("94", "30"):
        out = tmp_path / quality
        samples = shard(script, root, annotations, out, "--quality", quality)
        errors[quality] = np.mean(
            [
                np.abs(_region_of_original(_rgb(root / m["image_file"]), m).astype(float) - c).mean()
                for m, c in samples
            ]
        )
        sizes[quality] = sum(p.stat().st_size for p in out.glob("*.tar"))
    assert errors["30"] > 1.5 * errors["94"] and sizes["30"] < 0.7 * sizes["94"]


def test_shard_mpii_shard_size_and_max_side(shared_data, tmp_path):
    """shard_mpii.py --shard-size 2: the 3 people fill data-000000.tar with 2 and data-000001.tar
    with 1; --max-side 96: the longest crop side is 96 px, and the keypoints still map back."""
    root = shared_data / "mpii_sample"
    argv = ["--images", str(root), "--annotations", str(root / "test_mpii.json"), "--out", str(tmp_path)]
    assert shard_mpii.main([*argv, "--shard-size", "2", "--max-side", "96", "--no-progress"]) == 0
    entry = json.loads((tmp_path / "manifest.json").read_text())["splits"]["data"]
    assert [(s["file"], s["samples"]) for s in entry["shards"]] == [
        ("data-000000.tar", 2),
        ("data-000001.tar", 1),
    ]
    samples = _samples(tmp_path, "data")
    assert len(samples) == 3
    for meta, crop in samples:
        assert max(crop.shape[:2]) == 96 and tuple(meta["crop_size"]) == crop.shape[1::-1]
        region = _region_of_original(_rgb(root / meta["image_file"]), meta)
        assert region.shape == crop.shape and np.abs(region.astype(float) - crop).mean() < 3


# --------------------------------------------------------------------------- --config of evaluate / export


def bare_state_dict(tmp_path: Path, *overrides: str) -> tuple[Path, Path]:
    """(a bare state dict of a tiny model, the YAML config that builds it): the pair a user
    passes as --checkpoint and --config."""
    from pnfs.config import dump_config

    cfg = load_config(None, [*TINY_OVERRIDES, *overrides])
    torch.manual_seed(0)
    weights_file, config_file = tmp_path / "bare.pt", tmp_path / "tiny.yaml"
    torch.save(build_model(cfg).state_dict(), weights_file)
    dump_config(cfg, config_file)
    return weights_file, config_file


def test_evaluate_config_builds_the_model_of_a_bare_state_dict_and_hrnet_compat_reads_at_0_11(
    shared_data, tmp_path, capsys
):
    """launch/evaluate.py --config: a bare state dict is evaluated with the model of that YAML
    (without it: one error line, exit 2); --hrnet-compat reads MPII's "Mean@0.1" at 0.11."""
    from tests.engine.test_checkpoint_known import _launcher

    evaluate_cli = _launcher("evaluate")

    root = shared_data / "mpii_sample"
    assert shard_mpii.main(["--images", str(root), "--annotations", str(root / "test_mpii.json"),
                            "--out", str(tmp_path / "shards"), "--no-progress"]) == 0  # fmt: skip
    weights_file, config_file = bare_state_dict(
        tmp_path,
        "data.dataset=mpii",
        f"data.val_head_sizes={root / 'mpii_headsizes_pose-hg-train_valid_h5.json'}",
    )
    argv = ["--checkpoint", str(weights_file), "--data", str(tmp_path / "shards" / "data-*.tar"),
            "--annotations", str(root / "test_mpii.json"), "--device", "cpu"]  # fmt: skip
    assert evaluate_cli.main(argv) == 2
    assert "holds a bare state dict (no 'config'); give --config" in capsys.readouterr().err
    tables = {}
    for compat in ([], ["--hrnet-compat"]):
        out = tmp_path / f"eval{len(compat)}"
        assert evaluate_cli.main([*argv, "--config", str(config_file), "--out", str(out), *compat]) == 0
        tables[bool(compat)] = capsys.readouterr().out
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["num_samples"] == 3 and 0.0 <= metrics["PCKh"] <= 100.0
    assert "(at 0.11, HRNet-compat)" in tables[True] and "HRNet-compat" not in tables[False]


def test_export_config_builds_the_model_of_a_bare_state_dict(tmp_path, capsys):
    """launch/export.py --config: the TorchScript file of a bare state dict gives the heatmaps of
    the model that YAML builds (without it: one error line, exit 2)."""
    from tests.launch.test_export import export_cli

    weights_file, config_file = bare_state_dict(tmp_path, "model.channels=3")
    out = tmp_path / "tiny.ts"
    argv = ["--checkpoint", str(weights_file), "--format", "torchscript", "--out", str(out)]
    assert export_cli.main(argv) == 2
    assert "give --config" in capsys.readouterr().err
    assert export_cli.main([*argv, "--config", str(config_file)]) == 0
    model = build_model(load_config(config_file))
    model.load_state_dict(torch.load(weights_file))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, want = torch.jit.load(str(out))(images), model.eval()(images)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------- launch/demo.py --nproc

TINY_DEMO = [
    "--train", "16", "--val", "8", "train.epochs=1", "train.batch_size=4", "train.max_steps_per_epoch=1",
    "data.input_size=[64,64]", "data.num_workers=0",
    "model.backbone.fabric_channels=2", "model.channels=2", "model.vector_dim=2",
]  # fmt: skip


@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [1, 2])
def test_demo_nproc_is_the_number_of_training_processes(tmp_path, nproc):
    """launch/demo.py --nproc N: the search runs on N processes (its log line, the checkpoint's
    world size) and the shards are written by N workers (the manifest's command)."""
    from tests.launch.test_demo import run_demo

    output, out = run_demo(tmp_path, 0, "--nproc", str(nproc), *TINY_DEMO, timeout=300)
    assert f"on {nproc} process(es), device cpu" in output
    assert load_checkpoint(latest_checkpoint(out / "checkpoints"))["world_size"] == nproc
    manifest = json.loads((tmp_path / "data" / "shards-seed0" / "train" / "manifest.json").read_text())
    assert f"--workers {nproc} " in manifest["splits"]["train"]["command"]
