"""PoseNFS as a whole: public API, part scatter, parameter split, weights loading, loss."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2

from pnfs.config import BackboneConfig, load_config
from pnfs.keypoints import MPII
from pnfs.loss import pose_loss
from pnfs.model import PoseNFS, build_model
from pnfs.model.backbones import (
    HRNetW32Backbone,
    MobileNetV2Backbone,
    ResNet50Backbone,
    build_backbone,
    load_backbone_weights,
    load_pretrained_backbone,
)

TINY = ["model.channels=2", "model.vector_dim=4", "data.input_size=[64, 64]", "model.batched_parts=false"]


def _tiny(*overrides: str) -> PoseNFS:
    return build_model(load_config("mpii_mobilenetv2_p3_256", [*TINY, *overrides]))


def test_scores_are_the_squashed_vectors_of_each_part():
    model = _tiny().eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        scores = model(images)
        pyramid = model.backbone(images)
        for joints, part in zip(model.part_joints, model.parts):
            inputs = {s: a(x) for s, a, x in zip((4, 8, 16, 32), part.adapters, pyramid)}
            v = part.head.vectors(part.fabric(inputs)[4])
            n2 = v.reshape(2, len(joints), 4, 16, 16).square().sum(2)
            torch.testing.assert_close(scores[:, joints], n2 / (1 + n2))


def test_joints_in_several_parts_are_summed():
    model = _tiny("model.num_parts=8").eval()
    shared = [j for j in range(16) if sum(j in p for p in model.part_joints) == 2]
    assert shared == [3, 4, 5, 6, 11, 12]  # shoulders, elbows, knees (Table I, P=8)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        scores = model(images)
        pyramid = model.backbone(images)
        expected = torch.zeros(2, 16, 16, 16)
        for joints, part in zip(model.part_joints, model.parts):
            expected[:, joints] += part(pyramid)
    torch.testing.assert_close(scores, expected)
    assert float(scores.min()) >= 0 and float(scores.max()) < 2


def test_scalar_baseline_d1():
    model = _tiny("model.vector_dim=1")
    assert model.parts[0].head.conv.out_channels == 3
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 16, 16, 16)


def test_arch_and_weight_parameters_partition_the_model():
    model = build_model(load_config("demo"))
    arch, weights = model.arch_parameters(), model.weight_parameters()
    ids = {id(p) for p in model.parameters()}
    assert {id(p) for p in arch} | {id(p) for p in weights} == ids
    assert not {id(p) for p in arch} & {id(p) for p in weights}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(("alpha", "beta")) for p in arch)
    # 3 parts x (alpha + 6 betas) + backbone (alpha + 9 cells - 1 single-input cell)
    assert len(arch) == 3 * 7 + 1 + 8


def test_architecture_is_json_ready_and_normalised():
    model = build_model(load_config("demo"))
    with torch.no_grad():
        model.parts[1].fabric.alpha.normal_()
    arch = json.loads(json.dumps(model.architecture()))
    assert [p["name"] for p in arch["parts"]] == ["head", "upper_limb", "lower_limb"]
    head = arch["parts"][0]
    assert head["joints"] == ["nose", "left_eye", "right_eye", "left_ear", "right_ear"]
    assert head["ops"] == ["zero", "skip_connect", "sep_conv_3x3", "dil_conv_3x3"]
    assert head["edges"] == ["h0->h1"] and head["beta_order"] == ["finer", "same", "coarser"]
    assert list(head["beta"]) == ["l1_s4", "l1_s8", "l1_s16", "l2_s4", "l2_s8", "l3_s4"]
    for part in arch["parts"]:
        for row in part["alpha"]:
            assert sum(row) == pytest.approx(1.0)
        for beta in part["beta"].values():
            assert len(beta) == 3 and sum(beta) == pytest.approx(1.0)
    assert arch["parts"][0]["alpha"] == [[0.25] * 4]
    assert arch["parts"][1]["alpha"] != [[0.25] * 4]
    assert arch["backbone"]["ops"][-2:] == ["avg_pool_3x3", "max_pool_3x3"]
    assert "l1_s4" not in arch["backbone"]["beta"] and len(arch["backbone"]["beta"]) == 8
    assert _tiny().architecture()["backbone"] is None


def test_custom_parts_name_their_parts():
    groups = "[[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]]"
    model = _tiny(f"model.custom_parts={groups}")
    assert model.part_names == ["part0", "part1"]
    assert model.architecture()["parts"][1]["joints"] == list(MPII.joints[8:])


def test_backbone_weights_load_from_torchvision_keys(tmp_path):
    full = mobilenet_v2(weights=None)  # the whole torchvision net, incl. block 17 and classifier
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(full.state_dict(), path)
    backbone = MobileNetV2Backbone()
    load_backbone_weights(backbone, path)
    torch.testing.assert_close(backbone.features[16].conv[0][0].weight, full.features[16].conv[0][0].weight)
    cfg = load_config("mpii_mobilenetv2_p3_256", [*TINY, f"model.backbone.weights={path}"])
    model = build_model(cfg)  # building never loads weights; training start does
    load_pretrained_backbone(model.backbone, cfg.model.backbone)
    torch.testing.assert_close(
        model.backbone.features[3].conv[0][0].weight, full.features[3].conv[0][0].weight
    )


def _full_resnet50() -> nn.Module:
    from torchvision.models import resnet50

    return resnet50(weights=None)


def _full_hrnet_w32() -> nn.Module:
    import timm

    return timm.create_model("hrnet_w32", pretrained=False)


@pytest.mark.parametrize(
    ("backbone_cls", "full_net", "key"),
    [
        (ResNet50Backbone, _full_resnet50, "layer4.2.conv3.weight"),
        (HRNetW32Backbone, _full_hrnet_w32, "transition3.3.0.0.weight"),
    ],
)
def test_whole_imagenet_checkpoints_load_into_the_backbones(tmp_path, backbone_cls, full_net, key):
    """The full classification nets' state dicts (fc / stage4 / heads included) load; unused keys dropped."""
    state = full_net().state_dict()
    path = tmp_path / "imagenet.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    backbone = backbone_cls()
    load_backbone_weights(backbone, path)
    torch.testing.assert_close(backbone.state_dict()[key], state[key])


