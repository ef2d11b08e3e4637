"""Ollama-compatible routes, so the official ``ollama`` client works unchanged against the service.

``POST /api/chat`` and ``POST /api/generate`` (streaming NDJSON, Ollama's default, or one JSON object with
``"stream": false``), ``GET /api/tags``, ``POST /api/show`` and ``GET /api/version``. Every answer goes
through the session's ``generate``. Streaming sends the text as the model produces it (a
``TextIteratorStreamer`` in generation). ``options.num_predict`` sets the token budget (clamped to the
service's limit); ``temperature`` (0: greedy), ``top_p``, ``seed`` and ``stop`` are honoured; other
options are accepted and ignored. As with Ollama, an empty prompt or message list only "loads" the
model (``done_reason: "load"``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
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
from continual_transformer.service.errors import ServiceError
from continual_transformer.service.generation import GenerationOptions
from continual_transformer.service.models import Text
from continual_transformer.service.prompting import conversation_prompt
from continual_transformer.version import __version__

router = APIRouter(prefix="/api")
EngineDep = Annotated[Engine, Depends(engine_of)]


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class Options(Lenient):
    num_predict: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Annotated[list[Text], Field(max_length=8)] | None = None


def _options(options: Options | None) -> GenerationOptions:
    if options is None:
        return GenerationOptions()
    return GenerationOptions.of(
        temperature=options.temperature, top_p=options.top_p, seed=options.seed, stop=options.stop
    )


class Message(Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: Text | None = None
    images: list[Any] | None = None


class Request(Lenient):
    model: Annotated[Text, Field(min_length=1, max_length=256)]
    stream: bool | None = True
    options: Options | None = None
    images: list[Any] | None = None
    tools: list[Any] | None = None


class ChatRequest(Request):
    messages: Annotated[list[Message], Field(max_length=512)] | None = None


class GenerateRequest(Request):
    prompt: Text | None = None
    system: Text | None = None
    raw: bool | None = None


class ShowRequest(Lenient):
    model: Annotated[Text, Field(min_length=1, max_length=256)]


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _budget(engine: Engine, options: Options | None) -> int | None:
    if options is None or options.num_predict is None:
        return None
    if options.num_predict <= 0:  # Ollama: -1 unbounded, -2 fill the context
        return engine.settings.max_new_tokens
    return min(options.num_predict, engine.settings.max_new_tokens)


def _check(engine: Engine, body: Request) -> None:
    engine.require_ready()
    check_model(engine, body.model)
    if body.images:
        raise ServiceError(400, "images are not supported (text models only)")
    if body.tools:
        raise ServiceError(400, "tools are not supported")


def _timings(answer: Answer) -> dict[str, Any]:
    nanos = int(answer.seconds * 1e9)
    return {
        "total_duration": nanos,
        "load_duration": 0,
        "prompt_eval_count": answer.prompt_tokens,
        "prompt_eval_duration": 0,
        "eval_count": answer.completion_tokens,
        "eval_duration": nanos,
    }


def _ndjson(chunks: Iterator[dict[str, Any]]) -> StreamingResponse:
    def lines() -> Iterator[str]:
        try:
            for chunk in chunks:
                yield json.dumps(chunk) + "\n"
        except Exception as exc:  # after the first line the status is sent: the error is the last line
            yield json.dumps({"error": stream_error(exc).message}) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/tags")
async def tags(engine: EngineDep) -> dict[str, Any]:
    engine.require_ready()
    return {"models": [_model_entry(engine)]}


@router.post("/show")
async def show(body: ShowRequest, engine: EngineDep) -> dict[str, Any]:
    engine.require_ready()
    check_model(engine, body.model)
    entry = _model_entry(engine)
    return {"details": entry["details"], "modified_at": entry["modified_at"], "model_info": {}}


def _model_entry(engine: Engine) -> dict[str, Any]:
    backbone = engine.session.backbone
    parameters = backbone.num_parameters()
    family = type(backbone.model).__name__
    return {
        "name": engine.model_id,
        "model": engine.model_id,
        "modified_at": _now(),
        "size": parameters * backbone.dtype.itemsize,
        "digest": hashlib.sha256(str(backbone.fingerprint).encode("utf-8")).hexdigest(),
        "details": {
            "format": "safetensors",
            "family": family,
            "families": [family],
            "parameter_size": f"{parameters / 1e6:.1f}M",
            "quantization_level": str(backbone.dtype).removeprefix("torch."),
        },
    }


@router.post("/chat", response_model=None)
async def chat(body: ChatRequest, engine: EngineDep) -> dict[str, Any] | StreamingResponse:
    _check(engine, body)
    head = {"model": engine.model_id, "created_at": _now()}
    if not body.messages:
        done = {**head, "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "load"}
        return _ndjson(iter([done])) if body.stream is not False else done
    for message in body.messages:
        if message.images:
            raise ServiceError(400, "images are not supported (text models only)")
    prompt = conversation_prompt([(m.role, m.content or "") for m in body.messages])
    budget, options = _budget(engine, body.options), _options(body.options)
    if body.stream is False:
        answer: Answer = await wait_for(
            engine.generate(prompt, chat=True, max_new_tokens=budget, options=options),
            engine.settings.request_timeout,
        )
        final = {**head, "done": True, "done_reason": answer.finish_reason, **_timings(answer)}
        return {**final, "message": {"role": "assistant", "content": answer.text}}
    future, stream = engine.stream(prompt, chat=True, max_new_tokens=budget, options=options)
    pieces = await open_stream(future, stream)

    def chunks() -> Iterator[dict[str, Any]]:
        for piece in pieces:
            yield {**head, "message": {"role": "assistant", "content": piece}, "done": False}
        answer = finish_stream(future)
        final = {**head, "done": True, "done_reason": answer.finish_reason, **_timings(answer)}
        yield {**final, "message": {"role": "assistant", "content": ""}}

    return _ndjson(chunks())


@router.post("/generate", response_model=None)
async def generate(body: GenerateRequest, engine: EngineDep) -> dict[str, Any] | StreamingResponse:
    _check(engine, body)
    head = {"model": engine.model_id, "created_at": _now()}
    if not body.prompt:
        done = {**head, "response": "", "done": True, "done_reason": "load"}
        return _ndjson(iter([done])) if body.stream is not False else done
    prompt = body.prompt if not body.system else f"{body.system}\n\n{body.prompt}"
    budget, options = _budget(engine, body.options), _options(body.options)
    if body.stream is False:
        answer: Answer = await wait_for(
            engine.generate(prompt, chat=not body.raw, max_new_tokens=budget, options=options),
            engine.settings.request_timeout,
        )
        final = {**head, "done": True, "done_reason": answer.finish_reason, "context": [], **_timings(answer)}
        return {**final, "response": answer.text}
    future, stream = engine.stream(prompt, chat=not body.raw, max_new_tokens=budget, options=options)
    pieces = await open_stream(future, stream)

    def chunks() -> Iterator[dict[str, Any]]:
        for piece in pieces:
            yield {**head, "response": piece, "done": False}
        answer = finish_stream(future)
        yield {
            **head,
            "done": True,
            "done_reason": answer.finish_reason,
            "context": [],
            **_timings(answer),
            "response": "",
        }

    return _ndjson(chunks())
