"""Person boxes for top-down pose estimation on a plain photo: a torchvision detector by name.

    detector = PersonDetector("fasterrcnn_mobilenet_v3_large_fpn", min_score=0.5)
    boxes, scores = detector(image)          # RGB uint8 [H, W, 3] -> [P, 4] x, y, w, h; [P]

The detector's COCO weights come through torchvision's weights API and cache
(``torchvision.models.get_model_weights(name).DEFAULT.get_state_dict``, cached in
``$TORCH_HOME/hub/checkpoints``, downloaded once where there is internet), the same rules as
the backbones' ImageNet weights (:mod:`pnfs.model.backbones`): offline with no cached file,
:class:`PretrainedWeightsUnavailable` names the file to place and where. The network is built
without weights (``weights=None, weights_backbone=None``: nothing is fetched while building),
so its BatchNorms are ordinary ones in eval mode, numerically the frozen ones torchvision
builds for trained weights. Detections of the COCO class ``person`` (label 1) scoring at least
``min_score`` are kept, in the detector's order (by score).
"""

from __future__ import annotations

import numpy as np
import torch

from pnfs.model.backbones import PretrainedWeightsUnavailable, torchvision_cache_file

DEFAULT_DETECTOR = "fasterrcnn_mobilenet_v3_large_fpn"
PERSON_LABEL = 1  # COCO category "person" in torchvision's detection labels


def detector_weights(name: str):
    """torchvision's default (COCO) weights entry of detection model ``name``."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        known = torchvision.models.list_models(module=torchvision.models.detection)
        raise ValueError(
            f"--detector {name!r}: not a torchvision detection model; expected one of {known}"
        ) from None
    if "person" not in weights.meta.get("categories", ()):
        raise ValueError(f"--detector {name!r}: its weights {weights} have no 'person' class")
    return weights


def load_detector(name: str = DEFAULT_DETECTOR) -> torch.nn.Module:
    """Detection model ``name`` in eval mode with its COCO weights from torchvision's cache."""
    import torchvision

    weights = detector_weights(name)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None)
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as err:  # offline (URLError), or a broken cached file
        file = torchvision_cache_file(weights)
        raise PretrainedWeightsUnavailable(
            f"--detector {name}: torchvision's {weights} could not be loaded ({type(err).__name__}: {err}). "
            f"Offline? Place {file.name} (from {weights.url}) at {file} (the folder follows $TORCH_HOME), "
            "or give the person boxes with --box / --boxes"
        ) from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # frozen BNs have none
    if missing or unexpected:
        raise ValueError(
            f"--detector {name}: the weights in {torchvision_cache_file(weights)} do not fit: "
            f"missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    return model.eval()


class PersonDetector:
    """RGB uint8 image [H, W, 3] -> (person boxes [P, 4] x, y, w, h in image px, scores [P])."""

    def __init__(self, name: str = DEFAULT_DETECTOR, min_score: float = 0.5, device: str = "cpu") -> None:
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"--det-score {min_score!r} must be in [0, 1]")
        self.device = torch.device(device)
        self.model = load_detector(name).to(self.device)
        self.min_score = min_score

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255.0)
        (found,) = self.model([tensor.to(self.device)])
        keep = (found["labels"] == PERSON_LABEL) & (found["scores"] >= self.min_score)
        xyxy = found["boxes"][keep].double().cpu().numpy().reshape(-1, 4)
        boxes = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
        return boxes, found["scores"][keep].double().cpu().numpy()
