"""Your own knowledge benchmark from JSONL (format: ``docs/benchmark-format.md``).

Either one ``.jsonl`` file holding both kinds of record, or a directory with ``documents.jsonl`` and
``probes.jsonl``::

    {"id": "acme-1", "text": "Acme Corp was founded in 1921 in Springfield."}
    {"doc_id": "acme-1", "prompt": "Acme Corp was founded in the year", "answer": "1921", "kind": "cloze"}
    {"doc_id": "acme-1", "prompt": "Where was Acme Corp founded?", "answer": ["Springfield"], "kind": "qa"}

Everything is validated before anything is returned; every error names the file and the line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from continual_transformer.documents import Document, make_document
from continual_transformer.errors import DocumentError
from continual_transformer.evaluation.datasets.base import PROBE_KINDS, KnowledgeBenchmark, Probe

DOCUMENTS_FILE = "documents.jsonl"
PROBES_FILE = "probes.jsonl"
_DOCUMENT_FIELDS = ("id", "text")
_PROBE_FIELDS = ("doc_id", "prompt", "answer", "kind")


def load_custom(path: str | Path) -> KnowledgeBenchmark:
    """Read and validate a benchmark from one JSONL file or a directory of ``documents.jsonl`` +
    ``probes.jsonl``."""
    path = Path(path)
    if not path.exists():
        raise DocumentError(path, "no such file or directory")
    if path.is_dir():
        doc_path, probe_path = path / DOCUMENTS_FILE, path / PROBES_FILE
        for needed in (doc_path, probe_path):
            if not needed.is_file():
                raise DocumentError(
                    needed, f"missing: a benchmark directory holds {DOCUMENTS_FILE} and {PROBES_FILE}"
                )
        records = [(doc_path, line, rec, "document") for line, rec in _read_jsonl(doc_path)]
        records += [(probe_path, line, rec, "probe") for line, rec in _read_jsonl(probe_path)]
        name = path.name
    else:
        records = [(path, line, rec, None) for line, rec in _read_jsonl(path)]
        name = path.stem

    documents: list[Document] = []
    doc_lines: dict[str, str] = {}
    pending: list[tuple[Path, int, dict[str, Any]]] = []
    for file, line, record, expected in records:
        kind = expected or _record_type(file, line, record)
        if kind == "document":
            doc = _document(file, line, record)
            if doc.id in doc_lines:
                first = doc_lines[doc.id]
                raise DocumentError(file, f"duplicate document id {doc.id!r} (first at {first})", line=line)
            doc_lines[doc.id] = f"{file}:{line}"
            documents.append(doc)
        else:
            pending.append((file, line, record))
    if not documents:
        where = path / DOCUMENTS_FILE if path.is_dir() else path
        raise DocumentError(where, "no documents (records with 'id' and 'text')")
    probes = [_probe(file, line, record, doc_lines) for file, line, record in pending]
    if not probes:
        where = path / PROBES_FILE if path.is_dir() else path
        raise DocumentError(where, "no probes (records with 'doc_id', 'prompt', 'answer', 'kind')")
    meta = {"source": str(path), "format": "jsonl", "n_docs": len(documents)}
    return KnowledgeBenchmark(name, tuple(documents), tuple(probes), meta)


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    data = path.read_bytes()
    if not data.strip():
        raise DocumentError(path, "file is empty")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DocumentError(
            path, f"not valid UTF-8 (byte {data[exc.start : exc.start + 1]!r})", line=line
        ) from None
    out = []
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
        out.append((line_no, record))
    return out


def _record_type(path: Path, line: int, record: dict[str, Any]) -> str:
    declared = record.get("type")
    if declared is not None:
        if declared not in ("document", "probe"):
            raise DocumentError(
                path, f"unknown record type {declared!r}; use 'document' or 'probe'", line=line
            )
        return declared
    if any(field in record for field in _PROBE_FIELDS):
        return "probe"
    if any(field in record for field in _DOCUMENT_FIELDS):
        return "document"
    raise DocumentError(
        path,
        "record is neither a document (fields 'id', 'text') nor a probe "
        "(fields 'doc_id', 'prompt', 'answer', 'kind')",
        line=line,
    )


def _require(path: Path, line: int, record: dict[str, Any], fields: tuple[str, ...], what: str) -> None:
    missing = [f for f in fields if f not in record]
    if missing:
        fields_text = ", ".join(map(repr, missing))
        plural = "s" if len(missing) > 1 else ""
        raise DocumentError(path, f"{what} is missing field{plural} {fields_text}", line=line)


def _string(path: Path, line: int, record: dict[str, Any], field: str) -> str:
    value = record[field]
    if not isinstance(value, str) or not value.strip():
        raise DocumentError(path, f"field {field!r} must be a non-empty string, got {value!r}", line=line)
    return value


def _document(path: Path, line: int, record: dict[str, Any]) -> Document:
    _require(path, line, record, _DOCUMENT_FIELDS, "document")
    doc_id = record["id"]
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise DocumentError(path, f"field 'id' must be a non-empty string, got {record['id']!r}", line=line)
    return make_document(record["text"], doc_id, source=str(path), line=line)


def _probe(path: Path, line: int, record: dict[str, Any], doc_lines: dict[str, str]) -> Probe:
    _require(path, line, record, _PROBE_FIELDS, "probe")
    doc_id = record["doc_id"]
    doc_id = str(doc_id) if isinstance(doc_id, int) and not isinstance(doc_id, bool) else doc_id
    if not isinstance(doc_id, str) or doc_id not in doc_lines:
        raise DocumentError(
            path, f"probe names document {doc_id!r}, which is not in the benchmark", line=line
        )
    kind = record["kind"]
    if kind not in PROBE_KINDS:
        allowed = " or ".join(map(repr, PROBE_KINDS))
        raise DocumentError(path, f"unknown probe kind {kind!r}; use {allowed}", line=line)
    prompt = _string(path, line, record, "prompt")
    answer = record["answer"]
    answers = [answer] if isinstance(answer, str) else answer
    if (
        not isinstance(answers, list)
        or not answers
        or not all(isinstance(a, str) and a.strip() for a in answers)
    ):
        raise DocumentError(
            path, f"field 'answer' must be a non-empty string or a list of them, got {answer!r}", line=line
        )
    fact_id = record.get("fact_id")
    if fact_id is not None and not isinstance(fact_id, str):
        raise DocumentError(path, f"field 'fact_id' must be a string, got {fact_id!r}", line=line)
    return Probe(doc_id, prompt, tuple(answers), kind, fact_id)
