"""Backbones: images [N, 3, H, W] -> a 4-scale pyramid [1/4, 1/8, 1/16, 1/32] (docs/design.md §2).

* ``mobilenetv2``: torchvision ``features`` with taps after blocks 3, 6, 13, 16
  (24/32/96/160 ch). Block 17 and the last 1x1 conv are not built, so no parameter is dead.
* ``resnet50``: torchvision stem + layer1..layer4 (256/512/1024/2048 ch); no pooling/fc.
* ``hrnet_w32``: HRNet-W32 stem..stage3 + transition3, i.e. the four inputs of stage 4
  (32/64/128/256 ch), built from timm's HighResolutionNet keeping only those submodules.
* ``fabric``: stem conv3x3 s2 (3->64) + BN, conv3x3 s2 (64->64) + BN + ReLU, conv1x1
  (64->4F), then the first m layers of a fabric with all six ops (its own alpha + betas);
  the last layer's four cells are the pyramid (F*4, F*8, F*16, F*32 ch).

Every backbone has ``channels`` (the pyramid's channel counts) and ``unused_weight_prefixes``
(keys of the full torchvision/timm checkpoints we do not build).

Pretrained weights (``model.backbone.weights``) load when training starts, never when a model
is only built (:func:`load_pretrained_backbone`, called by the trainer), so building, counting
(``pnfs.summary``) and inference work offline on every preset:

* ``imagenet``: torchvision's ``IMAGENET1K_V1`` weights (MobileNetV2, ResNet-50) through
  ``torchvision.models.*_Weights.get_state_dict`` and its cache (``$TORCH_HOME/hub/checkpoints``),
  timm's ``hrnet_w32.ms_in1k`` through ``timm.create_model(pretrained=True)`` and the Hugging
  Face cache (``$HF_HOME/hub``); downloaded once where there is internet. Offline with no
  cached file: :class:`PretrainedWeightsUnavailable` naming the file to place and where.
* a path: a local state dict (:func:`load_backbone_weights`).
* ``none``: from scratch on purpose; not set (``null``): from scratch too, with a warning for
  the ImageNet backbones (the paper starts them from ImageNet).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from pnfs.config import ALL_OPS, BackboneConfig
from pnfs.model.fabric import SCALES, backbone_fabric


class Backbone(nn.Module):
    """What the models read of a backbone (module docstring): ``forward(images [N, 3, H, W])`` ->
    the pyramid, a list of [N, channels[i], H/s_i, W/s_i]."""

    channels: tuple[int, ...]
    unused_weight_prefixes: tuple[str, ...] = ()


class MobileNetV2Backbone(Backbone):
    """torchvision MobileNetV2 ``features[0..16]``: [N, 3, H, W] -> taps after blocks 3, 6, 13, 16,
    [N, 24, H/4, W/4], [N, 32, H/8, W/8], [N, 96, H/16, W/16], [N, 160, H/32, W/32]."""

    taps = (3, 6, 13, 16)
    channels = (24, 32, 96, 160)
    unused_weight_prefixes = ("features.17.", "features.18.", "classifier.")

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v2

        self.features = mobilenet_v2(weights=None).features[: self.taps[-1] + 1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        pyramid = []
        for k, block in enumerate(self.features):
            x = block(x)
            if k in self.taps:
                pyramid.append(x)
        return pyramid


class ResNet50Backbone(Backbone):
    """torchvision ResNet-50 stem + layer1..4: [N, 3, H, W] -> the four layer outputs
    [N, 256 * 2^k, H/2^(k+2), W/2^(k+2)], k=0..3."""

    channels = (256, 512, 1024, 2048)
    unused_weight_prefixes = ("fc.",)

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        pyramid = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            pyramid.append(x)
        return pyramid


class HRNetW32Backbone(Backbone):
    """HRNet-W32 stem..stage3 + transition3: [N, 3, H, W] -> the four stage-4 inputs
    [N, 32 * 2^k, H/2^(k+2), W/2^(k+2)], k=0..3."""

    channels: tuple[int, ...] = (32, 64, 128, 256)
    unused_weight_prefixes: tuple[str, ...] = (
        "stage4.", "incre_modules.", "downsamp_modules.", "final_layer.", "classifier.", "head.",
    )  # fmt: skip
    kept: tuple[str, ...] = (
        "conv1", "bn1", "act1", "conv2", "bn2", "act2",
        "layer1", "transition1", "stage2", "transition2", "stage3", "transition3",
    )  # fmt: skip

    # timm's modules, set by name (``kept``) in __init__
    conv1: nn.Module
    bn1: nn.Module
    act1: nn.Module
    conv2: nn.Module
    bn2: nn.Module
    act2: nn.Module
    layer1: nn.Module
    transition1: nn.ModuleList
    stage2: nn.Module
    transition2: nn.ModuleList
    stage3: nn.Module
    transition3: nn.ModuleList

    def __init__(self) -> None:
        super().__init__()
        import timm

        net = timm.create_model("hrnet_w32", pretrained=False)
        for name in self.kept:
            setattr(self, name, getattr(net, name))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.layer1(x)
        xl = [t(x) for t in self.transition1]
        yl = self.stage2(xl)
        xl = [yl[i] if isinstance(t, nn.Identity) else t(yl[-1]) for i, t in enumerate(self.transition2)]
        yl = self.stage3(xl)
        return [yl[i] if isinstance(t, nn.Identity) else t(yl[-1]) for i, t in enumerate(self.transition3)]


class FabricStem(nn.Sequential):
    """conv3x3 s2 (3->w) + BN, conv3x3 s2 (w->w) + BN + ReLU, conv1x1 (w -> 4F), w = 64 by
    default: [N, 3, H, W] -> [N, 4F, H/4, W/4]."""

    def __init__(self, out_channels: int, width: int = 64) -> None:
        super().__init__(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out_channels, 1, bias=False),
        )


class FabricBackbone(Backbone):
    """Stem + the first m layers of a fabric over all six ops (paper §III-C, Fig. 4 blue area):
    [N, 3, H, W] -> [N, F*s, H/s, W/s] for s = 4, 8, 16, 32 (the last layer's four cells)."""

    def __init__(self, channels: int, num_layers: int, hidden_nodes: int, stem_channels: int = 64) -> None:
        super().__init__()
        if num_layers < 3:
            raise ValueError(f"a Fabric backbone needs m >= 3 layers to reach 1/32, got {num_layers}")
        self.channels = tuple(channels * s for s in SCALES)
        self.stem = FabricStem(4 * channels, stem_channels)
        self.fabric = backbone_fabric(channels, num_layers, hidden_nodes, ALL_OPS)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.fabric({4: self.stem(x)})
        return [out[s] for s in SCALES]


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """The backbone named in ``cfg``, randomly initialised (see :func:`load_pretrained_backbone`)."""
    if cfg.name == "mobilenetv2":
        backbone: Backbone = MobileNetV2Backbone()
    elif cfg.name == "resnet50":
        backbone = ResNet50Backbone()
    elif cfg.name == "hrnet_w32":
        backbone = HRNetW32Backbone()
    elif cfg.name == "fabric":
        backbone = FabricBackbone(
            cfg.fabric_channels, cfg.fabric_layers, cfg.fabric_hidden_nodes, cfg.fabric_stem_channels
        )
    else:
        raise ValueError(f"model.backbone.name: unknown backbone {cfg.name!r}")
    return backbone


def _unwrap_state_dict(obj: object, path: str) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "backbone"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"model.backbone.weights: {path!r} holds no state dict of tensors")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in obj.items()}


