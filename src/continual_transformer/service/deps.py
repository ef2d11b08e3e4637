"""What every router shares: the engine of a request and waiting on an engine future without blocking."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any

from fastapi import Request

from continual_transformer.service.engine import Engine
from continual_transformer.service.errors import ServiceError


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


async def wait_for(future: Future, timeout: float) -> Any:
    """The result of an engine future, or a 504 after ``timeout`` seconds (the request is then cancelled:
    a queued answer is skipped; a queued document is still learned, it was acknowledged)."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
    except TimeoutError:
        future.cancel()
        raise ServiceError(504, f"no result within {timeout:g} seconds") from None


def check_model(engine: Engine, model: str) -> None:
    """Refuse (404) a model name this service does not serve (``name`` and ``name:latest`` are accepted)."""
    served = engine.model_id
    if model not in (served, f"{served}:latest"):
        raise ServiceError(
            404, f"model {model[:100]!r} not found; this service serves {served!r}", code="model_not_found"
        )
