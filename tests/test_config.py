from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from continual_transformer.config import Config, dump_yaml, load_config, parse_override, to_dict
from continual_transformer.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_file_matches_code_defaults():
    assert to_dict(load_config(REPO / "configs" / "default.yaml")) == to_dict(Config())


def test_precedence_defaults_file_overrides_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {device: cpu, dtype: float32}\nseed: 3\nstrategies: {finetune: {epochs: 5}}\n")
    cfg = load_config(
        path, overrides={"seed": 4}, set_items=["strategies.finetune.epochs=7", "generation.max_new_tokens=9"]
    )
    assert cfg.model.device == "cpu"  # from the file
    assert cfg.seed == 4  # overrides beat the file
    assert cfg.strategy_config("finetune").epochs == 7  # --set beats both
    assert cfg.strategy_config("finetune").learning_rate == 1e-4  # default kept
    assert cfg.generation.max_new_tokens == 9


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("modle: {name: x}", "unknown config key 'modle'"),
        ("model: {nmae: x}", "unknown config key 'model.nmae'"),
        ("strategies: {finetune: {lr: 1}}", "unknown config key 'strategies.finetune.lr'"),
        ("strategies: {nope: {}}", "strategies.nope"),
        ("seed: three", "seed: expected an integer"),
        ("model: {device: gpu0}", "model.device"),
        ("documents: {chunk_overlap: 600}", "documents.chunk_overlap"),
        ("- a\n- b", "top level must be a mapping"),
        ("model: [", "invalid YAML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(path)


def test_config_is_frozen_and_caller_dicts_are_not_mutated():
    overrides = {"model": {"device": "cpu"}}
    snapshot = yaml.safe_dump(overrides)
    cfg = load_config(overrides=overrides, set_items=["model.dtype=float32"])
    assert yaml.safe_dump(overrides) == snapshot
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.strategies["finetune"] = None  # type: ignore[index]


def test_dump_yaml_round_trips(tmp_path):
    cfg = load_config(set_items=["strategies.finetune.layers=-4:", "generation.system_prompt=Be brief."])
    path = tmp_path / "dump.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


def test_parse_override_types():
    assert parse_override("a.b=0.5") == {"a": {"b": 0.5}}
    assert (
        load_config(set_items=["strategies.finetune.learning_rate=1e-3"]).strategy_config().learning_rate
        == 1e-3
    )
    assert parse_override("a=true") == {"a": True}
    assert parse_override("a=-8:") == {"a": "-8:"}
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("novalue")
