"""ACE's HTTP backends end to end against real servers on loopback: the project's own service (OpenAI and
Ollama protocols), a port nobody listens on, a socket that never answers, and a server whose replies are not
chat replies."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import build_tokenizer, fast_config, make_backbone, tiny_llama
from service_helpers import TOKEN, make_engine, running, tiny_session

from continual_transformer.ace.backends import (
    BackendConnectionError,
    BackendError,
    BackendTimeoutError,
    MalformedReplyError,
    OllamaBackend,
    OpenAIBackend,
    make_backend,
)
from continual_transformer.backbone import Backbone
from continual_transformer.documents import make_document
from continual_transformer.service.prompting import conversation_prompt
from continual_transformer.session import Session

MODEL = "tiny-llama"
MESSAGES = [
    {"role": "system", "content": "You are the Reflector."},
    {"role": "user", "content": "What is the capital of Veloria?"},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running(make_engine(tmp_path_factory.mktemp("state"), token=TOKEN)) as url:
        yield url


@pytest.fixture(scope="module")
def expected():
    """What the service's session answers for the flattened conversation, computed without the service."""
    prompt = conversation_prompt([(m["role"], m["content"]) for m in MESSAGES])
    return tiny_session().generate([prompt], chat=True, max_new_tokens=6)[0]


@pytest.mark.parametrize("kind", ["openai", "ollama"])
def test_http_backend_gets_the_service_answer(server, expected, kind, monkeypatch):
    monkeypatch.setenv("CTT_ACE_API_KEY", TOKEN)  # keys come from the environment
    base_url = f"{server}/v1" if kind == "openai" else server
    backend = make_backend(kind, base_url=base_url, model=MODEL, timeout=30)
    assert backend.complete(MESSAGES, max_tokens=6) == expected
    assert backend.complete_many([MESSAGES, MESSAGES], max_tokens=6) == [expected, expected]


@pytest.mark.parametrize("cls", [OpenAIBackend, OllamaBackend])
def test_http_backend_errors_name_the_server_and_the_cause(server, cls, monkeypatch):
    monkeypatch.delenv("CTT_ACE_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    base_url = f"{server}/v1" if cls is OpenAIBackend else server
    with pytest.raises(BackendError, match="401|API key") as info:
        cls(base_url=base_url, model=MODEL, timeout=30).complete(MESSAGES)
    assert server in str(info.value)
    with pytest.raises(BackendError, match="404") as info:
        cls(base_url=base_url, model="gpt-4o", timeout=30, key=TOKEN).complete(MESSAGES)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("cls", [OpenAIBackend, OllamaBackend])
def test_refused_connection_is_a_clear_error(cls):
    port = _free_port()  # closed again: nothing listens there
    base_url = f"http://127.0.0.1:{port}" + ("/v1" if cls is OpenAIBackend else "")
    started = time.monotonic()
    with pytest.raises(BackendConnectionError, match=f"cannot reach .*127.0.0.1:{port}.*is it running"):
        cls(base_url=base_url, model=MODEL, timeout=5, key="k").complete(MESSAGES)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("cls", [OpenAIBackend, OllamaBackend])
def test_a_server_that_never_answers_times_out(cls):
    with socket.socket() as sock:  # accepts connections (kernel backlog) and never sends a byte
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        base_url = f"http://127.0.0.1:{sock.getsockname()[1]}" + ("/v1" if cls is OpenAIBackend else "")
        started = time.monotonic()
        with pytest.raises(BackendTimeoutError, match="did not answer within 0.5 s"):
            cls(base_url=base_url, model=MODEL, timeout=0.5, key="k").complete(MESSAGES)
        assert time.monotonic() - started < 10


@contextlib.contextmanager
def answering(body: bytes) -> Iterator[str]:
    """A real HTTP server on loopback answering every POST with ``body`` (status 200, JSON)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("cls", [OpenAIBackend, OllamaBackend])
@pytest.mark.parametrize("body", [b'{"unexpected": true}', b'{"choices": [], "message": 3}', b"[1, 2, 3]"])
def test_a_reply_that_is_not_a_chat_reply_is_malformed(cls, body):
    with answering(body) as url:
        base_url = url + ("/v1" if cls is OpenAIBackend else "")
        with pytest.raises(MalformedReplyError, match="malformed reply|without"):
            cls(base_url=base_url, model=MODEL, timeout=5, key="k").complete(MESSAGES)


@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    """The service on a tiny model that reads 4,096 tokens (the roles' prompts are longer than 256 tokens of
    the tiny tokenizer); rotary positions need no retraining for that on a random model."""
    tokenizer = build_tokenizer()
    model = tiny_llama(tokenizer)
    model.config.max_position_embeddings = 4096
    backbone = Backbone(model, tokenizer, name="tiny-llama")
    session = Session(fast_config(strategy="in_context"), backbone=backbone)
    with running(make_engine(tmp_path_factory.mktemp("long"), session=session, token=TOKEN)) as url:
        yield url


def test_ace_learns_with_the_reflector_and_curator_behind_the_service(long_server, monkeypatch):
    """The whole Generate-Reflect-Curate loop with the roles answered by the service over HTTP."""
    server = long_server
    monkeypatch.setenv("CTT_ACE_API_KEY", TOKEN)
    config = fast_config(
        strategy="ace",
        strategies={
            "ace": {
                "retriever": "bm25",
                "backend": "openai",
                "base_url": f"{server}/v1",
                "model": MODEL,
                "role_max_tokens": 8,
                "fallback_insight": True,
                "dedupe_similarity": None,
            }
        },
    )
    session = Session(config, backbone=make_backbone(build_tokenizer()))
    strategy = session.strategy
    assert isinstance(strategy.backend, OpenAIBackend)
    doc = make_document("The capital of Veloria is Tarnhelm.", "veloria")
    report = strategy.learn_with_feedback(doc, [("What is the capital of Veloria?", "Tarnhelm")], loops=2)
    loops = report.extra["loops"]
    assert [loop["reflector_replies"] for loop in loops] == [1, 1]
    wrong = [loop["accuracy"] == 0 for loop in loops]
    assert [loop["curator_replies"] for loop in loops] == [int(w) for w in wrong]
    assert report.extra["tokens"] > 0 and all(loop["seconds"] > 0 for loop in loops)
    if wrong[0]:  # the tiny model's answer is wrong and its curator reply holds no operation
        assert report.extra["fallback_adds"] >= 1 and "Tarnhelm" in strategy.playbook.render()
    json.dumps(report.to_dict())  # the report is JSON
