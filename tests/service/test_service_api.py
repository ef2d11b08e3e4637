"""The native API on a tiny model: documents, answers, state, checkpoints, probes, limits and auth."""

from __future__ import annotations

import json
import os
import stat
import threading

import pytest
from fastapi.testclient import TestClient
from service_helpers import TOKEN, client, make_engine, tiny_session

from continual_transformer.documents import make_document
from continual_transformer.service.app import create_app
from continual_transformer.service.auth import token_matches
from continual_transformer.service.engine import Engine
from continual_transformer.service.prompting import conversation_prompt
from continual_transformer.service.run import resolve_token
from continual_transformer.service.settings import ServiceConfig, is_loopback

DOC = "The capital of Veloria is Tarnhelm. The Orvalis river flows through the city of Quenmark."
QUESTION = "What is the capital of Veloria?"


def reference_answer(*, learned: bool, chat: bool = True) -> str:
    """What a session answers directly (no service), with or without the document learned."""
    session = tiny_session()
    if learned:
        session.learn(make_document(DOC, "veloria"))
    return session.generate([QUESTION], chat=chat)[0]


def test_a_learned_document_changes_the_answer_exactly_as_the_session_does(tmp_path):
    before, after = reference_answer(learned=False), reference_answer(learned=True)
    assert before != after, "in_context puts the document in the prompt: the tiny model's answer moves"
    with client(make_engine(tmp_path)) as api:
        assert api.post("/ask", json={"question": QUESTION}).json()["answer"] == before
        response = api.post("/documents", json={"text": DOC, "id": "veloria", "wait": True})
        assert response.status_code == 200, response.text
        assert response.json()["documents"][0]["status"] == "learned"
        assert api.post("/ask", json={"question": QUESTION}).json()["answer"] == after
        texts = api.post("/generate", json={"prompts": [QUESTION, QUESTION], "chat": True}).json()["texts"]
        assert texts == [after, after]


def test_documents_are_acknowledged_listed_and_refused_twice(tmp_path):
    with client(make_engine(tmp_path)) as api:
        response = api.post("/documents", json={"text": DOC, "id": "a", "source": "atlas"})
        assert response.status_code == 202
        assert response.json()["documents"][0]["seq"] == 1
        duplicate = api.post("/documents", json={"text": "other text", "id": "a"})
        assert (
            duplicate.status_code == 409
            and "already learned or queued" in duplicate.json()["error"]["message"]
        )
        api.app.state.engine.wait_ready()
        listed = _wait_learned(api, "a")
        assert listed["source"] == "atlas" and listed["status"] == "learned"
        assert api.get("/documents/a").json()["status"] == "learned"
        assert api.get("/documents/nope").status_code == 404
        history = api.get("/history").json()["history"]
        assert [h["doc_id"] for h in history] == ["a"]
        info = api.get("/info").json()
        assert info["strategy"] == "in_context" and info["model"] == "tiny-llama" and info["documents"] == 1


def _wait_learned(api: TestClient, doc_id: str) -> dict:
    import time

    for _ in range(500):
        record = api.get(f"/documents/{doc_id}").json()
        if record.get("status") == "learned":
            return record
        time.sleep(0.01)
    raise AssertionError(f"{doc_id} never learned")


def test_forget_is_refused_with_a_reason_and_reset_forgets_everything(tmp_path):
    with client(make_engine(tmp_path, session=tiny_session("finetune"))) as api:
        api.post("/documents", json={"text": DOC, "id": "a", "wait": True})
        refused = api.delete("/documents/a")
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "forget_unsupported"
        message = refused.json()["error"]["message"]
        assert "cannot forget a single document" in message and "same weights" in message
        assert [d["id"] for d in api.get("/documents").json()["documents"]] == ["a"]
        assert api.delete("/documents").json() == {"reset": True}
        assert api.get("/documents").json()["documents"] == []
        assert api.post("/documents", json={"text": DOC, "id": "a"}).status_code == 202, (
            "the id is free again"
        )


