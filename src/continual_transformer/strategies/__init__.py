"""Document-learning strategies and their registry.

Each strategy module registers itself with :func:`register_strategy`; importing this package imports them all,
so ``registry.names()`` lists every strategy the library ships.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

from continual_transformer.errors import StrategyError
from continual_transformer.strategies.base import LearnReport, Strategy, StrategyStats

S = TypeVar("S", bound=type[Strategy])
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class StrategyRegistry:
    def __init__(self) -> None:
        self._strategies: dict[str, type[Strategy]] = {}

    def register(self, name: str, config_cls: type) -> Callable[[S], S]:
        if not _NAME.match(name):
            raise StrategyError(f"strategy name {name!r} must be lower-case letters, digits and underscores")

        def decorate(cls: S) -> S:
            if name in self._strategies and self._strategies[name] is not cls:
                raise StrategyError(
                    f"strategy {name!r} is already registered by {self._strategies[name].__qualname__}"
                )
            cls.name = name
            cls.config_cls = config_cls
            self._strategies[name] = cls
            return cls

        return decorate

    def get(self, name: str) -> type[Strategy]:
        try:
            return self._strategies[name]
        except KeyError:
            raise StrategyError(f"unknown strategy {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._strategies)


registry = StrategyRegistry()
register_strategy = registry.register

# Importing the modules registers the strategies.
from continual_transformer.strategies import (
    finetune,
    in_context,
    knowledge_store,
    lora,
    memory_bank,
    none,
    retrieval,
    ttt,
)  # noqa: E402,F401

__all__ = ["LearnReport", "Strategy", "StrategyStats", "registry", "register_strategy"]
