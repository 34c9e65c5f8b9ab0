"""``pnfs.evaluate.loading``: which files load, with which config, and what a refusal names."""

from __future__ import annotations

import pytest
import torch

from pnfs.config import ConfigError, config_to_dict, load_config
from pnfs.evaluate.loading import _first_mismatch, load_for_inference
from pnfs.model import build_model

OVERRIDES = ["model.backbone.weights=none", "train.device=cpu"]


@pytest.fixture(scope="module")
def demo():
    """(config, a model of it with random weights)."""
    torch.manual_seed(0)
    cfg = load_config("demo", OVERRIDES)
    return cfg, build_model(cfg).eval()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_ddp_checkpoint_loads_without_its_module_prefix(demo, tmp_path):
    cfg, model = demo
    path = tmp_path / "ddp.pt"
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": state, "config": config_to_dict(cfg)}, path)
    loaded, loaded_cfg = load_for_inference(path)
    assert _same_weights(loaded, model) and not loaded.training
    assert loaded_cfg.model == cfg.model


def test_a_bare_state_dict_needs_a_config_and_loads_with_one(demo, tmp_path):
    _, model = demo
    path = tmp_path / "bare.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ConfigError, match=rf"checkpoint '{path}' holds a bare state dict .*give --config"):
        load_for_inference(path)
    loaded, _ = load_for_inference(path, "demo", OVERRIDES)
    assert _same_weights(loaded, model)


def test_a_config_without_model_weights_is_not_taken_for_a_checkpoint(demo, tmp_path):
    """A dict with a 'config' but no 'model' dict is a bare state dict: it needs --config."""
    cfg, _ = demo
    path = tmp_path / "config_only.pt"
    torch.save({"config": config_to_dict(cfg)}, path)
    with pytest.raises(ConfigError, match="bare state dict"):
        load_for_inference(path)


@pytest.mark.parametrize(
    "content, error, message",
    [
        (None, FileNotFoundError, r"checkpoint '{path}' not found"),
        (b"not a checkpoint\nsecond line", ValueError, r"checkpoint '{path}' cannot be read: \S"),
        ([1, 2], ValueError, r"checkpoint '{path}' holds a list, not a dict"),
        ({"model": {"w": 1}}, ValueError, r"checkpoint '{path}': 'model' is not a state dict of tensors"),
    ],
    ids=["missing", "unreadable", "not_a_dict", "not_tensors"],
)
def test_every_refusal_names_the_file(tmp_path, content, error, message):
    path = tmp_path / "ckpt.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(error, match=message.format(path=path)) as err:
        load_for_inference(path, "demo", OVERRIDES)
    assert "\n" not in str(err.value), "one line: the first line of the reader's error only"


def test_a_checkpoint_config_that_no_longer_validates_names_the_file(demo, tmp_path):
    cfg, model = demo
    data = config_to_dict(cfg)
    data["model"]["num_parts"] = -1
    path = tmp_path / "old.pt"
    torch.save({"model": model.state_dict(), "config": data}, path)
    with pytest.raises(ConfigError, match=rf"checkpoint '{path}': its config is not valid here: "):
        load_for_inference(path)


def test_first_mismatch_drops_torch_header_and_cuts_at_240_characters():
    header = "Error(s) in loading state_dict for PoseNFS:"
    assert (
        _first_mismatch(RuntimeError(f"{header}\n\tMissing key(s): a.b\n\tUnexpected: c"))
        == "Missing key(s): a.b"
    )
    assert _first_mismatch(RuntimeError(header)) == header  # nothing after the header: keep it
    assert _first_mismatch(RuntimeError("one line")) == "one line"
    assert _first_mismatch(RuntimeError("")) == "RuntimeError"
    assert _first_mismatch(RuntimeError("x" * 240)) == "x" * 240
    assert _first_mismatch(RuntimeError("x" * 241)) == "x" * 240 + " ..."


def test_first_mismatch_of_a_header_and_one_line_is_that_line():
    """torch's header followed by a single mismatch: the mismatch, not the header."""
    header = "Error(s) in loading state_dict for PoseNFS:"
    assert _first_mismatch(RuntimeError(f"{header}\n\tsize mismatch for w: [3] vs [4]")) == (
        "size mismatch for w: [3] vs [4]"
    )


def test_a_posenfs_checkpoint_that_does_not_fit_names_backbone_parts_channels_and_d(demo, tmp_path):
    """A PoseNFS checkpoint loaded with a config of other channels: the refusal names what the
    config builds in PoseNFS terms (backbone, P, C, d), the values the config sets."""
    cfg, model = demo
    path = tmp_path / "demo.pt"
    torch.save(model.state_dict(), path)
    other = load_config("demo", [*OVERRIDES, f"model.channels={cfg.model.channels + 4}"])
    m = other.model
    label = rf"backbone {m.backbone.name}, P={m.num_parts}, C={cfg.model.channels + 4}, d={m.vector_dim}"
    with pytest.raises(
        ValueError, match=rf"checkpoint '{path}' does not fit the config's model \({label}\): "
    ):
        load_for_inference(path, "demo", [*OVERRIDES, f"model.channels={cfg.model.channels + 4}"])


class Foreign:
    """A Python object in a checkpoint: only a full unpickler (weights_only=False) builds it."""


@pytest.mark.parametrize(
    "content, first_line",
    [
        (b"not a checkpoint\nsecond line", r"Weights only load failed\. In PyTorch 2\.6, we changed"),
        (b"", r"EOFError"),  # torch's error has no text: its type stands in
        (
            {"model": {"w": torch.zeros(1)}, "note": Foreign()},
            r"Weights only load failed\. This file can still be",
        ),
    ],
    ids=["garbage", "empty", "foreign_object"],
)
def test_an_unreadable_checkpoint_gives_the_first_line_of_torchs_refusal(tmp_path, content, first_line):
    """Read with weights_only=True: a pickled Python object is refused like garbage; the message
    carries the first line of torch's own error (or its type when it has no text)."""
    path = tmp_path / "ckpt.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=rf"^checkpoint '{path}' cannot be read: {first_line}"):
        load_for_inference(path, "demo", OVERRIDES)
