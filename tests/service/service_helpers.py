"""Helpers of the service tests: a tiny session, an engine on a temporary state directory, and a real
uvicorn server on a free loopback port in a thread (for the official clients)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import build_tokenizer, fast_config, make_backbone
from fastapi.testclient import TestClient

from continual_transformer.service.app import create_app
from continual_transformer.service.engine import Engine
from continual_transformer.service.settings import ServiceConfig
from continual_transformer.session import Session

TOKEN = "test-token-0123456789"


def tiny_session(strategy: str = "in_context", **overrides) -> Session:
    backbone = make_backbone(build_tokenizer())
    return Session(fast_config(strategy=strategy, **overrides), backbone=backbone)


def make_engine(
    state_dir: Path, *, session: Session | None = None, start_writer: bool = True, **settings
) -> Engine:
    """An engine on ``state_dir`` over ``session`` (a fresh tiny ``in_context`` one by default)."""
    return Engine(
        ServiceConfig(state_dir=state_dir, **settings),
        session=session if session is not None else tiny_session(),
        start_writer=start_writer,
    )


@contextlib.contextmanager
def client(engine: Engine, **kwargs) -> Iterator[TestClient]:
    """An in-process client of ``engine`` (started here, closed after)."""
    engine.start(background=False)
    try:
        yield TestClient(create_app(engine, manage=False), **kwargs)
    finally:
        engine.close()


@contextlib.contextmanager
def running(engine: Engine) -> Iterator[str]:
    """Serve ``engine`` with uvicorn on a free loopback port in a thread; yields the base URL."""
    import uvicorn

    engine.start(background=False)
    app = create_app(engine, manage=False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        engine.close()