def test_upload_reads_files_by_the_document_rules(tmp_path):
    with client(make_engine(tmp_path)) as api:
        jsonl = b'{"id": "x1", "text": "first fact"}\n{"text": "second fact"}\n'
        response = api.post(
            "/documents/upload", files={"file": ("facts.jsonl", jsonl)}, data={"wait": "true"}
        )
        assert response.status_code == 200, response.text
        assert [d["id"] for d in response.json()["documents"]] == ["x1", "facts.jsonl:2"]
        text = api.post("/documents/upload", files={"file": ("../../etc/notes.txt", b"A note.")})
        assert text.status_code == 202 and text.json()["documents"][0]["id"] == "notes.txt"
        for name, data, reason in [
            ("blob.bin", b"abc", "unsupported file type"),
            ("bad.txt", b"\x00\x01binary", "binary"),
            ("latin.txt", b"caf\xe9", "not valid UTF-8"),
            ("blank.md", b"   \n", "only whitespace"),
            ("bad.jsonl", b'{"text": "ok"}\n{broken\n', "bad.jsonl:2: invalid JSON"),
            (".hidden.txt", b"text", "invalid upload file name"),
        ]:
            refused = api.post("/documents/upload", files={"file": (name, data)})
            assert refused.status_code == 400, (name, refused.text)
            assert reason in refused.json()["error"]["message"], (name, refused.json())
            assert "/tmp" not in refused.json()["error"]["message"], "server paths never reach the client"
        assert api.post("/documents/upload", data={"wait": "true"}).status_code == 400  # no file
        ids = {d["id"] for d in api.get("/documents").json()["documents"]}
        assert ids == {"x1", "facts.jsonl:2", "notes.txt"}


