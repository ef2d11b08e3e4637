"""Continual Tiny Transformer: keep a language model learning documents and tasks without forgetting.

The public names load on first access, so ``import continual_transformer`` (and ``ctt --help``) import no
torch; ``continual_transformer.ContinualTransformer`` brings in the model stack when it is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Bound at import (both are torch-free): the strategy registry instance must win over the submodule
# ``continual_transformer.registry``, which the import system binds to the same attribute name.
from continual_transformer.strategies import register_strategy, registry

if TYPE_CHECKING:
    from continual_transformer.backbone import Backbone
    from continual_transformer.config import Config, load_config
    from continual_transformer.continual import ContinualTransformer
    from continual_transformer.documents import Document, read_documents
    from continual_transformer.session import Session
    from continual_transformer.strategies import LearnReport, Strategy, StrategyStats
    from continual_transformer.version import __version__

_LAZY = {
    "Backbone": "continual_transformer.backbone",
    "Config": "continual_transformer.config",
    "ContinualTransformer": "continual_transformer.continual",
    "Document": "continual_transformer.documents",
    "LearnReport": "continual_transformer.strategies",
    "Session": "continual_transformer.session",
    "Strategy": "continual_transformer.strategies",
    "StrategyStats": "continual_transformer.strategies",
    "__version__": "continual_transformer.version",
    "load_config": "continual_transformer.config",
    "read_documents": "continual_transformer.documents",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "Backbone",
    "Config",
    "ContinualTransformer",
    "Document",
    "LearnReport",
    "Session",
    "Strategy",
    "StrategyStats",
    "__version__",
    "load_config",
    "read_documents",
    "register_strategy",
    "registry",
]
