"""Generation batching: one thread answers queued prompts, up to ``max_batch`` per ``session.generate`` call.

One thread drives the model because strategies keep per-call state on shared modules (hooks, the tokenizer's
padding side, memory reinforcement); it holds the read lock of the engine's readers-writer lock, so every
answer is computed on weights that are fully updated. Requests that share ``chat`` and the token budget are
batched together; each still gets its own answer. A request with sampling settings, a seed, stop sequences
or a streamer is answered alone (a batch of one), so its answer does not depend on what else is queued.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from itertools import groupby
from typing import TYPE_CHECKING, Any

from continual_transformer.service.errors import ServiceError
from continual_transformer.service.generation import GenerationOptions
from continual_transformer.service.rwlock import ReadWriteLock
from continual_transformer.service.settings import ServiceConfig

if TYPE_CHECKING:
    from continual_transformer.session import Session

logger = logging.getLogger(__name__)

_STOP = object()


@dataclass(frozen=True, kw_only=True)
class Answer:
    """One generated answer with its token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    max_new_tokens: int
    seconds: float
    stopped: bool = False
    """A stop sequence ended the answer."""

    @property
    def finish_reason(self) -> str:
        """``length`` when the answer used its whole token budget, else ``stop``."""
        if self.stopped:
            return "stop"
        return "length" if self.completion_tokens >= self.max_new_tokens else "stop"


@dataclass(kw_only=True)
class _GenRequest:
    prompt: str
    chat: bool | None
    max_new_tokens: int
    future: Future
    options: GenerationOptions = GenerationOptions()
    streamer: Any = None

    @property
    def alone(self) -> bool:
        return self.streamer is not None or not self.options.plain

    def end_stream(self) -> None:
        if self.streamer is not None:
            self.streamer.end()