def test_checkpoints_save_list_load_and_refuse_bad_names(tmp_path):
    with client(make_engine(tmp_path)) as api:
        api.post("/documents", json={"text": DOC, "id": "a", "wait": True})
        assert api.post("/checkpoints", json={"name": "one"}).json()["documents"] == 1
        api.post("/documents", json={"text": "Another fact.", "id": "b", "wait": True})
        [entry] = api.get("/checkpoints").json()["checkpoints"]
        assert entry["name"] == "one" and entry["documents"] == 1 and entry["strategy"] == "in_context"
        assert api.post("/checkpoints/one/load").json() == {"loaded": "one", "documents": 1}
        assert [d["id"] for d in api.get("/documents").json()["documents"]] == ["a"]
        for name in ["..", ".hidden", "a/b", "/etc", "x" * 65, "", "a..b", "con\x00"]:
            assert api.post("/checkpoints", json={"name": name}).status_code == 400, name
        assert api.post("/checkpoints/missing/load").status_code == 404
        assert api.post("/checkpoints/..%2F..%2Fetc/load").status_code in (400, 404)
        assert not any(p.name == "etc" for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("kind", ["corrupt", "other_strategy", "other_model"])
def test_a_corrupt_or_foreign_checkpoint_is_refused_and_the_state_kept(tmp_path, kind):
    engine = make_engine(tmp_path)
    target = tmp_path / "checkpoints" / "bad"
    if kind == "other_strategy":
        tiny_session("none").save(target)
    elif kind == "other_model":
        from conftest import build_tokenizer, fast_config, make_backbone

        from continual_transformer.session import Session

        Session(fast_config(strategy="in_context"), backbone=make_backbone(build_tokenizer(), seed=1)).save(
            target
        )
    with client(engine) as api:
        api.post("/documents", json={"text": DOC, "id": "a", "wait": True})
        if kind == "corrupt":
            api.post("/checkpoints", json={"name": "bad"})
            for tensors in target.glob("tensors-*.safetensors"):
                tensors.write_bytes(b"\x00garbage")
        answer = api.post("/ask", json={"question": QUESTION}).json()["answer"]
        refused = api.post("/checkpoints/bad/load")
        assert refused.status_code == 409, refused.text
        assert "refused" in refused.json()["error"]["message"]
        assert str(tmp_path) not in refused.json()["error"]["message"]
        assert [d["id"] for d in api.get("/documents").json()["documents"]] == ["a"]
        assert api.post("/ask", json={"question": QUESTION}).json()["answer"] == answer


def test_probes_say_503_until_ready(tmp_path):
    release = threading.Event()

    def slow_session():
        release.wait(10)
        return tiny_session()

    engine = Engine(ServiceConfig(state_dir=tmp_path), session_factory=slow_session)
    with TestClient(create_app(engine)) as api:  # the lifespan starts the engine in the background
        assert api.get("/health").json() == {"status": "ok"}
        assert api.get("/ready").status_code == 503
        refused = api.post("/ask", json={"question": QUESTION})
        assert refused.status_code == 503 and "not ready" in refused.json()["error"]["message"]
        assert refused.headers["retry-after"] == "1"
        assert api.post("/documents", json={"text": DOC}).status_code == 503
        release.set()
        assert engine.wait_ready(10)
        assert api.get("/ready").json()["ready"] is True
    assert engine.state == "stopped"


def test_auth_refuses_missing_and_wrong_tokens(tmp_path):
    with client(make_engine(tmp_path, token=TOKEN)) as api:
        assert api.get("/health").status_code == 200 and api.get("/ready").status_code == 200
        for headers in [{}, {"Authorization": "Bearer wrong-token-xyz"}, {"Authorization": TOKEN}]:
            refused = api.post("/documents", json={"text": DOC}, headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert api.get("/api/tags", headers=headers).json()["error"].endswith("bearer token")
        assert api.get("/documents").status_code == 401
        ok = api.get("/documents", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json() == {"documents": []}


def test_token_helpers():
    assert token_matches(b"Bearer secret-123", "secret-123") and token_matches(
        b"bearer secret-123", "secret-123"
    )
    assert not token_matches(None, "secret-123") and not token_matches(b"Basic secret-123", "secret-123")
    assert not token_matches(b"Bearer secret-12", "secret-123")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.com")


def test_auth_is_on_by_default_beyond_loopback(tmp_path, monkeypatch):
    monkeypatch.delenv("CTT_SERVE_TOKEN", raising=False)
    assert resolve_token("127.0.0.1", None, tmp_path) is None
    token = resolve_token("0.0.0.0", None, tmp_path)
    assert token and len(token) >= 32
    assert stat.S_IMODE(os.stat(tmp_path / "token").st_mode) == 0o600
    assert resolve_token("0.0.0.0", None, tmp_path) == token, "the generated token is kept"
    assert resolve_token("0.0.0.0", "given-token", tmp_path) == "given-token"
    monkeypatch.setenv("CTT_SERVE_TOKEN", "from-the-env")
    assert resolve_token("127.0.0.1", None, tmp_path) == "from-the-env"


def test_bodies_over_the_limit_get_413_before_being_read(tmp_path):
    with client(make_engine(tmp_path, max_body_bytes=2048)) as api:
        big = json.dumps({"text": "x" * 4096})
        refused = api.post("/documents", content=big, headers={"content-type": "application/json"})
        assert refused.status_code == 413 and "over the limit" in refused.json()["error"]["message"]

        def chunks():  # no Content-Length: the limit applies while reading
            yield b'{"text": "'
            for _ in range(8):
                yield b"y" * 512
            yield b'"}'

        streamed = api.post("/documents", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        assert api.get("/documents").json()["documents"] == []


def test_errors_are_json_never_tracebacks(tmp_path):
    with client(make_engine(tmp_path), raise_server_exceptions=False) as api:
        for method, path, body in [
            ("GET", "/no/such/route", None),
            ("PUT", "/documents", None),
            ("POST", "/ask", b"{not json"),
            ("POST", "/ask", b'{"question": "\\ud800"}'),
            ("POST", "/ask", b'{"question": "hi", "max_new_tokens": 100000}'),
            ("POST", "/documents", b'{"text": "ok", "surprise": 1}'),
            ("POST", "/documents", b'{"text": "\\u0000"}'),
        ]:
            response = api.request(method, path, content=body, headers={"content-type": "application/json"})
            assert 400 <= response.status_code < 500, (path, body, response.text)
            message = response.json()["error"]["message"]
            assert "Traceback" not in message and message
        assert api.get("/documents").json()["documents"] == []


def test_prompting_helpers():
    assert conversation_prompt([("user", "hi")]) == "hi"
    assert conversation_prompt(
        [("system", "Be brief."), ("user", "a"), ("assistant", "b"), ("user", "c")]
    ) == ("Be brief.\n\nuser: a\nassistant: b\n\nc")
    with pytest.raises(Exception, match="last message"):
        conversation_prompt([("user", "a"), ("assistant", "b")])


def test_importing_serve_loads_neither_torch_nor_fastapi():
    import subprocess
    import sys

    code = (
        "import sys, continual_transformer.service, continual_transformer.service.run\n"
        "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'uvicorn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
