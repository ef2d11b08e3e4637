"""The Curator's operations on a playbook: parsed strictly from model output, merged deterministically.

An operation is a small JSON object::

    {"op": "add", "section": "facts", "text": "..."}
    {"op": "update", "id": "ctx-00003", "text": "..."}
    {"op": "remove", "id": "ctx-00002"}

A reply may hold ``{"operations": [...]}``, a bare list, or one operation, anywhere in its text (code fences
and prose around it are skipped): small models wrap JSON in many ways. Inside, nothing is guessed: an
operation with an unknown ``op``, a missing or extra key, an unknown section or id, or a blank or overlong
text is rejected and counted; the valid ones are kept. Nothing here raises on model output.

:func:`apply_operations` merges operations in the order given, so the same operations on the same playbook
always give the same playbook: adds take the next id, exact duplicates (and, with a similarity function,
near duplicates) are folded into the existing bullet, and when the playbook is over its cap the least useful
bullets are evicted (lowest ``helpful - harmful``, then oldest, then lowest id).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from continual_transformer.ace.playbook import (
    MAX_BULLET_CHARS,
    Bullet,
    Playbook,
    bullet_id,
    normalise_bullet_text,
)

OPS = ("add", "update", "remove")
_KEYS = {"add": {"op", "section", "text"}, "update": {"op", "id", "text"}, "remove": {"op", "id"}}

SimilarityFn = Callable[[Sequence[str], Sequence[str]], Any]
"""``(new_texts, old_texts) -> (N, M)`` cosine similarities (a tensor or nested lists)."""


@dataclass(frozen=True)
class Operation:
    """One validated Curator operation."""

    op: str
    id: str | None = None
    section: str | None = None
    text: str | None = None


@dataclass
class ParseResult:
    """What a reply held: the valid operations and the reasons the others were rejected."""

    operations: list[Operation] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    found_json: bool = False
    """Whether any JSON value was found in the reply at all."""


def extract_json(text: str) -> Any:
    """The first JSON object or list in ``text`` (code fences and prose around it skipped); ``None`` if none.

    Never raises: a reply with no valid JSON gives ``None``.
    """
    if not isinstance(text, str):
        return None
    decoder = json.JSONDecoder()
    for start, char in enumerate(text):
        if char in "{[":
            try:
                value, _ = decoder.raw_decode(text, start)
            except (ValueError, RecursionError):
                continue
            return value
    return None


def parse_operations(text: str, playbook: Playbook, *, max_operations: int = 8) -> ParseResult:
    """The valid operations of a Curator reply, checked against ``playbook`` (its sections and ids)."""
    result = ParseResult()
    value = extract_json(text)
    if value is None:
        result.rejected.append("no JSON found")
        return result
    result.found_json = True
    if isinstance(value, dict) and "operations" in value:
        if set(value) != {"operations"}:
            result.rejected.append(f"unknown keys beside operations: {sorted(set(value) - {'operations'})}")
        value = value["operations"]
    items = value if isinstance(value, list) else [value]
    for i, item in enumerate(items):
        if len(result.operations) >= max_operations:
            result.rejected.append(f"operation {i}: over the limit of {max_operations} operations per reply")
            continue
        op, reason = validate_operation(item, playbook)
        if op is None:
            result.rejected.append(f"operation {i}: {reason}")
        else:
            result.operations.append(op)
    return result


def validate_operation(item: Any, playbook: Playbook) -> tuple[Operation | None, str]:
    """``(operation, "")`` when ``item`` is a valid operation on ``playbook``, else ``(None, reason)``."""
    if not isinstance(item, dict):
        return None, f"expected an object, got {type(item).__name__}"
    kind = item.get("op")
    if kind not in OPS:
        return None, f"op must be one of {', '.join(OPS)}, got {kind!r}"
    if set(item) != _KEYS[kind]:
        return None, f"{kind} takes exactly the keys {sorted(_KEYS[kind])}, got {sorted(item)}"
    if "id" in item and (not isinstance(item["id"], str) or playbook.get(item["id"]) is None):
        return None, f"unknown bullet id {item['id']!r}"
    if "section" in item and item["section"] not in playbook.sections:
        return None, f"unknown section {item['section']!r} (sections: {', '.join(playbook.sections)})"
    if "text" in item:
        text = item["text"]
        if not isinstance(text, str) or not text.strip():
            return None, "text must be a non-blank string"
        if len(text) > MAX_BULLET_CHARS:
            return None, f"text is over {MAX_BULLET_CHARS} characters"
        text = " ".join(text.split())
        return Operation(kind, id=item.get("id"), section=item.get("section"), text=text), ""
    return Operation(kind, id=item["id"]), ""


@dataclass
class MergeReport:
    """What :func:`apply_operations` did."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    """Ids of existing bullets an add was folded into (exact or near duplicate)."""
    evicted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """Operations that no longer applied when their turn came (e.g. an id removed earlier in the batch)."""

    def to_dict(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.__dict__.items()}


def apply_operations(
    playbook: Playbook,
    operations: Sequence[Operation],
    *,
    step: int | None = None,
    max_bullets: int | None = None,
    similarity: SimilarityFn | None = None,
    dedupe_threshold: float | None = None,
) -> MergeReport:
    """Merge ``operations`` into ``playbook`` in order (in place); the same inputs give the same playbook.

    ``similarity`` with ``dedupe_threshold`` folds an add whose text is at least that similar to a bullet of
    the same section into that bullet (its ``helpful`` count goes up by one: the insight was found again).
    Exact duplicates (same normalised text, any section) are always folded. After the merge, bullets beyond
    ``max_bullets`` are evicted, least useful first.
    """
    step = playbook.step if step is None else step
    report = MergeReport()
    for op in operations:
        index = next((i for i, b in enumerate(playbook.bullets) if b.id == op.id), None)
        if op.op == "remove":
            if index is None:
                report.skipped.append(f"remove {op.id}")
                continue
            del playbook.bullets[index]
            playbook.version += 1
            report.removed.append(str(op.id))
        elif op.op == "update":
            if index is None:
                report.skipped.append(f"update {op.id}")
                continue
            old = playbook.bullets[index]
            if old.text != op.text:
                playbook._replace(index, replace(old, text=str(op.text), updated_step=step))
                report.updated.append(old.id)
        else:
            assert op.text is not None and op.section is not None
            same = _duplicate_of(playbook, op, similarity, dedupe_threshold)
            if same is not None:
                old = playbook.bullets[same]
                playbook._replace(same, replace(old, helpful=old.helpful + 1, updated_step=step))
                report.duplicates.append(old.id)
                continue
            new = Bullet(
                id=bullet_id(playbook.next_id),
                section=op.section,
                text=op.text,
                created_step=step,
                updated_step=step,
            )
            playbook.next_id += 1
            playbook.bullets.append(new)
            playbook.version += 1
            report.added.append(new.id)
    if max_bullets is not None:
        report.evicted = evict(playbook, max_bullets)
    return report


def _duplicate_of(
    playbook: Playbook, op: Operation, similarity: SimilarityFn | None, threshold: float | None
) -> int | None:
    key = normalise_bullet_text(str(op.text))
    for i, bullet in enumerate(playbook.bullets):
        if normalise_bullet_text(bullet.text) == key:
            return i
    if similarity is None or threshold is None:
        return None
    same_section = [i for i, b in enumerate(playbook.bullets) if b.section == op.section]
    if not same_section:
        return None
    scores = similarity([str(op.text)], [playbook.bullets[i].text for i in same_section])
    row = [float(s) for s in (scores[0].tolist() if hasattr(scores[0], "tolist") else scores[0])]
    best = max(range(len(row)), key=lambda j: (row[j], -j))
    return same_section[best] if row[best] >= threshold else None


def eviction_order(bullets: Sequence[Bullet]) -> list[Bullet]:
    """Bullets from least to most useful: lowest ``helpful - harmful``, then oldest (last updated), then
    id."""
    return sorted(bullets, key=lambda b: (b.usefulness, b.updated_step, b.created_step, b.id))


def evict(playbook: Playbook, max_bullets: int) -> list[str]:
    """Remove the least useful bullets until at most ``max_bullets`` remain; their ids, in eviction order."""
    excess = len(playbook.bullets) - max_bullets
    if excess <= 0:
        return []
    gone = [b.id for b in eviction_order(playbook.bullets)[:excess]]
    drop = set(gone)
    playbook.bullets = [b for b in playbook.bullets if b.id not in drop]
    playbook.version += 1
    return gone
