"""Bearer-token auth and request-size limits, as ASGI middleware: both run before a body is read or parsed."""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any

from continual_transformer.service.errors import error_body

OPEN_PATHS = frozenset({"/health", "/ready"})
"""Probes answer without a token (they say nothing about the learned state)."""


async def send_error(send: Any, path: str, status: int, message: str, headers: dict[str, str] | None = None):
    body = json.dumps(error_body(path, status, message)).encode("utf-8")
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def token_matches(header: bytes | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (constant-time comparison)."""
    if header is None:
        return False
    scheme, _, given = header.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(given.strip(), token.encode("utf-8"))


class TokenAuth:
    """Refuses (401) every request but the probes that does not carry the token."""

    def __init__(self, app: Any, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.token is None or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization")
        if not token_matches(header, self.token):
            message = "missing bearer token" if header is None else "invalid bearer token"
            await send_error(send, scope["path"], 401, message, {"www-authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)


class BodyTooLarge(Exception):
    """A body passed the limit while being read (kept for handlers; :class:`BodyLimit` answers 413 itself)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over the limit of {limit:,} bytes")
        self.limit = limit


class BodyLimit:
    """Refuses bodies over ``max_bytes`` with 413 (at once from ``Content-Length``, else while reading) and
    bodies not received in full within ``timeout`` seconds with 408 (a slow or stalled client holds no
    handler). The body is read here, before the app sees any of it, then handed on. The server enforces that
    a body is as long as its ``Content-Length`` says."""

    def __init__(self, app: Any, max_bytes: int, timeout: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await send_error(send, path, 400, "invalid Content-Length")
                return
            if int(length) > self.max_bytes:
                message = f"request body is {int(length):,} bytes, over the limit of {self.max_bytes:,}"
                await send_error(send, path, 413, message)
                return
            if int(length) == 0:
                await self.app(scope, receive, send)
                return
        elif scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0.0))
            except TimeoutError:
                await send_error(
                    send, path, 408, f"the request body was not received within {self.timeout:g} seconds"
                )
                return
            if message["type"] != "http.request":  # the client went away
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await send_error(send, path, 413, str(BodyTooLarge(self.max_bytes)))
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
