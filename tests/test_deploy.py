"""pnfs.deploy.freeze: the frozen model equals the training model in eval mode on every preset."""

from __future__ import annotations

import copy
import os
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from pnfs.config import CONFIG_DIR, load_config
from pnfs.deploy import (
    EXPORT_FORMATS,
    count_ops,
    export_file,
    fold_batchnorms,
    fold_conv_bn,
    fold_deconv_bn,
    freeze,
    freeze_cell,
    freeze_fabric,
    output_change,
)
from pnfs.model import build_model
from pnfs.model.cell import Cell
from pnfs.model.fabric import Fabric

# freeze folds PoseNFS's BN/alpha/beta; Table VI's baselines (model.name != pnfs) are not frozen
PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if load_config(p).model.name == "pnfs")


def trained_looking(cfg, images: torch.Tensor, seed: int = 0) -> nn.Module:
    """A model whose alpha/beta and BatchNorm statistics are not the identity-like defaults."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    for a in model.arch_parameters():
        a.data.normal_(0.0, 1.0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            if m.weight is not None:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0.0, 0.1)
    model.eval()
    # head vectors of std ~0.3, so the scores spread over [0, 1) instead of sitting at 0 or 1
    outputs = []
    hooks = [p.head.conv.register_forward_hook(lambda m, i, o: outputs.append(o)) for p in model.parts]
    with torch.no_grad():
        model(images)
    for hook, part, out in zip(hooks, model.parts, outputs):
        hook.remove()
        part.head.conv.weight.data *= 0.3 / out.std()
        part.head.conv.bias.data *= 0.3 / out.std()
    return model


@pytest.mark.parametrize("preset", PRESETS)
def test_frozen_model_equals_the_eval_mode_model(preset):
    cfg = load_config(preset, ["data.input_size=[64,64]"])
    images = torch.randn(2, 3, 64, 64)
    model = trained_looking(cfg, images)
    with torch.no_grad():
        expected = model(images)
    frozen = freeze(model)
    got = frozen(images.contiguous(memory_format=torch.channels_last))
    assert expected.std() > 0.05  # a test on all-zero scores would prove nothing
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen.training
    convs = [m.weight for m in frozen.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert frozen.arch_parameters() == []  # alpha and beta are folded away
    assert count_ops(frozen) == count_ops(model)  # only zero was dropped (it is never built)


def test_freeze_leaves_the_training_model_alone():
    cfg = load_config("demo", ["data.input_size=[64,64]"])
    model = trained_looking(cfg, torch.randn(1, 3, 64, 64)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = freeze(model)
    assert model.training
    assert not any(m.training for m in frozen.modules())  # the copy is in eval mode, all of it
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_pruning_drops_weak_ops_and_reports_the_change():
    cfg = load_config("demo", ["data.input_size=[64,64]"])
    images = torch.randn(2, 3, 64, 64)
    model = trained_looking(cfg, images)
    exact = freeze(model)
    pruned = freeze(model, prune_below=0.3)
    assert count_ops(pruned) < count_ops(exact)
    assert output_change(model, exact, images)["max_abs"] < 1e-4
    change = output_change(model, pruned, images)
    assert change["max_abs"] > 1e-4 and set(change) == {"max_abs", "mean_abs", "argmax_moved"}
    # every edge keeps its strongest op: even a threshold above every weight leaves a working model
    assert torch.isfinite(freeze(model, prune_below=0.99)(images)).all()


def test_prune_threshold_out_of_range_is_named():
    model = build_model(load_config("demo", ["data.input_size=[64,64]"]))
    with pytest.raises(ValueError, match="prune-below"):
        freeze(model, prune_below=1.5)


def test_eval_amp_uses_bf16_only_where_the_device_has_it(monkeypatch):
    from pnfs import inference

    monkeypatch.setattr(inference, "bf16_supported", lambda device: True)
    assert inference.inference_amp("auto", "cuda")[0] == torch.bfloat16
    assert inference.inference_amp("bf16", "cpu")[0] == torch.bfloat16  # asked for by name
    dtype, line = inference.inference_amp("auto", "cpu")  # the CPU default is float32
    assert dtype is None and "float32 on cpu" in line
    assert inference.inference_amp("none", "cpu") == (None, "inference: float32 on cpu (eval.amp=none)")
    monkeypatch.setattr(inference, "bf16_supported", lambda device: False)
    dtype, line = inference.inference_amp("bf16", "cpu")
    assert dtype is None and "fell back to float32" in line
    with pytest.raises(ValueError, match=r"eval\.amp"):
        inference.inference_amp("fp8", "cpu")


def test_frozen_bf16_scores_stay_close_to_float32():
    cfg = load_config("demo", ["data.input_size=[64,64]"])
    images = torch.randn(2, 3, 64, 64)
    frozen = freeze(trained_looking(cfg, images))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = frozen(images).float()
    assert (low - frozen(images)).abs().max() < 0.05


def test_a_batched_model_freezes_to_what_its_per_part_layout_freezes_to():
    """model.batched_parts=true (the CUDA default under auto) must freeze and export like per part."""
    cfg = load_config("demo", ["data.input_size=[64,64]", "model.batched_parts=false"])
    images = torch.randn(2, 3, 64, 64)
    per_part = trained_looking(cfg, images)
    batched = per_part.with_part_layout(True)
    assert batched.batched_parts
    frozen = freeze(batched)
    expected = freeze(per_part)(images)
    torch.testing.assert_close(frozen(images), expected, rtol=0, atol=1e-5)
    assert count_ops(frozen) == count_ops(per_part)


def test_a_batchnorm_without_running_statistics_is_refused_by_name():
    """Eval-mode BN folding reads running_mean/var; BatchNorm2d(track_running_stats=False) has none."""
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match=r"freeze: BatchNorm2d\(4.*keeps no running statistics"):
        fold_conv_bn(conv, bn)


# pnfs/deploy.py's building blocks, one at a time (issue 26, mutation section of
# docs/testing.md): BatchNorm folding into a conv and a transposed conv over every geometry
# argument, and ``export_file``'s formats, output names, batch axis and kernel switch.
#
# The whole-model checks (a frozen preset equals its eval-mode model, exports match ``predict``)
# are above and in ``tests/launch/test_export.py``; these small cases run in a second and say
# which piece broke.


def random_bn(channels: int, affine: bool, eps: float, dtype=torch.float64) -> nn.BatchNorm2d:
    """An eval-mode BatchNorm with statistics and (when affine) weights far from the defaults."""
    bn = nn.BatchNorm2d(channels, eps=eps, affine=affine).to(dtype)
    bn.running_mean.normal_(0.0, 0.5)
    bn.running_var.uniform_(0.05, 3.0)
    if affine:
        bn.weight.data.uniform_(-1.5, 1.5)
        bn.bias.data.normal_(0.0, 0.5)
    return bn.eval()


def bn_by_hand(y: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Eval-mode BN written out: gamma (y - mean) / sqrt(var + eps) + beta, per channel."""
    view = (1, -1, 1, 1)
    out = (y - bn.running_mean.view(view)) / torch.sqrt(bn.running_var.view(view) + bn.eps)
    if bn.weight is not None:
        out = out * bn.weight.view(view) + bn.bias.view(view)
    return out


