"""OpenAI-compatible routes, so the official ``openai`` client works unchanged against the service.

``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` and ``POST /v1/completions``
(both streaming as server-sent events and not). Every answer goes through the session's ``generate``, so
what was learned applies here as on the native routes. Streaming sends the text as the model produces it
(a ``TextIteratorStreamer`` in generation), then ``data: [DONE]``. ``max_tokens`` is clamped to the
service's limit; ``temperature`` (0: greedy), ``top_p``, ``seed`` and ``stop`` are honoured (none given:
the session's generation config decides). Only ``n=1`` is served.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from continual_transformer.service.batcher import Answer
from continual_transformer.service.deps import (
    check_model,
    engine_of,
    finish_stream,
    open_stream,
    stream_error,
    wait_for,
)
from continual_transformer.service.engine import Engine
from continual_transformer.service.errors import ServiceError, error_body
from continual_transformer.service.generation import GenerationOptions
from continual_transformer.service.models import Text
from continual_transformer.service.prompting import conversation_prompt

router = APIRouter(prefix="/v1")
EngineDep = Annotated[Engine, Depends(engine_of)]


class Lenient(BaseModel):
    """Fields OpenAI defines but this service does not use are ignored; the ones used are type-checked."""

    model_config = ConfigDict(extra="ignore", strict=True)


class ContentPart(Lenient):
    type: str
    text: Text | None = None


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None


class StreamOptions(Lenient):
    include_usage: bool | None = None


class Sampling(Lenient):
    model: Annotated[Text, Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1)] | None = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Text | Annotated[list[Text], Field(max_length=8)] | None = None

    def options(self) -> GenerationOptions:
        return GenerationOptions.of(
            temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=self.stop
        )


class ChatCompletionRequest(Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=512)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


class CompletionRequest(Sampling):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=64)]
    echo: bool | None = False


def _message_text(message: ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise ServiceError(400, f"content parts of type {part.type[:40]!r} are not supported (text only)")
        texts.append(part.text)
    return "".join(texts)


def _budget(engine: Engine, *values: int | None) -> int | None:
    given = next((v for v in values if v is not None), None)
    return None if given is None else min(given, engine.settings.max_new_tokens)


def _check(engine: Engine, body: Sampling) -> None:
    engine.require_ready()
    check_model(engine, body.model)
    if body.n not in (None, 1):
        raise ServiceError(400, "only n=1 is supported")


def _usage(answers: list[Answer]) -> dict[str, int]:
    prompt = sum(a.prompt_tokens for a in answers)
    completion = sum(a.completion_tokens for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(chunks: Iterator[dict[str, Any]], path: str) -> Iterator[str]:
    try:
        for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
    except Exception as exc:  # after the first chunk the status is sent: the error is the last event
        error = stream_error(exc)
        yield f"data: {json.dumps(error_body(path, error.status, error.message, error.code))}\n\n"
    yield "data: [DONE]\n\n"


@router.get("/models")
async def models(engine: EngineDep) -> dict[str, Any]:
    engine.require_ready()
    return {"object": "list", "data": [_model_card(engine)]}


@router.get("/models/{model_id:path}")
async def model(model_id: str, engine: EngineDep) -> dict[str, Any]:
    engine.require_ready()
    check_model(engine, model_id)
    return _model_card(engine)


def _model_card(engine: Engine) -> dict[str, Any]:
    return {"id": engine.model_id, "object": "model", "created": 0, "owned_by": "continual-transformer"}


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, engine: EngineDep
) -> dict[str, Any] | StreamingResponse:
    _check(engine, body)
    prompt = conversation_prompt([(m.role, _message_text(m)) for m in body.messages])
    budget = _budget(engine, body.max_completion_tokens, body.max_tokens)
    options = body.options()
    ident, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), engine.model_id
    if not body.stream:
        answer: Answer = await wait_for(
            engine.generate(prompt, chat=True, max_new_tokens=budget, options=options),
            engine.settings.request_timeout,
        )
        return {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer.text},
                    "finish_reason": answer.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage([answer]),
        }
    future, stream = engine.stream(prompt, chat=True, max_new_tokens=budget, options=options)
    pieces = await open_stream(future, stream)

    def chunks() -> Iterator[dict[str, Any]]:
        head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name}
        yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        for piece in pieces:
            yield {**head, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
        answer = finish_stream(future)
        yield {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": answer.finish_reason}]}
        if body.stream_options is not None and body.stream_options.include_usage:
            yield {**head, "choices": [], "usage": _usage([answer])}

    return StreamingResponse(_sse(chunks(), "/v1/chat/completions"), media_type="text/event-stream")


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, engine: EngineDep) -> dict[str, Any] | StreamingResponse:
    _check(engine, body)
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    budget = _budget(engine, body.max_tokens)
    options = body.options()
    ident, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), engine.model_id
    head = {"id": ident, "object": "text_completion", "created": created, "model": name}
    if body.stream:
        return await _stream_completions(engine, body, prompts, budget, options, head)
    futures = []
    try:
        for prompt in prompts:
            futures.append(engine.generate(prompt, chat=False, max_new_tokens=budget, options=options))
    except ServiceError:
        for future in futures:
            future.cancel()
        raise
    answers: list[Answer] = [await wait_for(f, engine.settings.request_timeout) for f in futures]
    texts = [(p if body.echo else "") + a.text for p, a in zip(prompts, answers)]
    choices = [
        {"index": i, "text": text, "finish_reason": a.finish_reason, "logprobs": None}
        for i, (text, a) in enumerate(zip(texts, answers))
    ]
    return {**head, "choices": choices, "usage": _usage(answers)}


async def _stream_completions(
    engine: Engine,
    body: CompletionRequest,
    prompts: list[str],
    budget: int | None,
    options: GenerationOptions,
    head: dict[str, Any],
) -> StreamingResponse:
    """Each prompt's text as it is generated, one prompt after the other (each a batch of one)."""
    streams = []
    try:
        for prompt in prompts:
            streams.append(engine.stream(prompt, chat=False, max_new_tokens=budget, options=options))
    except ServiceError:
        for future, _ in streams:
            future.cancel()
        raise
    first = await open_stream(*streams[0])

    def chunks() -> Iterator[dict[str, Any]]:
        answers = []
        for i, (prompt, (future, stream)) in enumerate(zip(prompts, streams)):
            if body.echo:
                yield {
                    **head,
                    "choices": [{"index": i, "text": prompt, "finish_reason": None, "logprobs": None}],
                }
            for piece in first if i == 0 else stream:
                yield {
                    **head,
                    "choices": [{"index": i, "text": piece, "finish_reason": None, "logprobs": None}],
                }
            answer = finish_stream(future)
            answers.append(answer)
            yield {
                **head,
                "choices": [
                    {"index": i, "text": "", "finish_reason": answer.finish_reason, "logprobs": None}
                ],
            }
        if body.stream_options is not None and body.stream_options.include_usage:
            yield {**head, "choices": [], "usage": _usage(answers)}

    return StreamingResponse(_sse(chunks(), "/v1/completions"), media_type="text/event-stream")
