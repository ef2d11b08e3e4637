"""The official ``openai`` and ``ollama`` clients, unchanged, against a real server on a loopback port."""

from __future__ import annotations

import httpx
import ollama
import openai
import pytest
from service_helpers import TOKEN, make_engine, running, tiny_session

from continual_transformer.documents import make_document

DOC = "The capital of Veloria is Tarnhelm. The Orvalis river flows through the city of Quenmark."
QUESTION = "What is the capital of Veloria?"
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running(make_engine(tmp_path_factory.mktemp("state"), token=TOKEN)) as url:
        yield url


@pytest.fixture(scope="module")
def expected():
    """What a session answers directly (no service) before and after learning the document."""
    session = tiny_session()
    before = session.generate([QUESTION], chat=True)[0]
    session.learn(make_document(DOC, "veloria"))
    return {"before": before, "after": session.generate([QUESTION], chat=True)[0]}


def learn(url: str) -> None:
    response = httpx.post(
        f"{url}/documents",
        json={"text": DOC, "id": "veloria", "wait": True},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert response.status_code in (200, 409), response.text  # 409: learned by an earlier test


def test_openai_client_lists_models_and_chats(server, expected):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=TOKEN)
    assert [m.id for m in client.models.list()] == [MODEL]
    messages = [{"role": "user", "content": QUESTION}]
    learn(server)
    completion = client.chat.completions.create(model=MODEL, messages=messages)
    assert completion.choices[0].message.content == expected["after"] != expected["before"]
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens > 0
    stream = client.chat.completions.create(model=MODEL, messages=messages, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces) == expected["after"] and len(pieces) >= 2
    text = client.completions.create(model=MODEL, prompt="The capital of Veloria is", max_tokens=4)
    assert isinstance(text.choices[0].text, str)
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.chat.completions.create(model="gpt-4o", messages=messages)


def test_openai_client_is_refused_without_the_right_token(server):
    for key in ("wrong-token-123", ""):
        client = openai.OpenAI(base_url=f"{server}/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def test_ollama_client_lists_chats_and_generates(server, expected):
    client = ollama.Client(host=server, headers={"Authorization": f"Bearer {TOKEN}"})
    assert [m.model for m in client.list().models] == [MODEL]
    learn(server)
    messages = [{"role": "user", "content": QUESTION}]
    reply = client.chat(model=MODEL, messages=messages)
    assert reply.message.content == expected["after"] and reply.done
    streamed = "".join(
        part.message.content or "" for part in client.chat(model=MODEL, messages=messages, stream=True)
    )
    assert streamed == expected["after"]
    generated = client.generate(model=MODEL, prompt=QUESTION)
    assert generated.response == expected["after"], "generate applies the chat template unless raw"
    pieces = [part.response for part in client.generate(model=MODEL, prompt=QUESTION, stream=True)]
    assert "".join(pieces) == expected["after"]
    short = client.generate(model=MODEL, prompt=QUESTION, options={"num_predict": 2})
    assert short.eval_count <= 2 and short.done_reason == "length"


def test_ollama_client_is_refused_without_the_right_token(server):
    for headers in ({}, {"Authorization": "Bearer wrong-token-123"}):
        with pytest.raises(ollama.ResponseError) as caught:
            ollama.Client(host=server, headers=headers).list()
        assert caught.value.status_code == 401 and "bearer token" in caught.value.error
