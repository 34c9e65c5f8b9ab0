"""A model and its config from a checkpoint, for evaluation and prediction.

Accepted files (read with ``torch.load(weights_only=True)``):

* a pnfs training checkpoint: a dict with ``"model"`` (state dict) and ``"config"`` (plain
  dict of :func:`pnfs.config.config_to_dict`); ``--config`` is then optional;
* a bare state dict, when a config is given.

A config file given explicitly wins over the checkpoint's own; ``key=value`` overrides apply
last. DDP's ``module.`` prefixes are removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from pnfs.config import Config, ConfigError, config_from_dict, deep_merge, load_config, parse_override
from pnfs.model import build_model


def _read(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, foreign pickles
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"checkpoint {str(path)!r} cannot be read: {first}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a dict")
    return obj


def load_for_inference(
    checkpoint: str | Path, config: str | Path | None = None, overrides: Sequence[str] = ()
) -> tuple[torch.nn.Module, Config]:
    """(model in eval mode on the CPU with the checkpoint's weights, its config)."""
    path = Path(checkpoint)
    obj = _read(path)
    is_training_checkpoint = isinstance(obj.get("model"), dict)
    state = obj["model"] if is_training_checkpoint else obj
    if config is not None:
        cfg = load_config(config, overrides)
    elif is_training_checkpoint and isinstance(obj.get("config"), dict):
        data = obj["config"]
        for text in overrides:
            data = deep_merge(data, parse_override(text))
        try:
            cfg = config_from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"checkpoint {str(path)!r}: its config is not valid here: {err}") from None
    else:
        raise ConfigError(f"checkpoint {str(path)!r} holds a bare state dict (no 'config'); give --config")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {str(path)!r}: 'model' is not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = build_model(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit the config's model ({_model_label(cfg)}): "
            f"{_first_mismatch(err)}"
        ) from None
    return model.eval(), cfg


def _model_label(cfg: Config) -> str:
    """What the config builds, in the terms that tell two checkpoints apart: a PoseNFS by its
    backbone, P, C and d; a Table VI baseline by its name and d (it has no parts or fabric)."""
    m = cfg.model
    if m.name != "pnfs":
        return f"{m.name}, d={m.vector_dim}"
    return f"backbone {m.backbone.name}, P={m.num_parts}, C={m.channels}, d={m.vector_dim}"


def _first_mismatch(err: RuntimeError) -> str:
    """The first line of a failed ``load_state_dict`` after torch's "Error(s) in loading
    state_dict for ...:" header (missing, unexpected or mis-sized keys), cut at 240 characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    first = lines[0] if lines else type(err).__name__
    return first if len(first) <= 240 else first[:240] + " ..."
