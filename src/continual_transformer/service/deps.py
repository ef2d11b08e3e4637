"""What every router shares: the engine of a request and waiting on an engine future without blocking."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
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


async def open_stream(future: Future, stream: Iterator[str]) -> Iterator[str]:
    """The pieces of a streamed answer, once the first is there: a request refused before generating (a
    prompt too long, the service stopping) raises its :class:`ServiceError` here, so it still gets its
    status code instead of a stream that ends in an error."""
    pieces = iter(stream)
    try:
        first = await asyncio.to_thread(next, pieces, None)
    except TimeoutError as exc:
        future.cancel()
        raise ServiceError(504, str(exc)) from None
    if first is None:
        await asyncio.to_thread(finish_stream, future)  # raises the request's error, if any
        return iter(())
    return itertools.chain([first], pieces)


def finish_stream(future: Future, timeout: float = 60.0) -> Any:
    """The whole answer of a streamed request after its last piece (its :class:`ServiceError` if it
    failed)."""
    try:
        return future.result(timeout)
    except FutureTimeout:
        future.cancel()
        raise ServiceError(504, f"no result within {timeout:g} seconds") from None
    except ServiceError:
        raise
    except Exception as exc:
        raise ServiceError(500, f"generation failed: {type(exc).__name__}") from None


def stream_error(exc: Exception) -> ServiceError:
    """What a stream that fails after its first piece reports in its last event."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, TimeoutError):
        return ServiceError(504, str(exc))
    return ServiceError(500, f"generation failed: {type(exc).__name__}")
