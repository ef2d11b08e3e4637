"""Token streaming, sampling settings and slow clients, through the official clients on a real server."""

from __future__ import annotations

import socket
import time

import httpx
import ollama
import openai
import pytest
import torch
from service_helpers import TOKEN, make_engine, running, tiny_session

from continual_transformer.service.generation import GenerationOptions, TextStream, cut_at_stop

QUESTION = "What is the capital of Veloria?"
MODEL = "tiny-llama"
TOKENS = 16
STEP_SECONDS = 0.06


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server whose model takes STEP_SECONDS per forward pass (so generation visibly takes time), and
    the greedy answer a session gives directly."""
    session = tiny_session()
    tokenizer = session.backbone.tokenizer
    # The random model's tokens are mostly parts of multi-byte characters, which a streamer holds back until
    # they decode; keep it to tokens that are whole printable ASCII text.
    words = [
        i
        for i in range(len(tokenizer))
        if tokenizer.decode([i]).isascii() and tokenizer.decode([i]).isprintable()
    ]
    banned = torch.ones(session.backbone.model.config.vocab_size, dtype=torch.bool)
    banned[words] = False
    banned[tokenizer.eos_token_id] = False
    model = session.backbone.model
    forward = model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(STEP_SECONDS)
        out = forward(*args, **kwargs)
        out.logits[..., banned] = -1e4
        return out

    model.forward = slow_forward
    greedy = session.generate([QUESTION], chat=True, max_new_tokens=TOKENS)[0]
    engine = make_engine(tmp_path_factory.mktemp("state"), session=session, token=TOKEN, body_timeout=1.0)
    with running(engine) as url:
        yield url, greedy, engine


def _timed(iterator):
    start, out = time.monotonic(), []
    for item in iterator:
        out.append((time.monotonic() - start, item))
    return out


def test_openai_streaming_sends_tokens_as_they_are_generated(served):
    url, greedy, _ = served
    assert len(greedy) > 4, "the tiny model's answer is long enough to stream"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN)
    messages = [{"role": "user", "content": QUESTION}]
    chunks = _timed(
        client.chat.completions.create(model=MODEL, messages=messages, stream=True, max_tokens=TOKENS)
    )
    pieces = [(t, c.choices[0].delta.content) for t, c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(p for _, p in pieces) == greedy
    assert len(pieces) > 1
    spread = pieces[-1][0] - pieces[0][0]
    assert spread > 3 * STEP_SECONDS, f"every piece arrived at once ({spread:.3f} s apart): not streamed"
    assert chunks[-1][1].choices[0].finish_reason in ("stop", "length")
    text = client.completions.create(model=MODEL, prompt=QUESTION, max_tokens=TOKENS, stream=True)
    parts = _timed(text)
    streamed = "".join(c.choices[0].text for _, c in parts if c.choices)
    plain = client.completions.create(model=MODEL, prompt=QUESTION, max_tokens=TOKENS).choices[0].text
    assert streamed == plain and sum(bool(c.choices and c.choices[0].text) for _, c in parts) > 1


def test_ollama_streaming_sends_tokens_as_they_are_generated(served):
    url, greedy, _ = served
    client = ollama.Client(host=url, headers={"Authorization": f"Bearer {TOKEN}"})
    messages = [{"role": "user", "content": QUESTION}]
    parts = _timed(client.chat(model=MODEL, messages=messages, stream=True, options={"num_predict": TOKENS}))
    pieces = [(t, p.message.content) for t, p in parts if p.message.content]
    assert "".join(p for _, p in pieces) == greedy and len(pieces) > 1
    assert pieces[-1][0] - pieces[0][0] > 3 * STEP_SECONDS, "not streamed"
    assert parts[-1][1].done
    generated = _timed(
        client.generate(model=MODEL, prompt=QUESTION, stream=True, options={"num_predict": TOKENS})
    )
    assert "".join(p.response for _, p in generated) == greedy
    assert sum(bool(p.response) for _, p in generated) > 1


def test_sampling_settings_are_honoured(served):
    url, greedy, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN)
    messages = [{"role": "user", "content": QUESTION}]

    def answer(**kwargs):
        kwargs.setdefault("max_tokens", TOKENS)
        reply = client.chat.completions.create(model=MODEL, messages=messages, **kwargs)
        return reply.choices[0]

    assert answer(temperature=0).message.content == greedy, "temperature 0 is greedy"
    assert answer(temperature=0, seed=3).message.content == greedy
    sampled = [answer(temperature=1.5, seed=seed).message.content for seed in (1, 1, 2, 3)]
    assert sampled[0] == sampled[1], "the same seed gives the same sampled answer"
    assert len(set(sampled)) > 1 and any(s != greedy for s in sampled), "a temperature samples"
    short = answer(max_tokens=2)
    assert short.finish_reason == "length"
    assert len(short.message.content) < len(greedy)
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 2]
    cut = answer(temperature=0, stop=[stop])
    assert cut.message.content == greedy[: greedy.find(stop)].rstrip() and cut.finish_reason == "stop"
    streamed = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=TOKENS, stream=True, stop=stop
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut.message.content
    ollama_client = ollama.Client(host=url, headers={"Authorization": f"Bearer {TOKEN}"})
    options = {"num_predict": TOKENS, "temperature": 1.5, "seed": 1}
    assert ollama_client.chat(model=MODEL, messages=messages, options=options).message.content == sampled[0]
    options = {"num_predict": TOKENS, "temperature": 0, "stop": [stop]}
    assert (
        ollama_client.generate(model=MODEL, prompt=QUESTION, options=options).response == cut.message.content
    )
    bad = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "temperature": -1},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]


def test_a_stalled_body_gets_a_408_and_a_too_long_generation_a_504(served, tmp_path):
    url, _, engine = served
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b'\r\nContent-Length: 100\r\n\r\n{"model"'
        )
        started = time.monotonic()
        reply = b""
        while b"seconds" not in reply and time.monotonic() - started < 10:
            reply += sock.recv(4096)
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 408") and "not received within 1 seconds" in reply
    assert time.monotonic() - started < 5
    slow = make_engine(tmp_path, session=engine.session, token=TOKEN, generation_timeout=0.2)
    with running(slow) as slow_url:
        response = httpx.post(
            f"{slow_url}/v1/completions",
            json={"model": MODEL, "prompt": QUESTION, "max_tokens": TOKENS},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )
    assert response.status_code == 504
    assert "generation timeout" in response.json()["error"]["message"]


def test_text_stream_pieces_concatenate_to_the_answer():
    class Fake:
        def __init__(self, pieces):
            self.pieces = pieces

        def __iter__(self):
            return iter(self.pieces)

    from concurrent.futures import Future

    for pieces, stop in [
        ([" \n Hello", " wor", "ld.  ", "\n"], ()),
        (["Hello", " wor", "ld. Bye"], ("ld.",)),
        (["ab", "c", "de"], ("cd", "zz")),
        (["  ", " "], ()),
    ]:
        options = GenerationOptions.of(stop=list(stop))
        stream = TextStream(Fake(pieces), Future(), options, 5.0)
        assert "".join(stream) == options.finish("".join(pieces))[0]
    assert cut_at_stop("a. b. c", ("b", ". ")) == ("a", True)
    assert GenerationOptions.of(temperature=0).generate_kwargs(None)["do_sample"] is False
    with GenerationOptions(seed=5).seeded(tiny_session().backbone):
        first = torch.rand(2)
    with GenerationOptions(seed=5).seeded(tiny_session().backbone):
        assert torch.equal(first, torch.rand(2))