CONVS = {
    "plain": dict(kernel_size=3, padding=1),
    "no-bias": dict(kernel_size=3, padding=1, bias=False),
    "stride-2": dict(kernel_size=3, stride=2, padding=1),
    "dilated": dict(kernel_size=3, padding=2, dilation=2),
    "grouped": dict(kernel_size=3, padding=1, groups=2),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "1x1-wide": dict(kernel_size=(1, 3), padding=(0, 1)),
}


@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("kind", sorted(CONVS))
def test_fold_conv_bn_equals_scale_times_bn_of_the_conv(kind, affine, scale):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, **CONVS[kind]).double()
    if conv.bias is not None:
        conv.bias.data.normal_(0.0, 1.0)
    bn = random_bn(6, affine, eps=0.25)  # an eps that matters next to the variances
    x = torch.randn(2, 4, 9, 11, dtype=torch.float64)
    before = [t.clone() for t in (*conv.parameters(), *bn.state_dict().values())]
    folded = fold_conv_bn(conv, bn, scale)
    want = scale * bn_by_hand(conv(x), bn)
    torch.testing.assert_close(folded(x), want, rtol=1e-12, atol=1e-12)
    assert folded.bias is not None and folded.weight.dtype == torch.float64
    assert all(torch.equal(a, b) for a, b in zip(before, (*conv.parameters(), *bn.state_dict().values())))


@pytest.mark.parametrize("scale", [1.0, -0.5])
def test_fold_conv_without_bn_is_the_scaled_conv_in_the_conv_dtype(scale):
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False)
    x = torch.randn(1, 3, 8, 8)
    folded = fold_conv_bn(conv, None, scale)
    assert folded.weight.dtype == folded.bias.dtype == torch.float32
    torch.testing.assert_close(folded(x), scale * conv(x), rtol=0, atol=1e-6)
    assert torch.equal(folded.bias, torch.zeros(5))


