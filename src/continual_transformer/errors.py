"""Exceptions raised by the library. Every error names what was wrong and, where it can, how to fix it."""

from __future__ import annotations


class ContinualTransformerError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(ContinualTransformerError, ValueError):
    """A configuration value or key is invalid."""


class ModelNotFoundError(ContinualTransformerError, FileNotFoundError):
    """A model name, Hugging Face id or local path could not be resolved to weights."""


class DocumentError(ContinualTransformerError, ValueError):
    """A document could not be read. Carries the file (and the line for JSONL)."""

    def __init__(self, path: object, reason: str, *, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


class CheckpointError(ContinualTransformerError, ValueError):
    """A checkpoint is missing, corrupt, from another version, or made on another base model."""


class RegistryError(ContinualTransformerError, ValueError):
    """A registered name (strategy, task method) is unknown, malformed or taken twice."""


class StrategyError(RegistryError):
    """A strategy name is unknown or a strategy was used wrongly."""
