"""pnfs.deploy.freeze: the frozen model equals the training model in eval mode on every preset."""

from __future__ import annotations

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
    output_change,
)
from pnfs.model import build_model

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
    freeze(model)
    assert model.training
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
