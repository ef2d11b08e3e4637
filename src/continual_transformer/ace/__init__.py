"""Agentic Context Engineering (Zhang et al. 2025): a playbook of itemised bullets, the Generator, Reflector
and Curator roles, and the language-model backends they talk to.

The strategy that puts them together is :mod:`continual_transformer.strategies.ace` (``strategy: ace``).
Importing this package imports no torch.
"""

from continual_transformer.ace.backends import (
    BackboneBackend,
    BackendConnectionError,
    BackendError,
    BackendTimeoutError,
    LLMBackend,
    MalformedReplyError,
    OllamaBackend,
    OpenAIBackend,
    make_backend,
)
from continual_transformer.ace.operations import (
    MergeReport,
    Operation,
    ParseResult,
    apply_operations,
    evict,
    extract_json,
    parse_operations,
)
from continual_transformer.ace.playbook import Bullet, Playbook, PlaybookError, PlaybookStore, read_playbook
from continual_transformer.ace.roles import QAPair, Reflection, parse_reflection

__all__ = [
    "BackboneBackend",
    "BackendConnectionError",
    "BackendError",
    "BackendTimeoutError",
    "Bullet",
    "LLMBackend",
    "MalformedReplyError",
    "MergeReport",
    "OllamaBackend",
    "OpenAIBackend",
    "Operation",
    "ParseResult",
    "Playbook",
    "PlaybookError",
    "PlaybookStore",
    "QAPair",
    "Reflection",
    "apply_operations",
    "evict",
    "extract_json",
    "make_backend",
    "parse_operations",
    "parse_reflection",
    "read_playbook",
]
