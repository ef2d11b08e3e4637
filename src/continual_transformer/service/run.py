"""``serve``: build the session, restore its state and serve it over HTTP until interrupted."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from continual_transformer.service.settings import ServiceConfig, is_loopback
from continual_transformer.service.store import ServiceStartError, StateDirBusy

__all__ = ["ServiceStartError", "StateDirBusy", "resolve_token", "serve"]

if TYPE_CHECKING:
    from continual_transformer.backbone import Backbone
    from continual_transformer.config import Config

logger = logging.getLogger(__name__)

TOKEN_ENV = "CTT_SERVE_TOKEN"
"""Environment variable read for the token when none is given."""
TOKEN_FILE = "token"
"""File in the state directory holding the generated token (mode 0600)."""


def resolve_token(host: str, token: str | None, state_dir: Path) -> str | None:
    """The token to require: ``token``, else ``$CTT_SERVE_TOKEN``, else (beyond loopback only) the one in
    ``state_dir/token``, generated on first use. ``None`` (no auth) only on loopback."""
    token = token or os.environ.get(TOKEN_ENV) or None
    if token is not None or is_loopback(host):
        return token
    path = state_dir / TOKEN_FILE
    if path.exists():
        token = path.read_text(encoding="utf-8").strip()
    if not token:
        state_dir.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(token + "\n")
    logger.warning("binding %s beyond loopback: bearer-token auth is on; the token is in %s", host, path)
    return token


def serve(
    config: Config,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    state_dir: str | Path = "ctt-serve",
    token: str | None = None,
    queue_size: int = 64,
    checkpoint_interval: float = 60.0,
    backbone: Backbone | None = None,
    init_from: str | Path | None = None,
    log_level: str = "info",
    **options: Any,
) -> None:
    """Serve a session built from ``config`` (on ``backbone`` when given) until SIGINT/SIGTERM.

    State lives in ``state_dir``: the last snapshot is restored and the journal replayed (in the
    background; ``/ready`` answers 503 until done), and a final snapshot is written on shutdown. A new
    state directory starts from the checkpoint ``init_from`` (e.g. one written by ``ctt learn``) when
    given. ``options`` are further :class:`ServiceConfig` fields (``max_batch``, ``max_body_bytes``,
    ``request_timeout``, ...). Raises :class:`StateDirBusy` when another service holds ``state_dir`` and
    :class:`ServiceStartError` when it is not a service state directory or the state cannot be restored.
    """
    import uvicorn

    from continual_transformer.service.app import create_app
    from continual_transformer.service.engine import Engine
    from continual_transformer.session import Session

    state_dir = Path(state_dir)
    settings = ServiceConfig(
        host=host,
        port=port,
        state_dir=state_dir,
        token=resolve_token(host, token, state_dir),
        queue_size=queue_size,
        checkpoint_interval=checkpoint_interval,
        **options,
    )
    server: uvicorn.Server | None = None

    def stop(reason: str) -> None:
        if server is not None:
            server.should_exit = True

    engine = Engine(
        settings,
        session_factory=lambda: Session(config, backbone=backbone),
        on_fatal=stop,
        init_from=Path(init_from) if init_from is not None else None,
    )
    engine.start(background=True)  # takes the state-dir lock now: a busy directory fails before binding
    try:
        app = create_app(engine, manage=False)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level=log_level,
                limit_concurrency=settings.limit_concurrency,
                timeout_keep_alive=5,
                timeout_graceful_shutdown=10,
                server_header=False,
            )
        )
        server.run()
    finally:
        engine.close()
    if engine.start_error is not None:
        raise ServiceStartError(engine.start_error)