DECONVS = {
    "stride-2": dict(kernel_size=4, stride=2, padding=1),
    "no-bias": dict(kernel_size=4, stride=2, padding=1, bias=False),
    "output-padding": dict(kernel_size=3, stride=2, padding=1, output_padding=1),
    "dilated": dict(kernel_size=3, stride=1, padding=2, dilation=2),
}


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("kind", sorted(DECONVS))
def test_fold_deconv_bn_equals_bn_of_the_transposed_conv(kind, affine):
    torch.manual_seed(2)
    deconv = nn.ConvTranspose2d(4, 3, **DECONVS[kind]).double()
    if deconv.bias is not None:
        deconv.bias.data.normal_(0.0, 1.0)
    bn = random_bn(3, affine, eps=0.2)
    x = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    folded = fold_deconv_bn(deconv, bn)
    want = bn_by_hand(deconv(x), bn)
    assert folded(x).shape == want.shape
    torch.testing.assert_close(folded(x), want, rtol=1e-12, atol=1e-12)
    assert folded.weight.dtype == torch.float64


def test_fold_deconv_bn_keeps_a_float32_deconv_in_float32():
    torch.manual_seed(3)
    deconv = nn.ConvTranspose2d(2, 3, 4, stride=2, padding=1)
    bn = random_bn(3, True, eps=1e-5, dtype=torch.float32)
    x = torch.randn(1, 2, 4, 4)
    folded = fold_deconv_bn(deconv, bn)
    assert folded.weight.dtype == folded.bias.dtype == torch.float32
    torch.testing.assert_close(folded(x), bn(deconv(x)), rtol=1e-5, atol=1e-5)


