"""One registry type for every pluggable family (document strategies, task methods).

Names are lower-case identifiers, unique within a family. An entry is either registered with its class
(``@registry.register("name", config_cls=...)``) or declared lazily by module (``registry.declare("name",
"package.module")``): a declared entry is listed by :meth:`Registry.names` without importing anything, and its
module is imported the first time :meth:`Registry.get` asks for it. That keeps ``ctt --help`` and
``import continual_transformer`` free of torch while ``registry.get("ttt")`` still finds the class.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Generic, TypeVar

from continual_transformer.errors import RegistryError

T = TypeVar("T", bound=type)

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


class Registry(Generic[T]):
    """Named classes of one family. ``kind`` names the family in errors ("strategy", "task method"); ``error``
    is the exception raised (a :class:`RegistryError` subclass, so a family can keep its own error type)."""

    def __init__(self, kind: str, *, error: type[RegistryError] = RegistryError) -> None:
        self.kind = kind
        self.error = error
        self._classes: dict[str, T] = {}
        self._modules: dict[str, str] = {}

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise self.error(f"{self.kind} name {name!r} must be lower-case letters, digits and underscores")

    def declare(self, name: str, module: str) -> None:
        """Make ``name`` known without importing ``module``; the module registers the class when imported."""
        self._check_name(name)
        declared = self._modules.get(name)
        if declared is not None and declared != module:
            raise self.error(f"{self.kind} {name!r} is already declared by module {declared}")
        self._modules[name] = module

    def register(self, name: str, *, config_cls: type | None = None) -> Callable[[T], T]:
        """Class decorator: register ``cls`` under ``name`` (and set ``cls.name``, ``cls.config_cls``)."""
        self._check_name(name)

        def decorate(cls: T) -> T:
            existing = self._classes.get(name)
            if existing is not None and existing.__qualname__ != cls.__qualname__:
                raise self.error(f"{self.kind} {name!r} is already registered by {existing.__qualname__}")
            declared = self._modules.get(name)
            if existing is None and declared is not None and cls.__module__ != declared:
                raise self.error(f"{self.kind} {name!r} is already declared by module {declared}")
            cls.name = name
            if config_cls is not None:
                cls.config_cls = config_cls
            self._classes[name] = cls
            return cls

        return decorate

    def get(self, name: str) -> T:
        """The class registered as ``name``, importing its module on first use."""
        if name not in self._classes and name in self._modules:
            importlib.import_module(self._modules[name])
            if name not in self._classes:
                raise self.error(
                    f"{self.kind} {name!r} is declared by module {self._modules[name]}, "
                    "which did not register it"
                )
        try:
            return self._classes[name]
        except KeyError:
            raise self.error(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        """Every known name, sorted (declared names included; nothing is imported)."""
        return sorted({*self._classes, *self._modules})

    def __contains__(self, name: object) -> bool:
        return name in self._classes or name in self._modules

    def load_all(self) -> dict[str, T]:
        """Import every declared module; ``{name: class}`` of the whole family."""
        return {name: self.get(name) for name in self.names()}
