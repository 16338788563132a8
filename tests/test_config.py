"""Config: recipes, flag overrides, strict keys, invalid combinations rejected."""

import pytest

from nmtkit.config import Config, ModelConfig, resolve_config
from nmtkit.errors import UsageError


def test_flags_override_recipe_and_set_overrides_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  hidden_size: 128\n  attention: luong-dot\ntrain:\n  lr: 0.5\n")
    config = resolve_config(recipe, {"model": {"attention": "luong-concat", "layers": None}, "train": {}},
                            ["train.lr=0.25", "model.rnn=gru"])
    assert config.model.hidden_size == 128
    assert config.model.attention == "luong-concat"  # flag beats recipe
    assert config.model.layers == ModelConfig().layers  # None flag leaves the default
    assert config.train.lr == 0.25 and config.model.rnn == "gru"


def test_unknown_keys_are_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  hiden_size: 128\n")
    with pytest.raises(UsageError, match=r"unknown key\(s\) \['hiden_size'\]"):
        resolve_config(recipe, {})


def test_wrong_types_and_missing_recipe(tmp_path):
    with pytest.raises(UsageError, match="hidden_size must be int"):
        Config.from_dict({"model": {"hidden_size": "big"}})
    with pytest.raises(UsageError, match="recipe not found"):
        resolve_config(tmp_path / "missing.yaml", {})
    with pytest.raises(UsageError, match="section.key=value"):
        resolve_config(None, {}, ["lr=1"])


def test_round_trip_through_plain_dict():
    config = Config()
    config.model.attention = "bahdanau"
    again = Config.from_dict(config.to_dict())
    assert again == config


@pytest.mark.parametrize("changes, message", [
    ({"encoder": "transformer"}, "unknown encoder 'transformer'"),
    ({"attention": "none"}, "go together"),
    ({"decoder": "none"}, "go together"),
    ({"decoder": "none", "attention": "none", "window": "local-p"}, "needs an attention score"),
    ({"attention": "luong-location"}, "max_source_len"),
    ({"encoder": "rnn", "bridge": "backward"}, "needs encoder 'birnn'"),
    ({"hidden_size": 255}, "must be even"),
    ({"rnn": "rnn_tanh"}, "unknown rnn"),
    ({"window": "local-m", "window_size": 0}, "window_size"),
])
def test_invalid_combinations_fail_at_config_time(changes, message):
    cfg = ModelConfig(**changes)
    with pytest.raises(UsageError, match=message):
        cfg.validate()


def test_auto_bridge():
    assert ModelConfig(decoder="bahdanau", encoder="birnn").resolved().bridge == "backward"
    assert ModelConfig(decoder="luong").resolved().bridge == "projection"
