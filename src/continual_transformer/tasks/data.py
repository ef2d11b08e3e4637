"""Labelled examples for task learning, from memory or from files in the formats of ``../shared/data``.

Accepted forms of ``train_data`` (all give the same list of :class:`LabeledExample`):

* a list of ``(text, label)`` pairs (tuples or lists);
* a list of mappings with the text under ``text`` or ``sentence`` and the label under ``label``, ``intent``
  or ``category``;
* a path to a ``.jsonl`` file (one such mapping or pair per line), a ``.csv`` file with a header (Banking77:
  ``text,category``), a ``.json`` file holding a list (cl_benchmark: ``[{"sentence", "label"}]``) or a mapping
  of splits (CLINC150 ``data_full.json``: ``{"train": [[text, intent], ...]}``; ``split`` picks one), or a
  directory holding ``<split>.json`` (a cl_benchmark task folder).

Bad input raises :class:`TaskDataError` naming the file and line (or the item) and what is wrong.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from continual_transformer.errors import ContinualTransformerError, DocumentError

TEXT_KEYS = ("text", "sentence")
LABEL_KEYS = ("label", "intent", "category")


UNKNOWN_TASK = "<unknown task>"
"""What ``TaskLearner.predict(..., allow_unknown=True)`` answers for a text of no learned task."""


class TaskDataError(DocumentError):
    """Labelled data could not be read; the message names the file (or argument) and the line (or item)."""


class TaskError(ContinualTransformerError, ValueError):
    """A task id is unknown, a capacity is exceeded, or the learner was used wrongly."""


@dataclass(frozen=True)
class LabeledExample:
    """One input text and its label."""

    text: str
    label: str


TaskData = str | Path | Iterable[Any]
"""What ``learn_task`` and ``evaluate`` accept: examples in memory or a path (see the module docstring)."""


def read_labeled(
    data: TaskData, *, split: str | None = None, name: str = "train_data"
) -> list[LabeledExample]:
    """Read labelled examples from any accepted form; ``name`` is how errors call in-memory data."""
    if isinstance(data, (str, Path)):
        return read_labeled_file(data, split=split)
    if isinstance(data, Mapping):
        raise TaskDataError(
            name, "expected a list of examples or a path, got a mapping (pass one split's list)"
        )
    examples = []
    for index, item in enumerate(data):
        examples.append(_parse_item(item, where=f"{name}[{index}]", path=None, line=None))
    if not examples:
        raise TaskDataError(name, "no examples")
    return examples


def read_labeled_file(path: str | Path, *, split: str | None = None) -> list[LabeledExample]:
    """Read a ``.jsonl``, ``.csv`` or ``.json`` file, or ``<dir>/<split or train>.json``."""
    path = Path(path)
    if path.is_dir():
        file = path / f"{split or 'train'}.json"
        if not file.exists():
            raise TaskDataError(
                path,
                f"directory has no {file.name} (give a file, or split= one of "
                f"{sorted(p.stem for p in path.glob('*.json'))})",
            )
        return read_labeled_file(file)
    if not path.exists():
        raise TaskDataError(path, "no such file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TaskDataError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if suffix == ".jsonl":
        examples = _read_jsonl(path, text)
    elif suffix == ".csv":
        examples = _read_csv(path, text)
    elif suffix == ".json":
        examples = _read_json(path, text, split)
    else:
        raise TaskDataError(path, f"unsupported file type {suffix or '(none)'!r}; use .jsonl, .csv or .json")
    if not examples:
        raise TaskDataError(path, "no examples")
    return examples


def _read_jsonl(path: Path, text: str) -> list[LabeledExample]:
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskDataError(path, f"invalid JSON ({exc.msg} at column {exc.colno})", line=number) from exc
        examples.append(_parse_item(item, where=None, path=path, line=number))
    return examples


def _read_csv(path: Path, text: str) -> list[LabeledExample]:
    reader = csv.DictReader(text.splitlines())
    header = reader.fieldnames or []
    text_key = next((k for k in TEXT_KEYS if k in header), None)
    label_key = next((k for k in LABEL_KEYS if k in header), None)
    if text_key is None or label_key is None:
        raise TaskDataError(
            path,
            f"header {header} needs a text column ({' or '.join(TEXT_KEYS)}) and a label "
            f"column ({' or '.join(LABEL_KEYS)})",
            line=1,
        )
    examples = []
    for row in reader:
        if None in row or any(value is None for value in row.values()):
            raise TaskDataError(path, f"expected {len(header)} columns", line=reader.line_num)
        examples.append(
            _parse_item(
                {"text": row[text_key], "label": row[label_key]}, where=None, path=path, line=reader.line_num
            )
        )
    return examples


def _read_json(path: Path, text: str, split: str | None) -> list[LabeledExample]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TaskDataError(path, f"invalid JSON ({exc.msg} at column {exc.colno})", line=exc.lineno) from exc
    if isinstance(data, Mapping):
        key = split or "train"
        if key not in data:
            raise TaskDataError(path, f"has no split {key!r}; splits: {sorted(data)}")
        data = data[key]
        where = f"{key}"
    else:
        where = ""
    if not isinstance(data, list):
        raise TaskDataError(path, f"expected a list of examples, got {type(data).__name__}")
    return [_parse_item(item, where=f"{where}[{i}]", path=path, line=None) for i, item in enumerate(data)]


def _parse_item(item: Any, *, where: str | None, path: Path | None, line: int | None) -> LabeledExample:
    def fail(reason: str) -> TaskDataError:
        if path is None:
            return TaskDataError(where or "train_data", reason)
        return TaskDataError(path, f"item {where}: {reason}" if where else reason, line=line)

    if isinstance(item, LabeledExample):
        text, label = item.text, item.label
    elif isinstance(item, Mapping):
        text_key = next((k for k in TEXT_KEYS if k in item), None)
        label_key = next((k for k in LABEL_KEYS if k in item), None)
        if text_key is None:
            raise fail(f"no text field (one of {', '.join(TEXT_KEYS)}); keys: {sorted(item)}")
        if label_key is None:
            raise fail(f"no label field (one of {', '.join(LABEL_KEYS)}); keys: {sorted(item)}")
        text, label = item[text_key], item[label_key]
    elif isinstance(item, (list, tuple)):
        if len(item) != 2:
            raise fail(f"expected a (text, label) pair, got {len(item)} values")
        text, label = item
    else:
        raise fail(f"expected a (text, label) pair or a mapping, got {type(item).__name__}")
    if isinstance(label, int) and not isinstance(label, bool):
        label = str(label)
    if not isinstance(text, str) or not text.strip():
        raise fail(f"text must be a non-empty string, got {text!r}")
    if not isinstance(label, str) or not label.strip():
        raise fail(f"label must be a non-empty string, got {label!r}")
    return LabeledExample(text, label.strip())