class Block(nn.Module):
    """A ResNet-style block: ``bn{i}(conv{i}(x))`` attribute pairs, and a Sequential inside."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = random_bn(4, True, 1e-3, torch.float32)
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.bn1 = random_bn(4, True, 1e-3, torch.float32)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.bn3 = random_bn(4, False, 1e-3, torch.float32)
        self.up = nn.Sequential(
            nn.ConvTranspose2d(4, 2, 4, 2, 1), random_bn(2, True, 1e-3, torch.float32), nn.ReLU()
        )
        self.tail = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), random_bn(2, True, 1e-3, torch.float32))

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.bn3(self.conv3(x))
        return self.tail(self.up(x))


def test_fold_batchnorms_folds_attribute_pairs_and_sequential_neighbours():
    torch.manual_seed(4)
    block = Block().eval()
    x = torch.randn(2, 3, 6, 6)
    want = block(x)
    assert fold_batchnorms(block) is block
    assert not any(isinstance(m, nn.BatchNorm2d) for m in block.modules())
    assert isinstance(block.bn1, nn.Identity) and isinstance(block.up[1], nn.Identity)
    torch.testing.assert_close(block(x), want, rtol=1e-5, atol=1e-5)


def test_a_grouped_transposed_conv_keeps_its_batchnorm():
    """fold_deconv_bn handles groups 1 only: a grouped one is left as it is, BN included."""
    seq = nn.Sequential(nn.ConvTranspose2d(4, 4, 2, 2, groups=2), random_bn(4, True, 1e-3, torch.float32))
    fold_batchnorms(seq)
    assert isinstance(seq[1], nn.BatchNorm2d)


# --------------------------------------------------------------------------- export_file


class Recorder(nn.Module):
    """images -> 2 images (and, with an affine, a second output: the row sums); records
    PNFS_KERNELS while traced."""

    seen: ClassVar[list[str | None]] = []

    def forward(self, images: torch.Tensor, affine: torch.Tensor | None = None):
        Recorder.seen.append(os.environ.get("PNFS_KERNELS"))
        return (2 * images, images.sum(-1)) if affine is not None else 2 * images


def test_an_unknown_format_is_named_with_the_choices(tmp_path):
    with pytest.raises(
        ValueError, match=r"^--format 'onnx2': expected one of \['onnx', 'torchscript', 'exported-program'\]$"
    ):
        export_file(Recorder(), (torch.ones(1, 3),), ["x"], "onnx2", tmp_path / "m", dynamic=False)
    assert EXPORT_FORMATS == ("onnx", "torchscript", "exported-program")


@pytest.mark.parametrize("previous", [None, "triton"])
def test_export_traces_with_the_torch_kernels_and_restores_the_setting(tmp_path, monkeypatch, previous):
    if previous is None:
        monkeypatch.delenv("PNFS_KERNELS", raising=False)
    else:
        monkeypatch.setenv("PNFS_KERNELS", previous)
    Recorder.seen = []
    export_file(Recorder(), (torch.ones(2, 3),), ["x"], "torchscript", tmp_path / "m.ts", dynamic=False)
    assert Recorder.seen and set(Recorder.seen) == {"torch"}
    assert os.environ.get("PNFS_KERNELS") == previous
    assert torch.equal(torch.jit.load(str(tmp_path / "m.ts"))(torch.ones(2, 3)), torch.full((2, 3), 2.0))


def test_the_setting_is_restored_when_the_export_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("PNFS_KERNELS", "triton")

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("broken forward")

    with pytest.raises(RuntimeError, match="broken forward"):
        export_file(Broken(), (torch.ones(1),), ["x"], "torchscript", tmp_path / "b.ts", dynamic=False)
    assert os.environ["PNFS_KERNELS"] == "triton"


@pytest.mark.parametrize("dynamic", [True, False])
def test_an_exported_program_has_a_free_batch_axis_only_when_dynamic(tmp_path, dynamic):
    out = tmp_path / "m.pt2"
    export_file(Recorder(), (torch.ones(2, 3),), ["images"], "exported-program", out, dynamic=dynamic)
    program = torch.export.load(str(out))
    assert torch.equal(program.module()(torch.ones(2, 3)), torch.full((2, 3), 2.0))
    if dynamic:
        ranges = {(int(r.lower), int(r.upper)) for r in program.range_constraints.values()}
        assert ranges == {(1, 1024)}, ranges  # any batch from 1 to 1024
        assert program.module()(torch.ones(5, 3)).shape == (5, 3)
    else:
        assert program.range_constraints == {}
        with pytest.raises(Exception, match=r"(?i)shape|size|dim|expected"):
            program.module()(torch.ones(5, 3))


def test_onnx_outputs_are_named_by_the_inputs_and_the_batch_is_free(tmp_path):
    pytest.importorskip("onnxscript")
    import onnx
    import onnxruntime

    out = tmp_path / "two.onnx"
    inputs = (torch.ones(2, 3), torch.ones(2, 2, 3))
    export_file(Recorder(), inputs, ["images", "affine"], "onnx", out, dynamic=True)
    graph = onnx.load(str(out)).graph
    assert [o.name for o in graph.output] == ["keypoints", "scores"]
    assert [i.name for i in graph.input] == ["images", "affine"]
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    keypoints, scores = session.run(
        None, {"images": torch.ones(4, 3).numpy(), "affine": torch.ones(4, 2, 3).numpy()}
    )
    assert keypoints.shape == (4, 3) and (keypoints == 2).all() and scores.shape == (4,)

    out = tmp_path / "one.onnx"
    export_file(Recorder(), (torch.ones(2, 3),), ["images"], "onnx", out, dynamic=False)
    graph = onnx.load(str(out)).graph
    assert [o.name for o in graph.output] == ["scores"]
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [2, 3]  # fixed batch


# --------------------------------------------------------------------------- DecodingModel


@pytest.mark.parametrize(
    "flip, flip_shift, refine",
    [
        (False, False, "quarter"),
        (True, False, "quarter"),
        (True, True, "gaussian"),
        (True, False, "gaussian"),
        (True, True, "quarter"),
    ],
)
def test_the_decoding_model_is_predict_in_one_module(flip, flip_shift, refine):
    """DecodingModel(network, flip permutation, flip_shift, refine) gives predict's keypoints and
    scores bit for bit (eagerly; the exports of it are compared in test_export*.py)."""
    from pnfs.config import load_config
    from pnfs.deploy import DecodingModel
    from pnfs.inference import predict
    from pnfs.model import build_model

    cfg = load_config("demo", ["data.input_size=[64,96]", "model.num_parts=1"])
    torch.manual_seed(5)
    network = build_model(cfg).eval()
    perm = cfg.joints.flip_permutation() if flip else None
    images = torch.randn(3, 3, 64, 96)
    affine = torch.tensor([[2.0, 0.1, 5.0], [-0.1, 2.5, 7.0]]).expand(3, 2, 3).contiguous()
    with torch.no_grad():
        keypoints, scores = DecodingModel(network, perm, flip_shift, refine)(images, affine)
    want = predict(network, images, affine, flip_permutation=perm, flip_shift=flip_shift, refine=refine)
    assert torch.equal(keypoints, want.keypoints) and torch.equal(scores, want.scores)
    if (flip_shift, refine) == (False, "quarter"):  # the defaults are predict's
        with torch.no_grad():
            default_keypoints, _ = DecodingModel(network, perm)(images, affine)
        assert torch.equal(default_keypoints, want.keypoints)


class Weighted(nn.Module):
    """images [N, 256] -> images @ W (a 256 x 256 weight: initializers an ONNX file must hold)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(256, 256))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images @ self.weight