class Batcher:
    """The generation queue (bounded: 429 when full) and the thread that serves it (:meth:`run`)."""

    def __init__(
        self,
        settings: ServiceConfig,
        session: Callable[[], Session],
        lock: ReadWriteLock,
        counters: dict[str, int],
    ) -> None:
        self.settings = settings
        self._session = session
        self._rw = lock
        self._queue: queue.Queue = queue.Queue(maxsize=settings.generation_queue_size)
        self.counters = counters

    @property
    def session(self) -> Session:
        return self._session()

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(
        self,
        prompt: str,
        *,
        chat: bool | None,
        max_new_tokens: int,
        options: GenerationOptions | None = None,
        streamer: Any = None,
    ) -> Future:
        """Queue one prompt. ``streamer`` (a ``TextIteratorStreamer``) receives the answer's text while it is
        generated; it is ended whatever happens to the request."""
        limit = self.settings.max_new_tokens
        if not 1 <= max_new_tokens <= limit:
            raise ServiceError(400, f"max_new_tokens must be between 1 and {limit}, got {max_new_tokens}")
        future: Future = Future()
        request = _GenRequest(
            prompt=prompt,
            chat=chat,
            max_new_tokens=max_new_tokens,
            future=future,
            options=options or GenerationOptions(),
            streamer=streamer,
        )
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            waiting = self.settings.generation_queue_size
            raise ServiceError(
                429, f"{waiting} answers are waiting; retry later", code="queue_full"
            ) from None
        return future

    def stop(self, timeout: float) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=timeout)

    def fail_queued(self, error: ServiceError) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and not item.future.done():
                item.future.set_exception(error)
                item.end_stream()

    def run(self) -> None:
        """Serve the queue until :meth:`stop` (the generation thread's target)."""
        slots: Any = None
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            if self.settings.continuous and _answers_shared(self.session):
                slots, stop = self._serve_continuous(first, slots)
            else:
                stop = self._serve_batch(first)
            if stop:
                return

    def _serve_batch(self, first: _GenRequest) -> bool:
        """Gather requests for ``batch_wait`` seconds after ``first`` (up to ``max_batch``) and answer them;
        whether the stop came."""
        batch, stop = [first], False
        deadline = time.monotonic() + self.settings.batch_wait
        while len(batch) < self.settings.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            batch.append(item)
        self._answer_batches(_running(batch))
        return stop

    def _answer_batches(self, requests: list[_GenRequest], *, locked: bool = False) -> None:
        """Answer running requests on the batch path: alone where they must be, else grouped by chat and
        token budget."""
        for r in [r for r in requests if r.alone]:
            self._answer([r], locked=locked)
        key = lambda r: (r.chat is None, bool(r.chat), r.max_new_tokens)  # noqa: E731
        for _, group in groupby(sorted([r for r in requests if not r.alone], key=key), key=key):
            self._answer(list(group), locked=locked)

    def _answer(self, requests: list[_GenRequest], *, locked: bool = False) -> None:
        """Answer ``requests`` with one ``session.generate`` call (``locked``: the caller holds the read
        lock)."""
        first, start = requests[0], time.perf_counter()
        try:
            # the tokenizer too is used by one thread at a time
            with contextlib.nullcontext() if locked else self._rw.read():
                runnable = self._fitting(requests)
                texts, stopped = [], []
                if runnable:
                    backbone = self.session.backbone
                    kwargs = first.options.generate_kwargs(backbone)
                    if first.streamer is not None:
                        kwargs["streamer"] = first.streamer
                    kwargs["max_time"] = self.settings.generation_timeout
                    with first.options.seeded(backbone):
                        raw = self.session.generate(
                            [r.prompt for r, _ in runnable],
                            chat=first.chat,
                            max_new_tokens=first.max_new_tokens,
                            **kwargs,
                        )
                    for text in raw:
                        answer, stop = first.options.finish(text)
                        texts.append(answer)
                        stopped.append(stop)
                counts = [
                    min(self._count_tokens(text), r.max_new_tokens) for text, (r, _) in zip(texts, runnable)
                ]  # re-tokenising the decoded text can count more tokens than were generated
        except Exception as exc:
            logger.exception("generation failed")
            for r in requests:
                _settle(r.future, ServiceError(500, f"generation failed: {type(exc).__name__}"))
            return
        finally:
            for r in requests:
                r.end_stream()
        seconds = time.perf_counter() - start
        if runnable and seconds >= self.settings.generation_timeout:
            timeout = self.settings.generation_timeout
            for r, _ in runnable:
                _settle(r.future, _timeout_error(timeout))
            return
        self.counters["batches"] += 1
        self.counters["answered"] += len(runnable)
        for (r, tokens), text, n, stop in zip(runnable, texts, counts, stopped):
            answer = Answer(
                text=text,
                prompt_tokens=tokens,
                completion_tokens=n,
                max_new_tokens=r.max_new_tokens,
                seconds=seconds,
                stopped=stop,
            )
            r.future.set_result(answer)

    # -- continuous batching --------------------------------------------------------------------------------
    def _serve_continuous(self, first: _GenRequest, slots: Any) -> tuple[Any, bool]:
        """Serve ``first`` and every request that arrives while answers are decoding with continuous batching
        (the read lock held throughout); returns the slots (kept for the next run) and whether the stop came.

        Arrivals join the decoding rows between steps; a waiting writer stops arrivals from joining, so the
        rows drain and learning gets the lock (as on the batch path, no answer sees weights change under it).
        Chat prompts prefill only what follows the chat template's shared system part, whose keys and values
        are computed once per run. Requests the rows cannot serve are answered on the batch path between
        steps.
        """
        arrivals: list[Any] = [first]
        stopping = False
        with self._rw.read():
            if slots is not None:
                slots.forget_prefixes()  # learning may have changed the weights since the last run
            rows: dict[int, tuple[_GenRequest, float]] = {}  # request id -> (request, deadline)
            while True:
                if not stopping and not self._rw.writer_waiting:
                    stopping = self._take(arrivals, self.settings.max_batch - len(rows))
                if arrivals:
                    slots = self._admit(_running(arrivals), rows, slots)
                    arrivals = []
                if not rows:
                    return slots, stopping
                self._step(slots, rows)

    def _take(self, arrivals: list[Any], room: int) -> bool:
        """Move up to ``room`` queued requests into ``arrivals`` without waiting; whether the stop came."""
        while len(arrivals) < room:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            arrivals.append(item)
        return False

    def _admit(self, requests: list[_GenRequest], rows: dict[int, Any], slots: Any) -> Any:
        """Put each request that the decoding rows can serve into a free row; answer the others on the batch
        path. Returns the slots (made, or made anew for another model, here)."""
        session = self.session
        backbone = session.backbone
        shared = _answers_shared(session)
        if shared and (slots is None or slots.backbone is not backbone):
            from continual_transformer.decode_slots import supports_slots

            shared = supports_slots(backbone)
            slots = (
                backbone.decode_slots(self.settings.max_batch, self.settings.continuous_length)
                if shared
                else None
            )
            if slots is not None and backbone.tokenizer.chat_template:
                slots.remember_prefix(slots.chat_prefix())  # the system part, prefilled once per run
        others, joining = [], []
        for r in requests:
            if r.alone or not shared or slots is None or len(joining) >= slots.free:
                others.append(r)
                continue
            try:
                tokens = self._count_tokens(r.prompt)
                if tokens + r.max_new_tokens > backbone.max_length:
                    self._fitting([r])  # answers the 400
                    continue
                (decoded,) = session.strategy.decoding_inputs([r.prompt], chat=r.chat) or [None]
                ids = backbone.token_ids(decoded.text) if decoded is not None else []
            except Exception as exc:  # this prompt failed: the others go on
                _fail(r, exc)
                continue
            if decoded is None or not slots.fits(len(ids), r.max_new_tokens):
                others.append(r)
            else:
                joining.append((r, ids, decoded.bias))
        self._join(slots, joining, rows)
        if others:
            self._answer_batches(others, locked=True)
        return slots

    def _join(
        self, slots: Any, joining: list[tuple[_GenRequest, list[int], Any]], rows: dict[int, Any]
    ) -> None:
        """Prefill the joining requests together into free rows; when that fails, each alone, so that only a
        prompt that fails by itself fails."""
        if not joining:
            return
        deadline = time.monotonic() + self.settings.generation_timeout
        try:
            finished = slots.add_many([(id(r), ids, r.max_new_tokens, bias) for r, ids, bias in joining])
            rows.update((id(r), (r, deadline)) for r, _, _ in joining)
        except Exception:
            if len(joining) == 1:
                _fail(joining[0][0], sys.exc_info()[1])
                return
            logger.warning("prefilling %d prompts together failed; one at a time", len(joining))
            finished = []
            for r, ids, bias in joining:
                try:
                    done = slots.add(id(r), ids, r.max_new_tokens, bias)
                except Exception as exc:
                    _fail(r, exc)
                    continue
                rows[id(r)] = (r, deadline)
                if done is not None:
                    finished.append(done)
        for done in finished:
            self._finish(rows.pop(done.key)[0], done)

    def _step(self, slots: Any, rows: dict[int, tuple[_GenRequest, float]]) -> None:
        """One decoding step of every row; finished answers are returned, timed-out or cancelled rows
        freed."""
        now = time.monotonic()
        for key, (r, deadline) in list(rows.items()):
            if now >= deadline or r.future.done():
                slots.drop(key)
                del rows[key]
                _settle(r.future, _timeout_error(self.settings.generation_timeout))
        if not rows:
            return
        try:
            finished = slots.step()
        except Exception as exc:  # the shared step failed: its rows fail, later requests start afresh
            logger.exception("generation failed")
            slots.clear()
            for r, _ in rows.values():
                _settle(r.future, ServiceError(500, f"generation failed: {type(exc).__name__}"))
            rows.clear()
            return
        for done in finished:
            self._finish(rows.pop(done.key)[0], done)

    def _finish(self, r: _GenRequest, done: Any) -> None:
        text, stopped = r.options.finish(done.text)
        self.counters["answered"] += 1
        r.future.set_result(
            Answer(
                text=text,
                prompt_tokens=self._count_tokens(r.prompt),
                completion_tokens=min(self._count_tokens(text), r.max_new_tokens),
                max_new_tokens=r.max_new_tokens,
                seconds=done.seconds,
                stopped=stopped,
            )
        )

    def _fitting(self, requests: list[_GenRequest]) -> list[tuple[_GenRequest, int]]:
        """The requests whose prompt and token budget fit the model's context (the others get a 400)."""
        limit = self.session.backbone.max_length
        runnable = []
        for r in requests:
            tokens = self._count_tokens(r.prompt)
            if tokens + r.max_new_tokens > limit:
                message = (
                    f"the prompt is {tokens} tokens; with {r.max_new_tokens} new tokens it exceeds the "
                    f"model's context of {limit} tokens"
                )
                r.future.set_exception(ServiceError(400, message))
            else:
                runnable.append((r, tokens))
        return runnable

    def _count_tokens(self, text: str) -> int:
        return len(self.session.backbone.tokenizer(text, add_special_tokens=False)["input_ids"])


