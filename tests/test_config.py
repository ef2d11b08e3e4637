from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from continual_transformer.config import Config, deep_merge, dump_yaml, load_config, parse_override, to_dict
from continual_transformer.errors import ConfigError
from continual_transformer.session import default_config_yaml, resolve_config, validate_config
from continual_transformer.strategies import registry, strategy_config
from continual_transformer.tasks.config import SHIPPED_METHODS, TaskConfig

REPO = Path(__file__).resolve().parents[1]
DEFAULT_YAML = REPO / "configs" / "default.yaml"


def test_defaults_file_is_generated_from_the_config_classes():
    assert DEFAULT_YAML.read_text() == default_config_yaml(), (
        "configs/default.yaml is stale: regenerate it with the command in its header"
    )


def test_defaults_file_matches_code_defaults():
    cfg = load_config(DEFAULT_YAML)
    assert {k: v for k, v in to_dict(cfg).items() if k != "strategies"} == {
        k: v for k, v in to_dict(Config()).items() if k != "strategies"
    }
    assert sorted(cfg.strategies) == registry.names(), "every strategy has its section"
    for name in registry.names():
        assert strategy_config(cfg, name) == registry.get(name).config_cls()


def test_precedence_defaults_file_overrides_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {device: cpu, dtype: float32}\nseed: 3\nstrategies: {finetune: {epochs: 5}}\n")
    cfg = load_config(
        path, overrides={"seed": 4}, set_items=["strategies.finetune.epochs=7", "generation.max_new_tokens=9"]
    )
    assert cfg.model.device == "cpu"  # from the file
    assert cfg.seed == 4  # overrides beat the file
    assert strategy_config(cfg, "finetune").optim.epochs == 7  # --set beats both
    assert strategy_config(cfg, "finetune").optim.learning_rate == 1e-4  # default kept
    assert cfg.generation.max_new_tokens == 9


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("modle: {name: x}", "unknown config key 'modle'"),
        ("model: {nmae: x}", "unknown config key 'model.nmae'"),
        ("strategies: {finetune: {lr: 1}}", "unknown config key 'strategies.finetune.lr'"),
        ("strategies: {finetune: {epochs: many}}", "strategies.finetune.optim.epochs: expected an integer"),
        ("strategies: {nope: {}}", "strategies.nope: unknown strategy"),
        ("strategies: {finetune: 3}", "strategies.finetune: expected a mapping"),
        ("strategy: nope", "strategy: unknown strategy 'nope'"),
        ("seed: three", "seed: expected an integer"),
        ("model: {device: gpu0}", "model.device"),
        ("documents: {chunk_overlap: 600}", "documents.chunk_overlap"),
        ("tasks: {max_tasks: 0}", "tasks.max_tasks"),
        ("tasks: {method: nope}", "tasks.method: unknown method 'nope'"),
        ("tasks: {max_taks: 3}", "unknown config key 'tasks.max_taks'"),
        ("- a\n- b", "top level must be a mapping"),
        ("model: [", "invalid YAML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, message):
    """Errors name the full key, whether raised reading the file or checking it against the strategies."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        resolve_config(load_config(path))


def test_strategy_names_are_checked_without_typing_sections():
    """``validate_config`` (used by ``ctt config show``) needs no strategy module; section contents are
    checked where the strategy is built."""
    cfg = load_config(overrides={"strategies": {"finetune": {"lr": 1}}})
    assert validate_config(cfg) is cfg
    with pytest.raises(ConfigError, match="strategies.finetune.lr"):
        resolve_config(cfg)
    with pytest.raises(ConfigError, match="strategy: unknown strategy 'nope'; known: "):
        validate_config(load_config(overrides={"strategy": "nope"}))


def test_resolve_config_fills_given_sections_and_is_idempotent():
    cfg = resolve_config(load_config(set_items=["strategies.finetune.epochs=3"]))
    assert cfg.strategies["finetune"]["optim"]["epochs"] == 3
    assert cfg.strategies["finetune"]["optim"]["learning_rate"] == 1e-4  # default filled in
    assert "lora" not in cfg.strategies  # sections not given stay absent
    assert resolve_config(cfg) == cfg


def test_tasks_section_configures_the_task_learner(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tasks: {max_tasks: 6, method: replay, learning_rate: 1e-3}\n")
    cfg = load_config(path)
    assert isinstance(cfg.tasks, TaskConfig)
    assert (cfg.tasks.max_tasks, cfg.tasks.method, cfg.tasks.pool_size) == (6, "replay", 4)
    assert load_config(set_items=["tasks.pool_size=2"]).tasks.pool_size == 2


def test_shipped_task_methods_match_the_method_registry():
    """``TaskConfig`` checks ``method`` against a torch-free list: it must name exactly the shipped
    methods."""
    from continual_transformer.tasks.methods import method_names

    assert sorted(SHIPPED_METHODS) == method_names()


def test_config_is_frozen_and_caller_dicts_are_not_mutated():
    overrides = {"model": {"device": "cpu"}, "strategies": {"finetune": {"epochs": 2, "layers": "-2:"}}}
    snapshot = yaml.safe_dump(overrides)
    cfg = load_config(overrides=overrides, set_items=["model.dtype=float32"])
    assert yaml.safe_dump(overrides) == snapshot
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.strategies["finetune"] = None  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg.strategies["finetune"]["epochs"] = 9  # type: ignore[index]
    overrides["strategies"]["finetune"]["epochs"] = 5
    assert cfg.strategies["finetune"]["epochs"] == 2, "the config holds its own copy"


def test_dump_yaml_round_trips(tmp_path):
    cfg = load_config(
        set_items=[
            "strategies.finetune.layers=-4:",
            "generation.system_prompt=Be brief.",
            "tasks.max_tasks=7",
        ]
    )
    path = tmp_path / "dump.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg
    resolved = resolve_config(cfg)
    path.write_text(dump_yaml(resolved))
    assert load_config(path) == resolved


def test_parse_override_types():
    assert parse_override("a.b=0.5") == {"a": {"b": 0.5}}
    cfg = load_config(set_items=["strategies.finetune.learning_rate=1e-3"])
    assert strategy_config(cfg).optim.learning_rate == 1e-3
    assert parse_override("a=true") == {"a": True}
    assert parse_override("a=-8:") == {"a": "-8:"}
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("novalue")


def test_deep_merge_merges_nested_keys_without_touching_its_arguments():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    update = {"a": {"c": 20, "e": 5}, "d": {"x": 1}}
    merged = deep_merge(base, update)
    assert merged == {"a": {"b": 1, "c": 20, "e": 5}, "d": {"x": 1}}
    assert base == {"a": {"b": 1, "c": 2}, "d": 3} and update == {"a": {"c": 20, "e": 5}, "d": {"x": 1}}
