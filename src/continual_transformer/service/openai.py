"""OpenAI-compatible routes, so the official ``openai`` client works unchanged against the service.

``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` and ``POST /v1/completions``
(both streaming as server-sent events and not). Every answer goes through the session's ``generate``, so
what was learned applies here as on the native routes. Streaming sends the finished answer in word-sized
chunks: strategies generate whole answers, so the first chunk comes when the answer is done. ``max_tokens``
is clamped to the service's limit; sampling settings (``temperature``, ``top_p``, ``seed``) are accepted
and ignored: the session's generation config decides. Only ``n=1`` is served.
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
from continual_transformer.service.deps import check_model, engine_of, wait_for
from continual_transformer.service.engine import Engine
from continual_transformer.service.errors import ServiceError
from continual_transformer.service.models import Text
from continual_transformer.service.prompting import conversation_prompt, stream_pieces

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


def _sse(chunks: Iterator[dict[str, Any]]) -> Iterator[str]:
    for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
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
    answer: Answer = await wait_for(
        engine.generate(prompt, chat=True, max_new_tokens=budget), engine.settings.request_timeout
    )
    ident, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), engine.model_id
    if not body.stream:
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

    def chunks() -> Iterator[dict[str, Any]]:
        head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name}
        yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        for piece in stream_pieces(answer.text):
            yield {**head, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
        yield {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": answer.finish_reason}]}
        if body.stream_options is not None and body.stream_options.include_usage:
            yield {**head, "choices": [], "usage": _usage([answer])}

    return StreamingResponse(_sse(chunks()), media_type="text/event-stream")


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, engine: EngineDep) -> dict[str, Any] | StreamingResponse:
    _check(engine, body)
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    budget = _budget(engine, body.max_tokens)
    futures = []
    try:
        for prompt in prompts:
            futures.append(engine.generate(prompt, chat=False, max_new_tokens=budget))
    except ServiceError:
        for future in futures:
            future.cancel()
        raise
    answers: list[Answer] = [await wait_for(f, engine.settings.request_timeout) for f in futures]
    texts = [(p if body.echo else "") + a.text for p, a in zip(prompts, answers)]
    ident, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), engine.model_id
    head = {"id": ident, "object": "text_completion", "created": created, "model": name}
    if not body.stream:
        choices = [
            {"index": i, "text": text, "finish_reason": a.finish_reason, "logprobs": None}
            for i, (text, a) in enumerate(zip(texts, answers))
        ]
        return {**head, "choices": choices, "usage": _usage(answers)}

    def chunks() -> Iterator[dict[str, Any]]:
        for i, (text, a) in enumerate(zip(texts, answers)):
            for piece in stream_pieces(text):
                yield {
                    **head,
                    "choices": [{"index": i, "text": piece, "finish_reason": None, "logprobs": None}],
                }
            yield {
                **head,
                "choices": [{"index": i, "text": "", "finish_reason": a.finish_reason, "logprobs": None}],
            }
        if body.stream_options is not None and body.stream_options.include_usage:
            yield {**head, "choices": [], "usage": _usage(answers)}

    return StreamingResponse(_sse(chunks()), media_type="text/event-stream")
