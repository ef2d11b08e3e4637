"""Reading documents to learn: ``.txt``, ``.md``, ``.jsonl`` and directories of them, and chunking by tokens.

Everything is validated before anything is returned, so a bad file anywhere in a directory stops the whole
read with an error naming the file (and the JSONL line) and the model is never touched. Reading a directory
never leaves it: a symbolic link that resolves outside the directory is skipped (and logged).
"""

from __future__ import annotations

import hashlib
import json
import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from continual_transformer.config import DocumentConfig
from continual_transformer.errors import DocumentError

logger = logging.getLogger(__name__)

_TEXT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class Document:
    """A unit of text to learn."""

    id: str
    text: str
    source: str | None = None
    """File the text came from (``None`` for text given directly)."""

    @property
    def sha256(self) -> str:
        """SHA-256 of the text exactly as given."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def content_sha256(self) -> str:
        """SHA-256 of the normalised text (:func:`normalise_text`): equal for the same document saved with
        other line endings, trailing spaces or Unicode composition. Sessions learn each content once."""
        return hashlib.sha256(normalise_text(self.text).encode("utf-8")).hexdigest()


def normalise_text(text: str) -> str:
    """``text`` in NFC, with ``\\n`` line endings, no trailing whitespace on any line and none around it."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def make_document(
    text: str, doc_id: str | None = None, *, source: str | None = None, line: int | None = None
) -> Document:
    """Validate ``text`` and wrap it in a :class:`Document` (id defaults to a hash of the text)."""
    where = source or "<text>"
    if not isinstance(text, str):
        raise DocumentError(where, f"expected text, got {type(text).__name__}", line=line)
    if not text.strip():
        raise DocumentError(where, "document is empty", line=line)
    if "\x00" in text:
        raise DocumentError(where, "document contains NUL characters (binary data?)", line=line)
    doc_id = doc_id or "doc-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return Document(id=str(doc_id), text=text, source=source)


def read_documents(path: str | Path, config: DocumentConfig | None = None) -> list[Document]:
    """All documents in a file or (recursively) a directory, validated, in a stable order."""
    config = config or DocumentConfig()
    path = Path(path)
    if not path.exists():
        raise DocumentError(path, "no such file or directory")
    if path.is_dir():
        root = path.resolve()
        files = []
        for p in sorted(path.rglob("*")):
            if not p.is_file() or any(part.startswith(".") for part in p.relative_to(path).parts):
                continue
            target = p.resolve()
            if not target.is_relative_to(root):
                logger.warning("skipping %s: a link to %s, outside %s", p, target, path)
                continue
            files.append(p)
        wanted = [p for p in files if p.suffix.lower() in config.extensions]
        for skipped in sorted(set(files) - set(wanted)):
            logger.info("skipping %s (not one of %s)", skipped, ", ".join(config.extensions))
        if not wanted:
            raise DocumentError(path, f"directory holds no documents ({', '.join(config.extensions)})")
        documents = [doc for p in wanted for doc in _read_file(p, config, id_prefix=str(p.relative_to(path)))]
    else:
        documents = _read_file(path, config, id_prefix=path.name)
    seen: dict[str, str | None] = {}
    for doc in documents:
        if doc.id in seen:
            raise DocumentError(
                doc.source or path, f"duplicate document id {doc.id!r} (also in {seen[doc.id]})"
            )
        seen[doc.id] = doc.source
    return documents


def _read_file(path: Path, config: DocumentConfig, *, id_prefix: str) -> list[Document]:
    suffix = path.suffix.lower()
    if suffix not in (*_TEXT_SUFFIXES, ".jsonl"):
        raise DocumentError(path, f"unsupported file type {suffix or '(none)'!r}; use .txt, .md or .jsonl")
    text = _read_text(path, config.max_file_bytes)
    if suffix == ".jsonl":
        return _parse_jsonl(path, text, config, id_prefix=id_prefix)
    return [make_document(text, id_prefix, source=str(path))]


def _read_text(path: Path, max_bytes: int) -> str:
    size = path.stat().st_size
    if size > max_bytes:
        raise DocumentError(
            path, f"file is {size:,} bytes, over the limit of {max_bytes:,} (documents.max_file_bytes)"
        )
    if size == 0:
        raise DocumentError(path, "file is empty")
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise DocumentError(path, "file looks binary (contains NUL bytes); only UTF-8 text is read")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentError(
            path, f"file is not valid UTF-8 (byte {exc.start}: {data[exc.start : exc.start + 1]!r})"
        ) from None
    if not text.strip():
        raise DocumentError(path, "file holds only whitespace")
    return text


def _parse_jsonl(path: Path, text: str, config: DocumentConfig, *, id_prefix: str) -> list[Document]:
    documents = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DocumentError(
                path, f"invalid JSON ({exc.msg} at column {exc.colno})", line=line_no
            ) from None
        if not isinstance(record, dict):
            raise DocumentError(path, f"expected a JSON object, got {type(record).__name__}", line=line_no)
        if config.text_field not in record:
            raise DocumentError(
                path, f"missing field {config.text_field!r} (documents.text_field)", line=line_no
            )
        value = record[config.text_field]
        if not isinstance(value, str):
            raise DocumentError(path, f"field {config.text_field!r} must be a string", line=line_no)
        doc_id = record.get(config.id_field)
        doc_id = f"{id_prefix}:{line_no}" if doc_id is None else str(doc_id)
        documents.append(make_document(value, doc_id, source=str(path), line=line_no))
    if not documents:
        raise DocumentError(path, "no records (every line is blank)")
    return documents


def chunk_spans(n_tokens: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """``[start, end)`` spans covering ``n_tokens`` tokens in chunks of ``size`` that share ``overlap``."""
    if n_tokens <= 0:
        return []
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, size), got overlap={overlap}, size={size}")
    spans, start, step = [], 0, size - overlap
    while True:
        end = min(start + size, n_tokens)
        spans.append((start, end))
        if end == n_tokens:
            return spans
        start += step


def chunk_text(tokenizer, text: str, size: int, overlap: int) -> list[str]:
    """Split ``text`` into chunks of at most ``size`` tokens (decoded back to text)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(ids[a:b]) for a, b in chunk_spans(len(ids), size, overlap)]