def _running(requests: list[_GenRequest]) -> list[_GenRequest]:
    """The requests not cancelled, marked running (a cancelled one's stream is ended)."""
    running = []
    for r in requests:
        if r.future.set_running_or_notify_cancel():
            running.append(r)
        else:
            r.end_stream()
    return running


def _answers_shared(session: Session) -> bool:
    """Whether the session's strategy answers each prompt by plain greedy decoding of a model text
    (``Strategy.shares_decoding``: the base model's, or retrieval's with its context and logit bias), so
    prompts can share decoding rows."""
    try:
        strategy = session.strategy
    except Exception:  # no session yet (restoring): the batch path answers with the 503
        return False
    return strategy.shares_decoding()


def _fail(r: _GenRequest, exc: BaseException | None) -> None:
    """Answer one request with a 500 for ``exc`` (logged)."""
    logger.error("generation failed", exc_info=exc)
    _settle(r.future, ServiceError(500, f"generation failed: {type(exc).__name__}"))


def _timeout_error(timeout: float) -> ServiceError:
    return ServiceError(
        504,
        f"generation was stopped after {timeout:g} seconds (the generation timeout); ask for fewer tokens",
        code="generation_timeout",
    )


def _settle(future: Future, error: ServiceError) -> None:
    if not future.done():
        future.set_exception(error)
