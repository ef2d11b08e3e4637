"""Continual Tiny Transformer: keep a language model learning documents and tasks without forgetting."""

from continual_transformer.backbone import Backbone
from continual_transformer.config import Config, load_config
from continual_transformer.continual import ContinualTransformer
from continual_transformer.documents import Document, read_documents
from continual_transformer.strategies import LearnReport, Strategy, StrategyStats, register_strategy, registry
from continual_transformer.version import __version__

__all__ = [
    "Backbone",
    "Config",
    "ContinualTransformer",
    "Document",
    "LearnReport",
    "Strategy",
    "StrategyStats",
    "__version__",
    "load_config",
    "read_documents",
    "register_strategy",
    "registry",
]
