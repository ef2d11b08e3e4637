"""Errors the service answers with: an HTTP status, a message meant for the client and a short code.

Native and OpenAI-compatible routes answer ``{"error": {"message", "type", "code"}}`` (what the ``openai``
client reads); Ollama-compatible routes (``/api/...``) answer ``{"error": "message"}`` (what the ``ollama``
client reads). No traceback ever reaches a client: unexpected exceptions are logged and answered with a
generic 500.
"""

from __future__ import annotations

from typing import Any

OLLAMA_PREFIX = "/api/"

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    501: "not_implemented_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ServiceError(Exception):
    """A request the service refuses or cannot serve, with the status and message the client gets."""

    def __init__(self, status: int, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _TYPES.get(status, "server_error")


def error_body(path: str, status: int, message: str, code: str | None = None) -> dict[str, Any]:
    """The JSON error body for a request to ``path`` (Ollama's shape under ``/api/``, OpenAI's elsewhere)."""
    if path.startswith(OLLAMA_PREFIX):
        return {"error": message}
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "server_error"),
            "code": code or _TYPES.get(status, "server_error"),
        }
    }
