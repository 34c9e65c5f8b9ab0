"""Configs: presets load, overrides apply, and every bad input fails at load time with a
message naming the key and the value (issue 2, item 4)."""

from __future__ import annotations

import pytest

from pnfs.config import ConfigError, config_to_dict, dump_config, load_config


def test_defaults_and_overrides():
    cfg = load_config("mpii_mobilenetv2_p3_256", ["train.lr=5e-4", "model.backbone.name=resnet50"])
    assert cfg.train.lr == 5e-4 and cfg.model.backbone.name == "resnet50"
    assert cfg.model.channels == 10 and cfg.data.dataset == "mpii"
    assert len(cfg.parts) == 3 and cfg.num_joints == 16


def test_dump_and_reload_round_trip(tmp_path):
    cfg = load_config("demo", ["model.hidden_nodes=2"])
    dump_config(cfg, tmp_path / "run.yaml")
    assert config_to_dict(load_config(tmp_path / "run.yaml")) == config_to_dict(cfg)


def _error(*overrides: str, preset: str = "mpii_mobilenetv2_p3_256") -> str:
    with pytest.raises(ConfigError) as err:
        load_config(preset, list(overrides))
    return str(err.value)


def test_unknown_key():
    message = _error("model.channel=10")
    assert "model.channel" in message and "unknown key" in message


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key"):
        load_config(path)


def test_wrong_type():
    message = _error("model.channels=ten")
    assert "model.channels" in message and "'ten'" in message and "integer" in message
    assert "train.lr" in _error("train.lr=[1]")


def test_num_parts_without_a_table_i_grouping():
    message = _error("model.num_parts=4")
    assert "model.num_parts" in message and "4" in message and "custom_parts" in message


def test_other_num_parts_with_a_custom_grouping_loads():
    cfg = load_config(
        "mpii_mobilenetv2_p3_256",
        ["model.num_parts=2", "model.custom_parts=[[0,1,2,3,4,5,6,7],[8,9,10,11,12,13,14,15]]"],
    )
    assert len(cfg.parts) == 2


def test_vector_dim_below_one():
    message = _error("model.vector_dim=0")
    assert "model.vector_dim" in message and "0" in message and ">= 1" in message


def test_unknown_op_name():
    message = _error("model.ops=[zero,skip_connect,conv_5x5]")
    assert "model.ops[2]" in message and "conv_5x5" in message


def test_input_size_not_divisible_by_32():
    message = _error("data.input_size=[256,200]")
    assert "data.input_size" in message and "[256, 200]" in message and "32" in message


def test_unknown_backbone():
    message = _error("model.backbone.name=vgg16")
    assert "model.backbone.name" in message and "vgg16" in message


def test_fabric_backbone_too_shallow_for_the_pyramid():
    message = _error("model.backbone.fabric_layers=2", preset="demo")
    assert "model.backbone.fabric_layers" in message and "2" in message


def test_missing_weights_file():
    message = _error("model.backbone.weights=/nonexistent/mobilenet.pth")
    assert "model.backbone.weights" in message and "/nonexistent/mobilenet.pth" in message


def test_unknown_preset():
    with pytest.raises(ConfigError, match="no_such_preset"):
        load_config("no_such_preset")


@pytest.mark.parametrize(
    ("override", "key", "why"),
    [
        ("model.hidden_nodes=0", "model.hidden_nodes", ">= 1"),
        ("model.channels=0", "model.channels", ">= 1"),
        ("model.ops=[zero,skip_connect,skip_connect]", "model.ops", "twice"),
        ("model.ops=[zero]", "model.ops", "other than zero"),
        ("model.backbone.fabric_channels=0", "model.backbone.fabric_channels", ">= 1"),
        ("model.backbone.fabric_hidden_nodes=0", "model.backbone.fabric_hidden_nodes", ">= 1"),
        ("model.backbone.fabric_stem_channels=0", "model.backbone.fabric_stem_channels", ">= 1"),
        ("data.input_size=[256]", "data.input_size", "[height, width]"),
        ("data.input_size=[0,256]", "data.input_size", "multiples of 32"),
    ],
)
def test_other_impossible_model_values(override, key, why):
    message = _error(override)
    assert message.startswith(f"{key}: ") and why in message


def test_custom_grouping_that_misses_a_joint():
    message = _error("model.custom_parts=[[0,1,2],[3,4,5,6,7,8,9,10,11,12,13,14]]")
    assert "model.custom_parts" in message and "[15]" in message and "no part" in message
