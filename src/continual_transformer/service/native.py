"""The native API: documents, answers, state, checkpoints and probes.

=========================================  =================================================================
``POST /documents``                         learn one document (JSON); 202 once durable, 200 with ``wait``
``POST /documents/upload``                  learn a ``.txt``/``.md``/``.jsonl`` file (multipart ``file``)
``GET /documents``, ``GET /documents/ID``   learned and queued documents
``DELETE /documents/ID``                    forget one document (strategies that can; else 409 + reason)
``DELETE /documents``                       forget every document (reset)
``POST /ask``, ``POST /generate``           answer a question / continue prompts
``GET /info``, ``GET /history``             strategy, model, state, stats; the learning history
``GET /checkpoints``, ``POST /checkpoints``  list / save named checkpoints
``POST /checkpoints/NAME/load``             replace the state by a named checkpoint (refused ones change
                                            nothing)
``GET /health``, ``GET /ready``             liveness; readiness (503 while loading or shutting down)
=========================================  =================================================================
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import JSONResponse

from continual_transformer.documents import make_document, read_documents
from continual_transformer.errors import DocumentError
from continual_transformer.service.deps import engine_of, wait_for
from continual_transformer.service.engine import READY, Engine, Ticket
from continual_transformer.service.errors import ServiceError
from continual_transformer.service.models import AskRequest, CheckpointRequest, GenerateRequest, LearnRequest

router = APIRouter()
EngineDep = Annotated[Engine, Depends(engine_of)]


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(engine: EngineDep) -> JSONResponse:
    if engine.state != READY:
        raise ServiceError(503, f"not ready: {engine.reason}", code="not_ready")
    return JSONResponse({"ready": True, "state": engine.state})


@router.get("/info")
async def info(engine: EngineDep) -> dict[str, Any]:
    return await asyncio.to_thread(engine.info)


@router.get("/history")
async def history(engine: EngineDep) -> dict[str, Any]:
    return {"history": await asyncio.to_thread(engine.history)}


# -- documents -----------------------------------------------------------------------------------------------
async def _acknowledge(engine: Engine, tickets: list[Ticket], wait: bool) -> JSONResponse:
    if not wait:
        body = [{"id": t.doc_id, "seq": t.seq, "status": "queued"} for t in tickets]
        return JSONResponse({"documents": body}, status_code=202)
    reports = [await wait_for(t.future, engine.settings.request_timeout) for t in tickets]
    return JSONResponse({"documents": [{**r, "status": "learned"} for r in reports]}, status_code=200)


@router.post("/documents")
async def learn(body: LearnRequest, engine: EngineDep) -> JSONResponse:
    try:
        document = make_document(body.text, body.id, source=body.source)
    except DocumentError as exc:
        raise ServiceError(400, f"invalid document: {exc.reason}") from None
    tickets = await asyncio.to_thread(engine.submit, [document])
    return await _acknowledge(engine, tickets, body.wait)


@router.post("/documents/upload")
async def upload(
    engine: EngineDep, file: Annotated[UploadFile, File()], wait: Annotated[bool, Form()] = False
) -> JSONResponse:
    engine.require_ready()
    name = _file_name(file.filename)
    data = await file.read()
    config = engine.session.config.documents
    documents = await asyncio.to_thread(_read_upload, name, data, config)
    tickets = await asyncio.to_thread(engine.submit, documents)
    return await _acknowledge(engine, tickets, wait)


def _file_name(filename: str | None) -> str:
    """The last component of an uploaded file's name (client paths are never used as paths here)."""
    raw = filename or ""
    name = PureWindowsPath(PurePosixPath(raw).name).name
    if not name or name.startswith(".") or len(name) > 255 or any(ord(c) < 32 for c in name):
        raise ServiceError(400, f"invalid upload file name {raw[:80]!r}")
    return name


def _read_upload(name: str, data: bytes, config: Any) -> list:
    """The documents of an uploaded file, read and validated by the same rules as ``ctt learn``."""
    if Path(name).suffix.lower() not in config.extensions:
        raise ServiceError(400, f"{name}: unsupported file type; use one of {', '.join(config.extensions)}")
    with tempfile.TemporaryDirectory(prefix="ctt-upload-") as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        try:
            documents = read_documents(path, config)
        except DocumentError as exc:
            where = f"{name}:{exc.line}" if exc.line is not None else name
            raise ServiceError(400, f"{where}: {exc.reason}") from None
    return [dataclasses.replace(d, source=f"upload:{name}") for d in documents]


@router.get("/documents")
async def documents(engine: EngineDep) -> dict[str, Any]:
    return {"documents": await asyncio.to_thread(engine.documents)}


@router.get("/documents/{doc_id:path}")
async def document(doc_id: str, engine: EngineDep) -> dict[str, Any]:
    return await asyncio.to_thread(engine.document, doc_id)


@router.delete("/documents/{doc_id:path}")
async def forget(doc_id: str, engine: EngineDep) -> dict[str, Any]:
    future = engine.forget(doc_id)
    return await wait_for(future, engine.settings.request_timeout)


@router.delete("/documents")
async def reset(engine: EngineDep) -> dict[str, Any]:
    return await wait_for(engine.reset(), engine.settings.request_timeout)


# -- answers -------------------------------------------------------------------------------------------------
@router.post("/ask")
async def ask(body: AskRequest, engine: EngineDep) -> dict[str, Any]:
    if not body.question.strip():
        raise ServiceError(400, "question is empty")
    future = engine.generate(body.question, chat=True, max_new_tokens=body.max_new_tokens)
    answer = await wait_for(future, engine.settings.request_timeout)
    return {"answer": answer.text, "finish_reason": answer.finish_reason, "usage": _usage(answer)}


@router.post("/generate")
async def generate(body: GenerateRequest, engine: EngineDep) -> dict[str, Any]:
    futures = []
    try:
        for prompt in body.prompts:
            futures.append(engine.generate(prompt, chat=body.chat, max_new_tokens=body.max_new_tokens))
    except ServiceError:
        for future in futures:
            future.cancel()
        raise
    answers = [await wait_for(f, engine.settings.request_timeout) for f in futures]
    return {
        "texts": [a.text for a in answers],
        "finish_reasons": [a.finish_reason for a in answers],
        "usage": [_usage(a) for a in answers],
    }


def _usage(answer: Any) -> dict[str, int]:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens}


# -- checkpoints ---------------------------------------------------------------------------------------------
@router.get("/checkpoints")
async def checkpoints(engine: EngineDep) -> dict[str, Any]:
    return {"checkpoints": await asyncio.to_thread(engine.store.list_checkpoints)}


@router.post("/checkpoints")
async def save_checkpoint(body: CheckpointRequest, engine: EngineDep) -> dict[str, Any]:
    return await wait_for(engine.save_checkpoint(body.name), engine.settings.request_timeout)


@router.post("/checkpoints/{name}/load")
async def load_checkpoint(name: str, engine: EngineDep) -> dict[str, Any]:
    return await wait_for(engine.load_checkpoint(name), engine.settings.request_timeout)