def test_building_any_backbone_downloads_nothing(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a backbone tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    for name in ("mobilenetv2", "resnet50", "hrnet_w32", "fabric"):
        assert len(build_backbone(BackboneConfig(name=name)).channels) == 4


def test_fabric_stem_width_is_configurable_and_64_by_default():
    def stem_widths(cfg: BackboneConfig) -> list[int]:
        stem = build_backbone(cfg).stem
        return [m.out_channels for m in stem if isinstance(m, nn.Conv2d)]

    fabric = dict(name="fabric", fabric_channels=2, fabric_layers=3)
    assert stem_widths(BackboneConfig(**fabric)) == [64, 64, 8]
    assert stem_widths(BackboneConfig(**fabric, fabric_stem_channels=16)) == [16, 16, 8]
    out = build_backbone(BackboneConfig(**fabric, fabric_stem_channels=16))(torch.randn(1, 3, 64, 64))
    assert [tuple(t.shape) for t in out] == [(1, 8, 16, 16), (1, 16, 8, 8), (1, 32, 4, 4), (1, 64, 2, 2)]


def test_backbone_weights_file_that_is_missing_or_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"model\.backbone\.weights: '.*absent\.pth' does not exist"):
        load_backbone_weights(MobileNetV2Backbone(), tmp_path / "absent.pth")
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"model\.backbone\.weights: '.*notes\.pth' is not a PyTorch"):
        load_backbone_weights(MobileNetV2Backbone(), path)


def test_backbone_weights_mismatch_lists_the_keys(tmp_path):
    state = mobilenet_v2(weights=None).state_dict()
    del state["features.5.conv.1.0.weight"]
    state["features.2.extra"] = torch.zeros(1)
    state["features.0.0.weight"] = torch.zeros(1, 2, 3, 3)
    path = tmp_path / "broken.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError) as err:
        load_backbone_weights(MobileNetV2Backbone(), path)
    message = str(err.value)
    assert "broken.pth" in message
    assert "features.5.conv.1.0.weight" in message and "features.2.extra" in message
    assert "features.0.0.weight: file (1, 2, 3, 3) vs model (32, 3, 3, 3)" in message


def test_backbone_weights_that_are_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="no state dict"):
        load_backbone_weights(MobileNetV2Backbone(), path)


def test_pose_loss_matches_the_formula():
    scores, targets = torch.rand(2, 3, 4, 5), torch.rand(2, 3, 4, 5)
    weights = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    expected = (
        sum(
            0.5 * weights[n, j] * ((scores[n, j] - targets[n, j]) ** 2).mean()
            for n in range(2)
            for j in range(3)
        )
        / 6
    )
    torch.testing.assert_close(pose_loss(scores, targets, weights), expected)
    assert pose_loss(targets, targets, weights) == 0


def test_pose_loss_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="weights"):
        pose_loss(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="targets"):
        pose_loss(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 5), torch.ones(2, 3))
