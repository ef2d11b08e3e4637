"""The FastAPI application: the native, OpenAI-compatible and Ollama-compatible routers over one engine.

Middleware order (outermost first): token auth, then the body-size limit, then FastAPI, so an
unauthenticated or oversized request is refused before its body is read. Every error is answered as JSON
(:mod:`continual_transformer.service.errors`); unexpected exceptions are logged and answered with a
generic 500 that carries no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from continual_transformer.errors import ContinualTransformerError
from continual_transformer.service.auth import BodyLimit, BodyTooLarge, TokenAuth
from continual_transformer.service.engine import Engine
from continual_transformer.service.errors import ServiceError, error_body
from continual_transformer.version import __version__

logger = logging.getLogger(__name__)


def _json_error(request: Request, status: int, message: str, code: str | None = None, **kw) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, status, message, code), status_code=status, **kw)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    more = len(exc.errors()) - 3
    return "invalid request: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"retry-after": "1"} if exc.status in (429, 503) else None
        return _json_error(request, exc.status, exc.message, exc.code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _json_error(request, 400, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return _json_error(request, exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return _json_error(request, 413, str(exc))

    @app.exception_handler(ContinualTransformerError)
    async def library_error(request: Request, exc: ContinualTransformerError) -> JSONResponse:
        return _json_error(request, 400, str(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled %s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc)
        return _json_error(request, 500, "internal error (logged on the server)")


def create_app(engine: Engine, *, manage: bool = True) -> FastAPI:
    """The application over ``engine``. With ``manage`` its lifespan starts the engine (restoring state in
    the background; ``/ready`` says when it is done) and closes it (final snapshot) on shutdown."""
    from continual_transformer.service import native, ollama, openai

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage:
            engine.start(background=True)
        try:
            yield
        finally:
            if manage:
                await asyncio.to_thread(engine.close)

    app = FastAPI(
        title="Continual Tiny Transformer",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.engine = engine
    install_error_handlers(app)
    app.include_router(native.router)
    app.include_router(openai.router)
    app.include_router(ollama.router)
    app.add_middleware(
        BodyLimit, max_bytes=engine.settings.max_body_bytes, timeout=engine.settings.body_timeout
    )
    app.add_middleware(TokenAuth, token=engine.settings.token)  # added last: runs first
    return app
