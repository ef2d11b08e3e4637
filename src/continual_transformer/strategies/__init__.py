"""Document-learning strategies and their registry.

Every shipped strategy is declared here by module, so ``registry.names()`` lists them all without importing
torch; a strategy's module is imported (and registers its class with :func:`register_strategy`) the first time
``registry.get(name)`` asks for it. :class:`Strategy`, :class:`LearnReport` and :class:`StrategyStats` are
loaded on first access for the same reason.

A strategy's config section (``strategies.<name>`` in :class:`~continual_transformer.config.Config`) stays a
raw mapping in the config; :func:`strategy_config` types it with the class the strategy registered.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from continual_transformer.config import from_dict
from continual_transformer.errors import ConfigError, StrategyError
from continual_transformer.registry import Registry

if TYPE_CHECKING:
    from continual_transformer.config import Config
    from continual_transformer.strategies.base import LearnReport, Strategy, StrategyStats

registry: Registry[type[Strategy]] = Registry("strategy", error=StrategyError)
"""Every document-learning strategy by name (``ctt strategies``)."""

SHIPPED = (
    "ace",
    "doc2lora",
    "finetune",
    "in_context",
    "knowledge_store",
    "lora",
    "memory_bank",
    "none",
    "retrieval",
    "ttt",
)
"""Strategies that ship with the library, each in ``continual_transformer.strategies.<name>``."""

for _name in SHIPPED:
    registry.declare(_name, f"{__name__}.{_name}")
# The memory-layer strategy is declared where its module is present (it is developed alongside this package).
if importlib.util.find_spec(f"{__name__}.memory_layer") is not None:
    registry.declare("memory_layer", f"{__name__}.memory_layer")


def register_strategy(name: str, config_cls: type) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: register a :class:`Strategy` subclass as ``name`` with its config class."""
    return registry.register(name, config_cls=config_cls)


def check_strategy_names(config: Config) -> Config:
    """Refuse a config that selects or configures an unknown strategy (without importing any strategy).

    Returns ``config`` unchanged, so it can be used inline.
    """
    known = registry.names()
    if config.strategy not in registry:
        raise ConfigError(f"strategy: unknown strategy {config.strategy!r}; known: {known}")
    for name in config.strategies:
        if name not in registry:
            raise ConfigError(f"strategies.{name}: unknown strategy; known: {known}")
    return config


def strategy_config(config: Config, name: str | None = None) -> Any:
    """The typed config of strategy ``name`` (default: the selected one): its section of ``config.strategies``
    read into the strategy's registered config class, defaults filled in. Errors name the full key path."""
    name = name or config.strategy
    if name not in registry:
        raise ConfigError(f"strategies.{name}: unknown strategy; known: {registry.names()}")
    config_cls = registry.get(name).config_cls
    section = config.strategies.get(name)
    if isinstance(section, config_cls):
        return section
    return from_dict(config_cls, section, f"strategies.{name}")


_LAZY = {"LearnReport": "base", "Strategy": "base", "StrategyStats": "base"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SHIPPED",
    "LearnReport",
    "Strategy",
    "StrategyStats",
    "check_strategy_names",
    "register_strategy",
    "registry",
    "strategy_config",
]