def test_onnx_export_is_one_self_contained_file_named_as_asked(tmp_path, capsys):
    """The weights live inside the .onnx (no side file, external_data=False), the input keeps
    the name given (not the forward's argument name), the exporter's progress lines go to
    stderr and stdout stays empty."""
    pytest.importorskip("onnxscript")
    import onnx
    import onnxruntime

    torch.manual_seed(0)
    module = Weighted().eval()
    out = tmp_path / "export" / "w.onnx"
    out.parent.mkdir()
    export_file(module, (torch.ones(2, 256),), ["pixels"], "onnx", out, dynamic=False)
    captured = capsys.readouterr()
    assert captured.out == "" and "[torch.onnx]" in captured.err
    assert sorted(p.name for p in out.parent.iterdir()) == ["w.onnx"]
    moved = tmp_path / "elsewhere.onnx"
    out.rename(moved)  # no side file to follow it
    graph = onnx.load(str(moved)).graph
    assert [i.name for i in graph.input] == ["pixels"]
    session = onnxruntime.InferenceSession(str(moved), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 256)
    (got,) = session.run(None, {"pixels": x.numpy()})
    np.testing.assert_allclose(got, (x @ module.weight).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_onnx_export_names_its_free_batch_axis_and_hides_only_the_shared_axis_warning(tmp_path, recwarn):
    pytest.importorskip("onnxscript")
    import onnx

    out = tmp_path / "two.onnx"
    export_file(
        Recorder().train(),
        (torch.ones(2, 3), torch.ones(2, 2, 3)),
        ["images", "affine"],
        "onnx",
        out,
        dynamic=True,
    )
    graph = onnx.load(str(out)).graph
    assert {i.type.tensor_type.shape.dim[0].dim_param for i in graph.input} == {"batch"}
    messages = [str(w.message) for w in recwarn]
    assert not [m for m in messages if "axis name" in m]  # the two inputs share the batch axis on purpose
    assert [m for m in messages if "training mode" in m], "every other warning of the exporter still shows"


def test_onnx_export_checks_the_written_file_in_full(tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    import onnx

    checked: list[tuple[str, object]] = []
    real_check = onnx.checker.check_model
    monkeypatch.setattr(
        onnx.checker,
        "check_model",
        lambda path, full_check=False: (
            checked.append((path, full_check)) or real_check(path, full_check=full_check)
        ),
    )
    out = tmp_path / "c.onnx"
    export_file(Recorder(), (torch.ones(1, 3),), ["images"], "onnx", out, dynamic=False)
    assert checked == [(str(out), True)]


def test_a_missing_onnx_package_says_how_to_install_it(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(RuntimeError) as err:
        export_file(Recorder(), (torch.ones(1, 3),), ["images"], "onnx", tmp_path / "m.onnx", dynamic=False)
    assert str(err.value) == (
        "--format onnx needs the onnx and onnxscript packages (onnx is missing): pip install onnx onnxscript"
    )


def test_an_onnx_file_the_checker_refuses_is_named(tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    import onnx

    def refuse(path, full_check=False):
        raise onnx.shape_inference.InferenceError("shapes do not infer")

    monkeypatch.setattr(onnx.checker, "check_model", refuse)
    out = tmp_path / "r.onnx"
    with pytest.raises(ValueError) as err:
        export_file(Recorder(), (torch.ones(1, 3),), ["images"], "onnx", out, dynamic=False)
    assert str(err.value) == f"exported {str(out)!r} is not a valid ONNX model: shapes do not infer"


class NotAPair(nn.Module):
    """``conv`` is not a Conv2d (a Sequential holding one), ``bn`` follows it: no ``bn(conv(x))``
    pair that fold_batchnorms may fold by name (the Sequential's own neighbours aside)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU())
        self.bn = random_bn(2, True, 1e-3, torch.float32)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_fold_batchnorms_folds_a_named_pair_only_when_both_halves_are_there():
    torch.manual_seed(6)
    block = NotAPair().eval()
    x = torch.randn(1, 2, 4, 4)
    want = block(x)
    fold_batchnorms(block)
    assert isinstance(block.bn, nn.BatchNorm2d) and isinstance(block.conv, nn.Sequential)
    torch.testing.assert_close(block(x), want, rtol=0, atol=0)


# --------------------------------------------------------------------------- frozen cells and fabrics
#
# freeze's pieces on one small cell in float64 (issue 26 part 6, the deploy-mutant tests of
# docs/testing.md): a FrozenCell against the eval-mode Cell it came from (paper eqs. (1)-(2)),
# for each way a cell reads its neighbours; pruning against the same Cell with the dropped ops
# and slots giving zeros (their softmax weights are left as they are, not renormalised).

CELL_OPS = ["zero", "skip_connect", "sep_conv_3x3", "dil_conv_3x3", "avg_pool_3x3", "max_pool_3x3"]


def random_cell(has_finer: bool, has_same: bool, has_coarser: bool, seed: int = 7) -> Cell:
    """A Cell(4 channels, H=2, every op) in eval mode, float64, with beta and every BatchNorm
    far from their defaults."""
    torch.manual_seed(seed)
    cell = Cell(4, 2, CELL_OPS, has_finer, has_same, has_coarser).double()
    if cell.beta is not None:
        cell.beta.data.normal_(0.0, 1.0)
    for m in cell.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            if m.weight is not None:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0.0, 0.5)
    return cell.eval()


def cell_inputs(n: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """finer [n, 2, 8, 8], same [n, 4, 4, 4], coarser [n, 8, 2, 2] (float64)."""
    torch.manual_seed(8)
    return tuple(torch.randn(n, c, s, s, dtype=torch.float64) for c, s in ((2, 8), (4, 4), (8, 2)))


NEIGHBOURS = {
    "all three": (True, True, True),
    "no finer": (False, True, True),  # the finer slot reads `same` unchanged: two identity weights
    "no coarser": (True, True, False),
    "only finer": (True, False, False),  # every slot its own stride-2 conv of `finer`: summed
    "only same": (False, True, False),  # no beta: I = ReLU(3 * same)
}


@pytest.mark.parametrize("layout", sorted(NEIGHBOURS))
def test_a_frozen_cell_equals_its_eval_mode_cell_for_every_neighbour_layout(layout):
    cell = random_cell(*NEIGHBOURS[layout])
    alpha = torch.randn(3, len(CELL_OPS), dtype=torch.float64)
    inputs = cell_inputs()
    before = [t.clone() for t in cell.state_dict().values()]
    with torch.no_grad():
        want = cell(*inputs, alpha)
        frozen = freeze_cell(cell, alpha)
        got = frozen(*inputs)
    assert want.std() > 0.5
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(before, cell.state_dict().values()))  # left alone
    shared = {t.data_ptr() for t in frozen.state_dict().values()} & {
        t.data_ptr() for t in cell.state_dict().values()
    }
    assert not shared  # copies: changing the frozen cell (requires_grad_, .to) leaves the cell alone
    assert count_ops(frozen) == count_ops(cell) == 3 * 5  # 3 edges, 5 ops each (zero never built)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    convs = {"all three": (1, 1), "no finer": (0, 1), "no coarser": (1, 0), "only finer": (1, 0)}
    assert (len(frozen.down), len(frozen.up)) == convs.get(layout, (0, 0))  # one conv per source


class ZeroOut(nn.Module):
    """``module(x) * 0``: an op or transform that was pruned, for the reference cell."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) * 0.0


def cell_without(cell: Cell, slots: set[str], ops: dict[int, set[int]]) -> Cell:
    """A copy of ``cell`` whose beta ``slots`` and edge ops (edge -> op positions among the built
    ones, zero excluded) give zeros, with every softmax weight as it was."""
    copy_ = copy.deepcopy(cell)
    for slot in slots:
        copy_.transforms[slot] = ZeroOut(copy_.transforms[slot])
    for e, positions in ops.items():
        for k in positions:
            copy_.edge_ops[e][k] = ZeroOut(copy_.edge_ops[e][k])
    return copy_


def test_pruning_a_cell_drops_exactly_the_ops_and_slots_below_the_threshold():
    """softmax rows written out: each edge keeps its ops >= 0.15 and its strongest op, beta keeps
    its slots >= 0.15 (the zero column is never built)."""
    cell = random_cell(True, True, True)
    #                 zero  skip  sep   dil   avg   max
    rows = torch.tensor(
        [
            [0.05, 0.10, 0.30, 0.20, 0.14, 0.21],  # edge (0,1): sep, dil, max kept
            [0.50, 0.10, 0.12, 0.09, 0.11, 0.08],  # edge (0,2): all built ones below: sep kept
            [0.02, 0.16, 0.02, 0.40, 0.30, 0.10],  # edge (1,2): skip, dil, avg kept
        ],
        dtype=torch.float64,
    )
    alpha = rows.log()
    cell.beta.data = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64).log()  # finer dropped
    inputs = cell_inputs()
    with torch.no_grad():
        frozen = freeze_cell(cell, alpha, prune_below=0.15)
        # positions among the built ops: skip 0, sep 1, dil 2, avg 3, max 4
        want = cell_without(cell, {"finer"}, {0: {0, 3}, 1: {0, 2, 3, 4}, 2: {1, 4}})(*inputs, alpha)
        got = frozen(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert count_ops(frozen) == 3 + 1 + 3
    assert (list(frozen.identity), list(frozen.down), list(frozen.up)) == (["same"], [], ["coarser"])


def test_a_weight_exactly_at_the_threshold_is_kept():
    """alpha = beta = 0: every softmax weight is 1/6 (ops) and 1/3 (slots) exactly, in float64."""
    cell = random_cell(True, True, True)
    cell.beta.data.zero_()
    alpha = torch.zeros(3, len(CELL_OPS), dtype=torch.float64)
    inputs = cell_inputs()
    with torch.no_grad():
        want = cell(*inputs, alpha)
        at_op = freeze_cell(cell, alpha, prune_below=1 / 6)
        at_slot = freeze_cell(cell, alpha, prune_below=1 / 3)
    assert count_ops(at_op) == 15 and count_ops(at_slot) == 3  # above 1/6: only each edge's first op
    torch.testing.assert_close(at_op(*inputs), want, rtol=1e-12, atol=1e-12)
    assert (list(at_slot.identity), list(at_slot.down), list(at_slot.up)) == (
        ["same"],
        ["finer"],
        ["coarser"],
    )


def test_a_frozen_cell_names_the_input_it_lacks():
    frozen = freeze_cell(random_cell(True, True, False), torch.zeros(3, len(CELL_OPS), dtype=torch.float64))
    finer, same, _ = cell_inputs()
    with pytest.raises(ValueError) as err:
        frozen(None, same, None)
    assert str(err.value) == "FrozenCell: its input 'finer' is None"
    assert frozen(finer, same, None).shape == (2, 4, 4, 4)  # `coarser` is not read


def test_a_frozen_fabric_equals_its_eval_mode_fabric():
    """Two layers over three scales (4, 8, 16): every cell reads its neighbours by scale."""
    torch.manual_seed(9)
    fabric = Fabric([[4, 8], [4]], [4, 8, 16], 1, 2, CELL_OPS).double()
    fabric.alpha.data.normal_(0.0, 1.0)
    for cell in fabric.cells.values():
        cell.beta.data.normal_(0.0, 1.0)
        for m in cell.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    fabric.eval()
    inputs = {s: torch.randn(2, s, 32 // s, 32 // s, dtype=torch.float64) for s in (4, 8, 16)}
    with torch.no_grad():
        want = fabric(inputs)
        frozen = freeze_fabric(fabric)
        got = frozen(inputs)
    assert list(got) == [4] and frozen.layers == [[4, 8], [4]]
    assert sorted(frozen.cells) == ["l1_s4", "l1_s8", "l2_s4"]
    torch.testing.assert_close(got[4], want[4], rtol=1e-12, atol=1e-12)
    pruned = freeze_fabric(fabric, prune_below=0.3)
    assert count_ops(pruned) < count_ops(frozen) == 3 * 3 * 5


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.01])
def test_a_prune_threshold_outside_0_to_1_is_refused_with_the_range(bad):
    model = build_model(load_config("demo", ["data.input_size=[64,64]"]))
    with pytest.raises(ValueError) as err:
        freeze(model, prune_below=bad)
    assert str(err.value) == f"--prune-below {bad!r} must be in [0, 1)"


def test_a_batchnorm_left_unfolded_is_named(monkeypatch):
    import pnfs.deploy

    model = build_model(load_config("demo", ["data.input_size=[64,64]"]))
    monkeypatch.setattr(pnfs.deploy, "fold_batchnorms", lambda module: module)
    with pytest.raises(TypeError) as err:
        freeze(model)
    assert str(err.value) == "freeze: modules left unfolded: ['BatchNorm2d']"


def test_freeze_keeps_the_memory_format_it_is_asked_for():
    model = build_model(load_config("demo", ["data.input_size=[64,64]"]))
    for channels_last in (True, False):
        frozen = freeze(model, channels_last=channels_last)
        # convs whose two layouts differ (a depthwise [c, 1, k, k] weight is both)
        convs = [
            m.weight for m in frozen.modules() if isinstance(m, nn.Conv2d) and min(m.weight.shape[1:]) > 1
        ]
        assert convs and all(w.is_contiguous() != channels_last for w in convs)


class Fixed(nn.Module):
    """Returns ``out`` whatever it is given, and records its ``training`` flag at each call."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out
        self.modes: list[bool] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.out


def test_output_change_reports_the_largest_and_mean_difference_and_the_moved_argmaxes():
    # [N=1, K=4, 2, 2], values exact in bfloat16: joint 0's peak moves from (0, 0) to (1, 1),
    # joints 1-3 keep theirs; the differences are 0.375, 0.375 and 0.25 in 16 entries
    a = torch.tensor(
        [
            [
                [[0.875, 0.125], [0.25, 0.375]],
                [[0.125, 0.75], [0.0, 0.25]],
                [[0.5, 0.0], [0.0, 0.0]],
                [[0.0, 0.0], [0.0, 0.5]],
            ]
        ],
        dtype=torch.bfloat16,
    )
    b = torch.tensor(
        [
            [
                [[0.5, 0.125], [0.25, 0.75]],
                [[0.125, 0.5], [0.0, 0.25]],
                [[0.5, 0.0], [0.0, 0.0]],
                [[0.0, 0.0], [0.0, 0.5]],
            ]
        ]
    )
    reference, frozen = Fixed(a).train(), Fixed(b)
    change = output_change(reference, frozen, torch.zeros(1, 3, 4, 4))
    assert change == {"max_abs": 0.375, "mean_abs": 1.0 / 16, "argmax_moved": 0.25}
    assert reference.modes == [False] and reference.training  # run in eval mode, then put back
    reference.eval()
    output_change(reference, frozen, torch.zeros(1, 3, 4, 4))
    assert not reference.training


def test_output_change_puts_the_reference_back_in_training_mode_when_the_frozen_model_fails():
    class Failing(nn.Module):
        def forward(self, images):
            raise RuntimeError("frozen model failed")

    reference = Fixed(torch.zeros(1, 1, 2, 2)).train()
    with pytest.raises(RuntimeError, match="frozen model failed"):
        output_change(reference, Failing(), torch.zeros(1, 3, 4, 4))
    assert reference.training


def test_pruning_reaches_the_fabric_backbone_and_every_part():
    cfg = load_config("mpii_fabric1_p3_256", ["data.input_size=[64,64]"])
    model = trained_looking(cfg, torch.randn(1, 3, 64, 64))
    exact, pruned = freeze(model), freeze(model, prune_below=0.3)
    assert 0 < count_ops(pruned.backbone) < count_ops(exact.backbone) == count_ops(model.backbone)
    for part, exact_part, trained in zip(pruned.parts, exact.parts, model.parts):
        assert 0 < count_ops(part) < count_ops(exact_part) == count_ops(trained)


def test_a_frozen_cell_whose_ops_are_not_lists_names_them():
    """A node's (FrozenCell) and an edge's (Cell) ops are a ModuleList; count_ops, forward and
    freeze_cell check it."""
    frozen = freeze_cell(random_cell(True, True, True), torch.zeros(3, len(CELL_OPS), dtype=torch.float64))
    frozen.ops[0] = nn.Identity()
    with pytest.raises(TypeError) as err:
        frozen(*cell_inputs())
    assert str(err.value) == "freeze: a node's ops is a Identity, expected ModuleList"
    with pytest.raises(TypeError) as err:
        count_ops(frozen)
    assert str(err.value) == "freeze: a node's ops is a Identity, expected ModuleList"
    cell = random_cell(True, True, True)
    cell.edge_ops[1] = nn.Identity()
    with pytest.raises(TypeError) as err:
        count_ops(cell)
    assert str(err.value) == "freeze: an edge's ops is a Identity, expected ModuleList"
    with pytest.raises(TypeError) as err:
        freeze_cell(cell, torch.zeros(3, len(CELL_OPS), dtype=torch.float64))
    assert str(err.value) == "freeze: an edge's ops is a Identity, expected ModuleList"


def test_a_fabric_cell_that_is_not_a_cell_is_named():
    fabric = Fabric([[4]], [4], 1, 1, ["skip_connect"])
    fabric.cells["l1_s4"] = nn.Identity()
    with pytest.raises(TypeError) as err:
        freeze_fabric(fabric)
    assert str(err.value) == "freeze: fabric cell l1_s4 is a Identity, expected Cell"


# (edge, built op position, index inside the op or None, what the message names); CELL_OPS'
# built ops are skip 0, sep 1, dil 2, avg 3, max 4
BROKEN_OPS = {
    "unknown op": (0, 0, None, "freeze: no rule for the op Tanh"),
    "sep conv's pointwise conv": (0, 1, 1, "freeze: a pointwise conv is a Tanh, expected Conv2d"),
    "sep conv's BN": (1, 1, 2, "freeze: its BN is a Tanh, expected BatchNorm2d"),
    "dil conv's BN": (2, 2, 2, "freeze: its BN is a Tanh, expected BatchNorm2d"),
    "pool's BN": (0, 3, 1, "freeze: a pool's BN is a Tanh, expected BatchNorm2d"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_OPS))
def test_an_op_of_another_layout_is_named(case):
    edge, position, inner, message = BROKEN_OPS[case]
    cell = random_cell(True, True, True)
    if inner is None:
        cell.edge_ops[edge][position] = nn.Tanh()
    else:
        cell.edge_ops[edge][position][inner] = nn.Tanh()
    with pytest.raises(TypeError) as err:
        freeze_cell(cell, torch.zeros(3, len(CELL_OPS), dtype=torch.float64))
    assert str(err.value) == message


@pytest.mark.parametrize(
    "index, message",
    [
        (0, "a Downsample's conv is a Tanh, expected Conv2d"),
        (1, "a Downsample's BN is a Tanh, expected BatchNorm2d"),
    ],
)
def test_a_downsample_of_another_layout_is_named(index, message):
    cell = random_cell(True, True, True)
    cell.transforms["finer"][index] = nn.Tanh()
    with pytest.raises(TypeError) as err:
        freeze_cell(cell, torch.zeros(3, len(CELL_OPS), dtype=torch.float64))
    assert str(err.value) == "freeze: " + message


@pytest.mark.parametrize("setting", ["kernel_size", "stride", "padding", "dilation"])
def test_a_conv_setting_that_is_not_an_h_w_pair_is_named(setting):
    conv = nn.Conv2d(2, 3, 3, padding=1)
    setattr(conv, setting, (1, 1, 1))
    with pytest.raises(ValueError) as err:
        fold_conv_bn(conv)
    assert str(err.value) == f"freeze: a 2-d conv's {setting} is (1, 1, 1), expected (h, w)"