def load_backbone_weights(backbone: Backbone, path: str | Path) -> None:
    """Load a local state dict (torchvision/timm key names; ``module.``/``backbone.`` prefixes
    stripped; the keys of blocks we do not build ignored). A missing or unreadable file, and
    missing or unexpected keys or shape mismatches, raise ValueError naming the file and the keys."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"model.backbone.weights: {str(path)!r} does not exist") from None
    except Exception as err:  # not a torch file, or pickled objects weights_only refuses
        raise ValueError(
            f"model.backbone.weights: {str(path)!r} is not a PyTorch state dict file: {err}"
        ) from None
    fit_backbone_state(backbone, _unwrap_state_dict(obj, str(path)), repr(str(path)))


def fit_backbone_state(backbone: Backbone, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a full torchvision/timm state dict (the keys of blocks we do not build ignored);
    missing or unexpected keys or shape mismatches raise ValueError naming ``source`` and the keys."""
    state = {k: v for k, v in state.items() if not k.startswith(tuple(backbone.unused_weight_prefixes))}
    own = backbone.state_dict()
    # old checkpoints lack BN's num_batches_tracked counters; those keep their current value
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            f"model.backbone.weights: {source} does not fit the {type(backbone).__name__}: "
            f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''} ({len(missing)}), "
            f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} ({len(unexpected)}), "
            f"shape mismatches {mismatched[:20]}"
        )
    backbone.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------- pretrained by name

