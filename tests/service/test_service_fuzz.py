"""Property tests over request bodies: whatever a client sends, never a server error and never a state change.

Bodies are generated JSON values (and raw bytes), plus valid-looking bodies with one field broken. State
changing endpoints only get bodies that are invalid by construction, so any change to the learned state, the
journal or the queue is a bug. About 3,000 requests in all.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from service_helpers import client, make_engine

MODEL = "tiny-llama"
FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
not_strings = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.lists(scalars, max_size=3)
)
bad_texts = st.sampled_from(["", " ", "\n\t ", "\x00", "a\x00b", "\ud800", "x\udfff"])
present = not_strings.filter(lambda v: v is not None)  # None is a valid optional field
bad_ids = st.sampled_from(["", " ", "a\nb", "\x7f", "x" * 257, "\ud800"]) | present


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    with client(make_engine(tmp_path_factory.mktemp("fuzz")), raise_server_exceptions=False) as test_client:
        yield test_client


def send(api, method: str, path: str, body) -> int:
    engine = api.app.state.engine
    before = engine.fingerprint()
    if isinstance(body, bytes):
        response = api.request(method, path, content=body, headers={"content-type": "application/json"})
    else:
        response = api.request(
            method, path, content=json.dumps(body), headers={"content-type": "application/json"}
        )
    assert response.status_code < 500, (method, path, body, response.text)
    if response.status_code >= 400:
        payload = response.json()
        assert payload["error"], payload
        assert engine.fingerprint() == before, (path, body)
    return response.status_code


def invalid_document():
    extra = st.dictionaries(
        st.text(min_size=1, max_size=8).filter(lambda k: k not in {"text", "id", "source", "wait"}),
        json_values,
        min_size=1,
        max_size=2,
    )
    return st.one_of(
        st.fixed_dictionaries({"text": not_strings | bad_texts}),
        st.fixed_dictionaries({"text": st.just("A valid text."), "id": bad_ids}),
        st.fixed_dictionaries({"text": st.just("A valid text."), "source": present | st.just("\ud800")}),
        st.fixed_dictionaries(
            {"text": st.just("A valid text."), "wait": st.integers() | st.text() | st.floats(allow_nan=False)}
        ),
        st.builds(lambda e: {"text": "A valid text.", **e}, extra),
        st.dictionaries(st.text(max_size=8).filter(lambda k: k != "text"), json_values, max_size=3),
        json_values.filter(lambda v: not isinstance(v, dict)),
        st.binary(max_size=64),
    )


@FUZZ
@given(body=invalid_document())
def test_invalid_documents_are_refused_without_a_change(api, body):
    assert send(api, "POST", "/documents", body) in (400, 413)


@FUZZ
@given(body=json_values | st.binary(max_size=64), path=st.sampled_from(["/ask", "/generate"]))
def test_native_answers_never_fail_on_bad_bodies(api, body, path):
    send(api, "POST", path, body)


def openai_bodies():
    message = st.fixed_dictionaries({"role": json_values, "content": json_values})
    return st.one_of(
        json_values,
        st.fixed_dictionaries(
            {"model": st.just(MODEL), "messages": st.lists(message, max_size=3) | json_values}
        ),
        st.fixed_dictionaries(
            {
                "model": st.just(MODEL),
                "messages": st.just([{"role": "user", "content": "hi"}]),
                "max_tokens": json_values.filter(
                    lambda v: not isinstance(v, int) or isinstance(v, bool) or v < 1
                ),
            }
        ),
        st.fixed_dictionaries({"model": not_strings | st.text(max_size=10), "prompt": json_values}),
        st.binary(max_size=64),
    )


@FUZZ
@given(body=openai_bodies(), path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_openai_routes_never_fail_on_bad_bodies(api, body, path):
    send(api, "POST", path, body)


def ollama_bodies():
    return st.one_of(
        json_values,
        st.fixed_dictionaries({"model": st.just(MODEL), "messages": json_values, "stream": json_values}),
        st.fixed_dictionaries({"model": st.just(MODEL), "prompt": not_strings, "options": json_values}),
        st.fixed_dictionaries(
            {
                "model": st.just(MODEL),
                "prompt": st.just("hi"),
                "options": st.fixed_dictionaries(
                    {"num_predict": st.text() | st.floats(allow_nan=False) | st.lists(scalars)}
                ),
            }
        ),
        st.binary(max_size=64),
    )


@FUZZ
@given(body=ollama_bodies(), path=st.sampled_from(["/api/chat", "/api/generate", "/api/show"]))
def test_ollama_routes_never_fail_on_bad_bodies(api, body, path):
    send(api, "POST", path, body)


@FUZZ
@given(
    name=st.text(max_size=70).filter(lambda n: not (n[:1].isalnum() and n.isascii() and n.isprintable()))
    | not_strings,
)
def test_bad_checkpoint_names_are_refused(api, name):
    assert send(api, "POST", "/checkpoints", {"name": name}) == 400


@FUZZ
@given(
    name=st.text(alphabet=st.characters(codec="ascii"), min_size=1, max_size=40),
    method=st.sampled_from(["load", "delete", "get"]),
)
def test_path_parameters_never_fail(api, name, method):
    from urllib.parse import quote

    assume(name not in api.app.state.engine._known_ids)  # a learned id is forgotten: a real change
    quoted = quote(name, safe="")
    if method == "load":
        assert send(api, "POST", f"/checkpoints/{quoted}/load", b"") in (400, 404, 405)
    elif method == "delete":
        assert send(api, "DELETE", f"/documents/{quoted}", b"") in (404, 405, 409)
    else:
        assert send(api, "GET", f"/documents/{quoted}", b"") in (404, 405)
