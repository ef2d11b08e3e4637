"""``ctt serve``: a service that learns while it serves.

One :class:`~continual_transformer.session.Session` behind a readers-writer lock; learning requests are
journaled (fsync) before they are acknowledged and applied in order by one writer thread; answers are
batched by one generation thread. Native, OpenAI-compatible and Ollama-compatible routes share the session,
so what was learned applies to every one of them. See :func:`serve` and
:mod:`continual_transformer.service.engine`.

Importing this package imports neither torch nor fastapi; :func:`serve` and :func:`create_app` do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from continual_transformer.service.settings import ServiceConfig

if TYPE_CHECKING:
    from continual_transformer.service.app import create_app
    from continual_transformer.service.engine import Engine
    from continual_transformer.service.run import serve

_LAZY = {
    "create_app": "continual_transformer.service.app",
    "Engine": "continual_transformer.service.engine",
    "serve": "continual_transformer.service.run",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Engine", "ServiceConfig", "create_app", "serve"]