IMAGENET_BACKBONES = ("mobilenetv2", "resnet50", "hrnet_w32")
TIMM_HRNET = "hrnet_w32.ms_in1k"  # timm's ImageNet HRNet-W32, on the Hugging Face hub as timm/<this>


class PretrainedWeightsUnavailable(ValueError):
    """ImageNet weights could not be fetched or read; the message names the file to place."""


def torchvision_imagenet_weights(name: str):
    """torchvision's ImageNet weights enum entry for ``mobilenetv2`` / ``resnet50`` (IMAGENET1K_V1)."""
    from torchvision.models import MobileNet_V2_Weights, ResNet50_Weights

    return {"mobilenetv2": MobileNet_V2_Weights, "resnet50": ResNet50_Weights}[name].IMAGENET1K_V1


def torchvision_cache_file(weights) -> Path:
    """Where ``torch.hub`` caches a torchvision weights file: $TORCH_HOME/hub/checkpoints/<url name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def hf_cache_folder(repo_id: str) -> Path:
    """The Hugging Face cache folder of a model repo: $HF_HOME/hub/models--<org>--<name>."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The full ImageNet classification net's state dict of backbone ``name``, from the
    library's cache (downloaded into it where the machine is online)."""
    if name in ("mobilenetv2", "resnet50"):
        weights = torchvision_imagenet_weights(name)
        try:
            return weights.get_state_dict(progress=False)
        except Exception as err:  # offline (URLError), or a broken cached file
            file = torchvision_cache_file(weights)
            raise PretrainedWeightsUnavailable(
                f"model.backbone.weights=imagenet: torchvision's {weights} could not be loaded "
                f"({type(err).__name__}: {err}). Offline? Place {file.name} (from {weights.url}) at "
                f"{file} (the folder follows $TORCH_HOME), or set model.backbone.weights to a local .pth"
            ) from None
    if name == "hrnet_w32":
        import timm

        try:
            return timm.create_model(TIMM_HRNET, pretrained=True).state_dict()
        except Exception as err:  # offline (LocalEntryNotFoundError), or a broken cached file
            folder = hf_cache_folder(f"timm/{TIMM_HRNET}")
            raise PretrainedWeightsUnavailable(
                f"model.backbone.weights=imagenet: timm's {TIMM_HRNET} could not be loaded "
                f"({type(err).__name__}: {err}). Offline? Place model.safetensors of the Hugging Face "
                f"repo timm/{TIMM_HRNET} at {folder}/snapshots/<revision>/model.safetensors with "
                f"{folder}/refs/main holding <revision> (what `hf download timm/{TIMM_HRNET} "
                "model.safetensors` writes; the folder follows $HF_HOME), or set "
                "model.backbone.weights to a local .pth"
            ) from None
    raise ValueError(
        f"model.backbone.weights=imagenet: there are no ImageNet weights for the {name} backbone"
    )


def load_pretrained_backbone(
    backbone: Backbone, cfg: BackboneConfig, log: logging.Logger | None = None
) -> str:
    """Load ``cfg.weights`` into ``backbone`` (see the module docstring) and log what happened.

    Called when training starts (not on resume: the checkpoint holds the weights). Returns
    the logged line.
    """
    log = log or logging.getLogger(__name__)
    if cfg.weights is None and cfg.name in IMAGENET_BACKBONES:
        line = (
            f"model.backbone.weights is not set: the {cfg.name} backbone starts from scratch, while the "
            "paper starts it from ImageNet (weights: imagenet); write weights: none to train from "
            "scratch on purpose"
        )
        log.warning(line)
        return line
    if cfg.weights in (None, "none"):
        line = f"backbone {cfg.name} from scratch"
    elif cfg.weights == "imagenet":
        fit_backbone_state(backbone, imagenet_state_dict(cfg.name), f"ImageNet weights of {cfg.name}")
        line = f"backbone {cfg.name}: ImageNet weights loaded"
    else:
        load_backbone_weights(backbone, cfg.weights)
        line = f"backbone {cfg.name}: weights loaded from {cfg.weights}"
    log.info(line)
    return line
