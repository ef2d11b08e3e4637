"""The journal: every acknowledged document, one JSON line each, fsynced before the acknowledgement.

A line is ``{"seq": n, "op": "learn", "id": ..., "text": ..., "source": ...}`` with ``seq`` strictly
increasing. Lines are ASCII (``ensure_ascii``), so a line break inside a text can never split a record.
A process killed while writing leaves at most one torn line at the end; it was never acknowledged and is
dropped when the journal is opened. A torn or out-of-order line anywhere else is corruption and refused.

After a snapshot holds everything up to sequence number ``s``, :meth:`Journal.compact` drops the lines
up to ``s`` (rewrite to a temporary file, fsync, rename): a crash before the rename keeps the old journal,
whose extra lines are skipped on replay by their sequence numbers.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from continual_transformer.documents import Document

logger = logging.getLogger(__name__)

LEARN = "learn"


class JournalError(RuntimeError):
    """The journal on disk is corrupt beyond a torn last line."""


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One acknowledged operation."""

    seq: int
    """Position in the order operations are applied (strictly increasing, never reused)."""
    op: str
    """What to do; ``learn`` is the only operation."""
    document: Document
    """The document to learn."""

    def to_line(self) -> bytes:
        record = {
            "seq": self.seq,
            "op": self.op,
            "id": self.document.id,
            "text": self.document.text,
            "source": self.document.source,
        }
        return (json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n").encode("ascii")

    @classmethod
    def from_line(cls, line: bytes) -> Entry:
        record = json.loads(line)
        if not isinstance(record, dict) or record.get("op") != LEARN:
            raise ValueError("not a learn record")
        seq, doc_id, text, source = record["seq"], record["id"], record["text"], record.get("source")
        if not (isinstance(seq, int) and isinstance(doc_id, str) and isinstance(text, str)):
            raise ValueError("fields of the wrong type")
        if source is not None and not isinstance(source, str):
            raise ValueError("source must be a string")
        return cls(seq=seq, op=LEARN, document=Document(id=doc_id, text=text, source=source))


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """Append-only JSONL file of acknowledged documents (thread-safe)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self.last_seq = self._recover()
        self._handle = open(self.path, "ab")  # noqa: SIM115 - held open for appends until close()
        if created:
            fsync_dir(self.path.parent)

    def _recover(self) -> int:
        """Check the file, drop a torn last line; returns the last sequence number (0 when empty)."""
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # ``tail`` is b"" when the file ends with a newline
        last, good_bytes = 0, 0
        for number, line in enumerate(complete, start=1):
            try:
                entry = Entry.from_line(line)
            except (ValueError, KeyError, UnicodeDecodeError) as exc:
                if number == len(complete) and not tail:
                    logger.warning("journal %s: dropping a torn last line (%s)", self.path, exc)
                    break
                raise JournalError(f"journal {self.path} is corrupt at line {number}: {exc}") from None
            if entry.seq <= last:
                raise JournalError(
                    f"journal {self.path} line {number}: sequence number {entry.seq} after {last}"
                )
            last = entry.seq
            good_bytes += len(line) + 1
        if tail:
            logger.warning("journal %s: dropping a torn last line (%d bytes)", self.path, len(tail))
        if good_bytes != len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(good_bytes)
                handle.flush()
                os.fsync(handle.fileno())
        return last

    def entries(self, after: int = 0) -> Iterator[Entry]:
        """Entries with a sequence number above ``after``, in order."""
        with self._lock:
            self._handle.flush()
            with open(self.path, "rb") as handle:
                data = handle.read()
        for line in data.split(b"\n"):
            if line:
                entry = Entry.from_line(line)
                if entry.seq > after:
                    yield entry

    def append(self, entries: Sequence[Entry]) -> None:
        """Write ``entries`` and fsync; when that fails the file is cut back to where it was."""
        if not entries:
            return
        payload = b"".join(e.to_line() for e in entries)
        with self._lock:
            if entries[0].seq <= self.last_seq:
                raise ValueError(f"sequence number {entries[0].seq} is not after {self.last_seq}")
            start = self._handle.tell()
            try:
                self._handle.write(payload)
                self._handle.flush()
                os.fsync(self._handle.fileno())
            except BaseException:
                self._handle.seek(start)
                self._handle.truncate(start)
                raise
            self.last_seq = entries[-1].seq

    def compact(self, upto: int) -> int:
        """Drop entries with a sequence number up to ``upto``; returns how many are kept."""
        with self._lock:
            self._handle.flush()
            kept = [
                line
                for line in self.path.read_bytes().split(b"\n")
                if line and Entry.from_line(line).seq > upto
            ]
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "wb") as handle:
                handle.write(b"".join(line + b"\n" for line in kept))
                handle.flush()
                os.fsync(handle.fileno())
            self._handle.close()
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
            self._handle = open(self.path, "ab")  # noqa: SIM115
            return len(kept)

    def close(self) -> None:
        with self._lock:
            self._handle.close()
