"""model.backbone.weights by name: ImageNet weights through torchvision's and timm's own caches.

Nothing here downloads: the download functions are replaced by ones that fail, and the
tests put a state dict where the library's cache looks for it (a temporary TORCH_HOME, a
temporary Hugging Face hub cache), then load it through the real code path.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from pnfs.config import CONFIG_DIR, BackboneConfig, ConfigError, load_config
from pnfs.model import build_model
from pnfs.model.backbones import (
    TIMM_HRNET,
    PretrainedWeightsUnavailable,
    build_backbone,
    hf_cache_folder,
    load_pretrained_backbone,
    torchvision_cache_file,
    torchvision_imagenet_weights,
)

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Empty caches under tmp_path and no network: any download attempt raises."""
    import huggingface_hub.constants

    def no_download(*args, **kwargs):
        raise OSError("test: downloads are disabled")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def _randomised(net: nn.Module) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}


@pytest.mark.parametrize(
    ("name", "key"), [("mobilenetv2", "features.16.conv.0.0.weight"), ("resnet50", "layer4.2.conv3.weight")]
)
def test_torchvision_imagenet_weights_load_from_the_torch_hub_cache(offline, name, key):
    from torchvision.models import mobilenet_v2, resnet50

    full = {"mobilenetv2": mobilenet_v2, "resnet50": resnet50}[name](weights=None)
    state = _randomised(full)
    file = torchvision_cache_file(torchvision_imagenet_weights(name))
    assert str(file).startswith(str(offline / "torch" / "hub" / "checkpoints"))
    file.parent.mkdir(parents=True)
    torch.save(state, file)
    backbone = build_backbone(BackboneConfig(name=name))
    line = load_pretrained_backbone(backbone, BackboneConfig(name=name, weights="imagenet"))
    assert line == f"backbone {name}: ImageNet weights loaded"
    torch.testing.assert_close(backbone.state_dict()[key], state[key], rtol=0, atol=0)


def test_timm_hrnet_imagenet_weights_load_from_the_hugging_face_cache(offline):
    import timm
    from safetensors.torch import save_file

    state = _randomised(timm.create_model("hrnet_w32", pretrained=False))
    folder = hf_cache_folder(f"timm/{TIMM_HRNET}")
    assert str(folder).startswith(str(offline / "hf" / "hub"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(REVISION)
    (folder / "snapshots" / REVISION).mkdir(parents=True)
    save_file(state, str(folder / "snapshots" / REVISION / "model.safetensors"))
    backbone = build_backbone(BackboneConfig(name="hrnet_w32"))
    load_pretrained_backbone(backbone, BackboneConfig(name="hrnet_w32", weights="imagenet"))
    key = "transition3.3.0.0.weight"
    torch.testing.assert_close(backbone.state_dict()[key], state[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mobilenetv2", "hrnet_w32"])
def test_offline_without_a_cached_file_names_the_file_to_place(offline, name):
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        load_pretrained_backbone(build_backbone(BackboneConfig(name=name)), BackboneConfig(name, "imagenet"))
    message = str(info.value)
    assert "model.backbone.weights=imagenet" in message and "Offline? Place" in message
    if name == "mobilenetv2":
        assert str(offline / "torch" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth") in message
    else:
        assert str(offline / "hf" / "hub" / "models--timm--hrnet_w32.ms_in1k") in message


def test_scratch_warns_unless_none_is_written(caplog):
    backbone = build_backbone(BackboneConfig(name="mobilenetv2"))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with caplog.at_level(logging.INFO):
        load_pretrained_backbone(backbone, BackboneConfig(name="mobilenetv2", weights=None))
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "weights: none" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        load_pretrained_backbone(backbone, BackboneConfig(name="mobilenetv2", weights="none"))
        load_pretrained_backbone(build_backbone(BackboneConfig(name="fabric")), BackboneConfig(name="fabric"))
    assert [r.levelname for r in caplog.records] == ["INFO", "INFO"]
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def test_presets_default_to_imagenet_and_build_offline(offline):
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        cfg = load_config(path, ["data.input_size=[64,64]"])
        expected = None if cfg.model.backbone.name == "fabric" else "imagenet"
        assert cfg.model.backbone.weights == expected, path.name
        build_model(cfg)  # no weights are fetched: the download functions would raise


def test_imagenet_on_the_fabric_backbone_is_a_config_error():
    with pytest.raises(ConfigError, match="fabric backbone"):
        load_config("demo", ["model.backbone.weights=imagenet"])
