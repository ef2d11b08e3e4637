"""The engine: one session behind a readers-writer lock, a writer thread, a generation thread, a journal.

Writes (learning, reset, forgetting, loading and saving checkpoints) go through one bounded queue served by
one writer thread, which applies them under the write lock, in order. A document is journaled (fsync)
before it is acknowledged and before it enters the queue, so the acknowledgement means "durable", not
"learned";
``wait`` on a ticket waits for the learning too.

Generation requests go to the :class:`~continual_transformer.service.batcher.Batcher`, which answers
them in batches under the read lock. Cheap reads (info, history, documents) share the read lock with it.

Restart: the current snapshot is loaded, the service is ready, and the journal entries after the snapshot's
sequence number are learned again by the writer thread, in order and before any later write, so a kill at
any moment loses no acknowledged document and learns none twice. Replayed documents are listed as queued
until learned: readiness does not wait for a backlog that may take minutes to learn on a slow machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from continual_transformer.errors import CheckpointError
from continual_transformer.service.batcher import Batcher
from continual_transformer.service.errors import ServiceError
from continual_transformer.service.generation import GenerationOptions, TextStream
from continual_transformer.service.journal import LEARN, Entry, Journal
from continual_transformer.service.rwlock import ReadWriteLock
from continual_transformer.service.settings import ServiceConfig
from continual_transformer.service.store import StateStore

if TYPE_CHECKING:
    from continual_transformer.documents import Document
    from continual_transformer.session import Session

logger = logging.getLogger(__name__)

STARTING, READY, FAILED, STOPPING, STOPPED = "starting", "ready", "failed", "stopping", "stopped"


@dataclass(frozen=True, kw_only=True)
class Ticket:
    """The acknowledgement of one document: journaled under ``seq``; ``future`` resolves once learned."""

    doc_id: str
    seq: int
    future: Future = field(repr=False)


@dataclass(kw_only=True)
class _WriteOp:
    kind: str
    future: Future
    entry: Entry | None = None
    name: str | None = None


_STOP = object()


class Engine:
    """The session, its journal and snapshots, and the threads that serve it.

    ``session`` is used as given (state restored into it); otherwise ``session_factory`` builds one when the
    engine starts (in the background: ``/ready`` answers 503 meanwhile). ``start_writer=False`` acknowledges
    and journals documents without learning them (what a crash before learning leaves behind).
    ``init_from`` is a checkpoint loaded when the state directory has no snapshot yet.
    """

    def __init__(
        self,
        settings: ServiceConfig,
        *,
        session: Session | None = None,
        session_factory: Callable[[], Session] | None = None,
        start_writer: bool = True,
        on_fatal: Callable[[str], None] | None = None,
        init_from: Path | None = None,
    ) -> None:
        if (session is None) == (session_factory is None):
            raise ValueError("give exactly one of session and session_factory")
        self.settings = settings
        self.store = StateStore(settings.state_dir)
        self._session = session
        self._session_factory = session_factory
        self._start_writer = start_writer
        self._on_fatal = on_fatal
        self._init_from = init_from
        self.state = STARTING
        self.reason = "loading the model and restoring state"
        self.start_error: str | None = None
        """Why restoring failed (kept after :meth:`close`)."""
        self._ready = threading.Event()
        self._rw = ReadWriteLock()
        self.counters = {"learned": 0, "answered": 0, "snapshots": 0, "replayed": 0, "batches": 0}
        self._submit = threading.Lock()  # orders journal appends with queue puts
        self._writes: queue.Queue = queue.Queue(maxsize=settings.queue_size)
        self._batcher = Batcher(settings, lambda: self.session, self._rw, self.counters)
        self._journal: Journal | None = None
        self._threads: list[threading.Thread] = []
        self._next_seq = 1
        self._applied_seq = 0
        self._snapshot_seq = 0
        self._unsaved = 0
        self._last_snapshot = time.monotonic()
        self._known_ids: set[str] = set()
        self._pending: dict[str, int] = {}
        self._replay: deque[Entry] = deque()
        self._replayed = threading.Event()
        self.failures: deque[dict[str, Any]] = deque(maxlen=100)

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self, *, background: bool = True) -> None:
        """Lock the state directory, then build/restore the session (in a thread when ``background``)."""
        self.store.lock()
        try:
            self.store.check_layout()
        except BaseException:
            self.store.unlock()
            raise
        if background:
            thread = threading.Thread(target=self._boot, name="ctt-serve-boot", daemon=True)
            thread.start()
            self._threads.append(thread)
        else:
            self._boot()
            if self.state == FAILED:
                raise RuntimeError(self.reason)

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready.wait(timeout)
        return self.state == READY

    def wait_replayed(self, timeout: float | None = None) -> bool:
        """Wait until the journal tail found on start has been learned again; whether it has."""
        self._ready.wait(timeout)
        return self._replayed.wait(timeout)

    def _boot(self) -> None:
        try:
            self._restore()
        except Exception as exc:  # reported through /ready and on_fatal, never raised into a thread's void
            logger.exception("ctt serve could not start")
            self.state, self.reason = FAILED, f"could not start: {type(exc).__name__}: {exc}"
            self.start_error = self.reason
            self._ready.set()
            if self._on_fatal is not None:
                self._on_fatal(self.reason)
            return
        with self._submit:
            if self.state != STARTING:  # closed while restoring
                return
        for target, name in ((self._write_loop, "writer"), (self._batcher.run, "generator")):
            if name == "writer" and not self._start_writer:
                continue
            thread = threading.Thread(target=target, name=f"ctt-serve-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self.state, self.reason = READY, "ready"
        self._ready.set()
        logger.info("ready: %d documents learned", len(self.session.history))

    def _restore(self) -> None:
        if self._session is None:
            assert self._session_factory is not None
            self._session = self._session_factory()
        self.store.remove_stale_snapshots()
        snapshot, seq = self.store.current()
        if snapshot is not None:
            self._session.load(snapshot)
        elif self._init_from is not None:
            self._session.load(self._init_from)
            logger.info("started from checkpoint %s", self._init_from)
        self._journal = Journal(self.store.journal_path)
        self._applied_seq = self._snapshot_seq = seq
        replay = list(self._journal.entries(after=seq))
        self._replay = deque(replay)
        self.counters["replayed"] = len(replay)
        self._next_seq = max(seq, self._journal.last_seq) + 1
        self._known_ids = {record["doc_id"] for record in self._session.history}
        for entry in replay:  # acknowledged, not yet learned: queued ahead of every later write
            self._known_ids.add(entry.document.id)
            self._pending[entry.document.id] = entry.seq
        if not replay:
            self._replayed.set()
        else:
            logger.info("%d journaled documents after snapshot seq %d to learn again", len(replay), seq)
        if snapshot is None and self._init_from is not None:
            self._snapshot()

    def _replay_journal(self) -> None:
        """Learn the journal tail found on start (the writer thread, before anything queued)."""
        while self._replay and not self._stop_writer:
            entry = self._replay.popleft()
            try:
                self._learn(entry)
            except ServiceError:
                pass  # recorded in failures; the document is not learned
            try:
                self._maybe_snapshot()
            except Exception:
                logger.exception("snapshot failed; the journal still holds every document")
        if not self._replay:
            self._replayed.set()
            logger.info("replayed the journal: %d documents", self.counters["replayed"])

    def close(self, *, checkpoint: bool = True, timeout: float = 30.0) -> None:
        """Stop serving: refuse new requests, finish the write in progress, snapshot (unless ``checkpoint``
        is false: what a crash leaves), stop the threads and release the state directory. Documents still
        queued stay in the journal and are learned on the next start."""
        if self.state in (STOPPING, STOPPED):
            return
        was_ready = self.state == READY
        self.state, self.reason = STOPPING, "shutting down"
        self._batcher.stop(timeout)
        self._stop_writer = True
        with self._submit:  # no acknowledgement races the stop marker
            with contextlib.suppress(queue.Full):
                self._writes.put_nowait(_STOP)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if checkpoint and was_ready and self._unsaved_state():
            try:
                self._snapshot()
            except Exception:
                logger.exception("final snapshot failed; the journal still holds every document")
        self._fail_queued(ServiceError(503, "the service shut down before this request was served"))
        if self._journal is not None:
            self._journal.close()
        self.store.unlock()
        self.state, self.reason = STOPPED, "stopped"

    _stop_writer = False

    def _fail_queued(self, error: ServiceError) -> None:
        self._batcher.fail_queued(error)
        while True:
            try:
                item = self._writes.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP and not item.future.done():
                item.future.set_exception(error)

    @property
    def session(self) -> Session:
        if self._session is None:
            raise ServiceError(503, f"not ready: {self.reason}")
        return self._session

    def require_ready(self) -> None:
        if self.state != READY:
            raise ServiceError(503, f"not ready: {self.reason}", code="not_ready")

    # -- writes ---------------------------------------------------------------------------------------------
    def submit(self, documents: Sequence[Document]) -> list[Ticket]:
        """Acknowledge ``documents`` (all or none): journal them (fsync), then queue them for learning.

        Refused with 409 when an id is already learned or queued, 429 when the queue has no room for all,
        413 when there are more than the queue holds."""
        self.require_ready()
        if not documents:
            raise ServiceError(400, "no documents given")
        if len(documents) > self.settings.queue_size:
            raise ServiceError(
                413,
                f"{len(documents)} documents in one request; the learning queue holds at most "
                f"{self.settings.queue_size}",
            )
        ids = [d.id for d in documents]
        if len(set(ids)) != len(ids):
            raise ServiceError(409, "the request holds the same document id twice")
        with self._submit:
            self.require_ready()
            taken = [i for i in ids if i in self._known_ids]
            if taken:
                raise ServiceError(
                    409,
                    f"document id {taken[0]!r} is already learned or queued; give another id, or "
                    "delete it first where the strategy can forget",
                    code="duplicate_document",
                )
            free = self.settings.queue_size - self._writes.qsize()
            if free < len(documents):
                raise ServiceError(
                    429,
                    f"the learning queue is full ({self.settings.queue_size} waiting); retry later",
                    code="queue_full",
                )
            entries = [
                Entry(seq=self._next_seq + i, op=LEARN, document=doc) for i, doc in enumerate(documents)
            ]
            assert self._journal is not None
            try:
                self._journal.append(entries)
            except OSError as exc:
                logger.error("journal append failed: %s", exc)
                raise ServiceError(503, f"could not journal the document ({exc.strerror})") from None
            self._next_seq += len(entries)
            tickets = []
            for entry in entries:
                future: Future = Future()
                self._writes.put_nowait(_WriteOp(kind=LEARN, future=future, entry=entry))
                self._known_ids.add(entry.document.id)
                self._pending[entry.document.id] = entry.seq
                tickets.append(Ticket(doc_id=entry.document.id, seq=entry.seq, future=future))
        return tickets

    def _enqueue(self, kind: str, name: str | None = None) -> Future:
        self.require_ready()
        future: Future = Future()
        with self._submit:
            self.require_ready()
            try:
                self._writes.put_nowait(_WriteOp(kind=kind, future=future, name=name))
            except queue.Full:
                raise ServiceError(429, "the write queue is full; retry later", code="queue_full") from None
            if kind == "reset":  # documents queued before the reset are learned, then forgotten with it
                self._known_ids.clear()
                self._pending.clear()
        return future

    def reset(self) -> Future:
        """Forget every document (applied in order with the queued ones, then snapshotted)."""
        return self._enqueue("reset")

    def forget(self, doc_id: str) -> Future:
        """Forget one document, where the strategy can; 409 with the reason otherwise. The forget is
        journaled before it is applied, so a restart replays it in order with the documents."""
        self.require_ready()
        strategy = self.session.strategy
        if not strategy.can_forget:
            raise ServiceError(
                409,
                f"strategy {strategy.name!r} cannot forget a single document: {strategy.cannot_forget}; "
                "DELETE /documents forgets every document",
                code="forget_unsupported",
            )
        if doc_id not in self._known_ids:
            raise ServiceError(404, f"no document with id {doc_id!r}")
        if doc_id in self._pending:
            raise ServiceError(409, f"document {doc_id!r} is still queued; forget it once it is learned")
        return self._enqueue("forget", doc_id)

    def save_checkpoint(self, name: str) -> Future:
        self.store.checkpoint_dir(name)  # validates the name before anything is queued
        return self._enqueue("save", name)

    def load_checkpoint(self, name: str) -> Future:
        path = self.store.checkpoint_dir(name)
        if not path.is_dir():
            raise ServiceError(404, f"no checkpoint named {name!r}")
        return self._enqueue("load", name)

    def _write_loop(self) -> None:
        self._replay_journal()
        if self._stop_writer:
            return
        while True:
            try:
                op = self._writes.get(timeout=min(1.0, self.settings.checkpoint_interval))
            except queue.Empty:
                self._maybe_snapshot()
                continue
            if op is _STOP:
                return
            if not op.future.set_running_or_notify_cancel():
                if op.kind != LEARN:  # a cancelled learn is still acknowledged: it is learned below
                    continue
            try:
                result = self._apply(op)
            except ServiceError as exc:
                self._settle(op.future, exc)
            except Exception as exc:
                logger.exception("%s failed", op.kind)
                self._settle(op.future, ServiceError(500, f"{op.kind} failed: {type(exc).__name__}: {exc}"))
            else:
                self._settle(op.future, result)
            try:
                self._maybe_snapshot()
            except Exception:
                logger.exception("snapshot failed; the journal still holds every document")
            if self._stop_writer:
                return

    @staticmethod
    def _settle(future: Future, result: Any) -> None:
        if future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    def _apply(self, op: _WriteOp) -> Any:
        if op.kind == LEARN:
            assert op.entry is not None
            return self._learn(op.entry)
        if op.kind == "reset":
            with self._rw.write():
                self.session.reset()
            self._snapshot()
            return {"reset": True}
        if op.kind == "forget":
            with self._rw.write():
                self.session.forget(op.name)
            with self._submit:
                self._known_ids.discard(op.name)
            self._snapshot()
            return {"forgotten": op.name}
        if op.kind == "save":
            with self._rw.write():
                path = self.session.save(self.store.checkpoint_dir(op.name))
            return {"name": op.name, "documents": len(self.session.history), "path": path.name}
        if op.kind == "load":
            return self._load(op.name)
        raise AssertionError(op.kind)

    def _learn(self, entry: Entry) -> dict[str, Any]:
        doc = entry.document
        try:
            with self._rw.write():
                report = self.session.learn(doc)
        except Exception as exc:
            logger.exception("learning %s (seq %d) failed", doc.id, entry.seq)
            self.failures.append({"id": doc.id, "seq": entry.seq, "error": f"{type(exc).__name__}: {exc}"})
            with self._submit:
                self._known_ids.discard(doc.id)
            raise ServiceError(500, f"learning {doc.id!r} failed: {type(exc).__name__}") from None
        finally:
            self._applied_seq = entry.seq
            self._unsaved += 1
            with self._submit:
                if self._pending.get(doc.id) == entry.seq:
                    del self._pending[doc.id]
        self.counters["learned"] += 1
        report_fields = {k: v for k, v in report.to_dict().items() if k != "doc_id"}
        return {"id": doc.id, "seq": entry.seq, **report_fields}

    def _load(self, name: str | None) -> dict[str, Any]:
        path = self.store.checkpoint_dir(name or "")
        with self._rw.write():
            try:
                self.session.load(path)
            except CheckpointError as exc:
                message = f"checkpoint {name!r} refused: {exc}".replace(str(path), name or "")
                raise ServiceError(409, message) from None
            except Exception as exc:  # unexpected: rebuild the running state from the snapshot + journal
                logger.exception("loading %s failed; restoring the running state", name)
                self._rebuild()
                raise ServiceError(409, f"checkpoint {name!r} refused: {type(exc).__name__}") from None
            with self._submit:
                self._known_ids = {h["doc_id"] for h in self.session.history} | set(self._pending)
        self._snapshot()
        return {"loaded": name, "documents": len(self.session.history)}

    def _rebuild(self) -> None:
        """The running state from the current snapshot and the journal entries applied since."""
        snapshot, seq = self.store.current()
        if snapshot is not None:
            self.session.load(snapshot)
        else:
            self.session.reset()
        assert self._journal is not None
        for entry in self._journal.entries(after=seq):
            if entry.seq > self._applied_seq:
                break
            self.session.learn(entry.document)

    # -- snapshots ------------------------------------------------------------------------------------------
    def _unsaved_state(self) -> bool:
        return self._unsaved > 0 or self._applied_seq != self._snapshot_seq

    def _maybe_snapshot(self) -> None:
        if not self._unsaved_state():
            return
        due = time.monotonic() - self._last_snapshot >= self.settings.checkpoint_interval
        if due or self._unsaved >= self.settings.checkpoint_every:
            self._snapshot()

    def _snapshot(self) -> None:
        """Save the session with the last applied sequence number, then drop what the journal no longer
        needs (called from the writer thread, or before it runs)."""
        with self._rw.write():
            seq = self._applied_seq
            self.store.write_snapshot(self.session, seq)
        self._snapshot_seq, self._unsaved, self._last_snapshot = seq, 0, time.monotonic()
        self.counters["snapshots"] += 1
        assert self._journal is not None
        self._journal.compact(seq)

    # -- generation -----------------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        *,
        chat: bool | None = None,
        max_new_tokens: int | None = None,
        options: GenerationOptions | None = None,
    ) -> Future:
        """Queue one prompt; the future resolves to an :class:`Answer` (or a :class:`ServiceError`)."""
        self.require_ready()
        return self._batcher.submit(
            prompt,
            chat=chat,
            max_new_tokens=max_new_tokens or self.session.config.generation.max_new_tokens,
            options=options,
        )

    def stream(
        self,
        prompt: str,
        *,
        chat: bool | None = None,
        max_new_tokens: int | None = None,
        options: GenerationOptions | None = None,
    ) -> tuple[Future, TextStream]:
        """Queue one prompt whose answer is streamed: its future (the whole :class:`Answer`) and the pieces
        of text as the model produces them (:class:`TextStream`; at most ``generation_timeout`` seconds)."""
        from transformers import TextIteratorStreamer

        self.require_ready()
        options = options or GenerationOptions()
        streamer = TextIteratorStreamer(
            self.session.backbone.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=0.1
        )
        future = self._batcher.submit(
            prompt,
            chat=chat,
            max_new_tokens=max_new_tokens or self.session.config.generation.max_new_tokens,
            options=options,
            streamer=streamer,
        )
        return future, TextStream(streamer, future, options, self.settings.generation_timeout)

    # -- reads ----------------------------------------------------------------------------------------------
    def documents(self) -> list[dict[str, Any]]:
        """Learned documents (oldest first), then queued ones."""
        self.require_ready()
        with self._rw.read():
            learned = [
                {"id": h["doc_id"], "status": "learned", **{k: h.get(k) for k in _DOC_FIELDS}}
                for h in self.session.history
            ]
        with self._submit:
            queued = [
                {"id": i, "status": "queued", "seq": s} for i, s in sorted(self._pending.items(), key=_by_seq)
            ]
        return learned + queued

    def document(self, doc_id: str) -> dict[str, Any]:
        for record in self.documents():
            if record["id"] == doc_id:
                return record
        for failure in reversed(self.failures):
            if failure["id"] == doc_id:
                return {"id": doc_id, "status": "failed", "seq": failure["seq"], "error": failure["error"]}
        raise ServiceError(404, f"no document with id {doc_id!r}")

    def history(self) -> list[dict[str, Any]]:
        self.require_ready()
        with self._rw.read():
            return [dict(h) for h in self.session.history]

    def info(self) -> dict[str, Any]:
        session = self._session
        data: dict[str, Any] = {
            "state": self.state,
            "reason": self.reason,
            "auth": self.settings.auth_required,
            "queue": {"waiting": self._writes.qsize(), "size": self.settings.queue_size},
            "generation_queue": {
                "waiting": self._batcher.waiting,
                "size": self.settings.generation_queue_size,
            },
            "max_batch": self.settings.max_batch,
            "journal": {
                "next_seq": self._next_seq,
                "applied_seq": self._applied_seq,
                "snapshot_seq": self._snapshot_seq,
            },
            "replay": {"waiting": len(self._replay), "done": self._replayed.is_set()},
            "counters": dict(self.counters),
            "failures": list(self.failures),
        }
        if session is not None and self.state in (READY, STOPPING):
            with self._rw.read():
                stats = dataclasses.asdict(session.stats())
                data.update(
                    strategy=session.strategy.name,
                    model=session.backbone.name,
                    model_id=self.model_id,
                    documents=len(session.history),
                    stats=stats,
                    can_forget=session.strategy.can_forget,
                )
        return data

    @property
    def model_id(self) -> str:
        if self.settings.model_id:
            return self.settings.model_id
        return self.session.backbone.name

    def fingerprint(self) -> tuple[Any, ...]:
        """What a refused request must leave unchanged (tests compare it before and after)."""
        with self._submit:
            return (
                self._next_seq,
                tuple(sorted(self._known_ids)),
                tuple(sorted(self._pending.items())),
                tuple(h["doc_id"] for h in self.session.history),
                self._writes.qsize(),
            )


_DOC_FIELDS = ("source", "sha256", "learned_at", "tokens")


def _by_seq(item: tuple[str, int]) -> int:
    return item[1]


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
