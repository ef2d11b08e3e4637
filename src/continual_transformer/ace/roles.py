"""ACE's three roles (Zhang et al. 2025, section 3): Generator, Reflector, Curator.

- The **Generator** answers a question with the relevant documents and playbook bullets in its prompt (the
  ``ace`` strategy's own answering path, so learning improves exactly what is deployed) and names the bullets
  it used: the ids it cites (``[ctx-00001]``), or, when it cites none, the bullets it was shown
  (:func:`used_bullets`).
- The **Reflector** critiques an answer against feedback (the reference answer and the result of a check that
  ran) and tags the used bullets ``helpful`` / ``harmful`` / ``neutral``, extracting an insight
  (:func:`reflector_messages`, :func:`parse_reflection`).
- The **Curator** turns the insight into small JSON operations on the playbook (:func:`curator_messages`;
  parsed and merged by :mod:`continual_transformer.ace.operations`).

Every parser here takes whatever a model wrote and keeps only what is valid; nothing raises on model output.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from continual_transformer.ace.backends import Message
from continual_transformer.ace.operations import extract_json
from continual_transformer.ace.playbook import Bullet, Playbook

TAGS = ("helpful", "harmful", "neutral")
_CITED = re.compile(r"ctx-\d{5,9}")

REFLECTOR_SYSTEM = (
    "You are the Reflector. You compare a model's answer with the reference answer, say what went wrong, "
    "extract one reusable insight, and tag each playbook bullet the model used as helpful, harmful or "
    "neutral. Reply with one JSON object and nothing else."
)
REFLECTOR_FORMAT = (
    'Reply as JSON: {"error": "<what went wrong, or empty>", "insight": "<one short reusable rule or fact>", '
    '"bullet_tags": {"<bullet id>": "helpful" | "harmful" | "neutral"}}'
)
CURATOR_SYSTEM = (
    "You are the Curator of a playbook of short bullets. You turn an insight into a few small edits of the "
    "playbook: add a new bullet, update a bullet's text, or remove a wrong bullet. Never rewrite the whole "
    "playbook. Reply with one JSON object and nothing else."
)
CURATOR_FORMAT = (
    'Reply as JSON: {"operations": [{"op": "add", "section": "<section>", "text": "<bullet>"}, '
    '{"op": "update", "id": "<bullet id>", "text": "<new text>"}, {"op": "remove", "id": "<bullet id>"}]}. '
    'Reply {"operations": []} when nothing should change.'
)


@dataclass(frozen=True)
class QAPair:
    """A question about a document and the answer that counts as right (the feedback of a loop)."""

    question: str
    answer: str
    alternatives: tuple[str, ...] = ()
    """Other answers that also count as right."""

    @property
    def answers(self) -> tuple[str, ...]:
        return (self.answer, *self.alternatives)


def as_qa_pairs(pairs: Sequence[Any]) -> list[QAPair]:
    """``QAPair``s, ``(question, answer)`` tuples or ``{"question", "answer"}`` mappings as ``QAPair``s."""
    out = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, QAPair):
            item = pair
        elif isinstance(pair, dict):
            item = QAPair(str(pair.get("question", "")), str(pair.get("answer", "")))
        elif isinstance(pair, (tuple, list)) and len(pair) == 2:
            item = QAPair(str(pair[0]), str(pair[1]))
        else:
            raise ValueError(f"qa_pairs[{i}]: expected (question, answer), got {pair!r}")
        if not item.question.strip() or not item.answer.strip():
            raise ValueError(f"qa_pairs[{i}]: question and answer must not be empty")
        out.append(item)
    return out


def used_bullets(answer: str, shown: Sequence[str]) -> tuple[list[str], bool]:
    """``(ids, cited)``: the shown bullets the answer cites, or all shown bullets when it cites none."""
    cited = [i for i in dict.fromkeys(_CITED.findall(answer)) if i in shown]
    return (cited, True) if cited else (list(shown), False)


def reflector_messages(qa: QAPair, answer: str, correct: bool, bullets: Sequence[Bullet]) -> list[Message]:
    used = "\n".join(b.render() for b in bullets) or "(none)"
    verdict = "correct" if correct else "wrong"
    user = (
        f"Question: {qa.question}\nModel answer: {answer}\nReference answer: {qa.answer}\n"
        f"Check: the answer is {verdict}.\nPlaybook bullets the model used:\n{used}\n\n{REFLECTOR_FORMAT}"
    )
    return [{"role": "system", "content": REFLECTOR_SYSTEM}, {"role": "user", "content": user}]


@dataclass
class Reflection:
    """What the Reflector said about one answer (only the valid parts of its reply)."""

    correct: bool
    """The check's verdict (the feedback), not the model's."""
    error: str = ""
    insight: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    """Valid tags by bullet id (only ids that were used)."""
    parsed: bool = False
    """Whether the reply held a JSON object."""
    rejected: list[str] = field(default_factory=list)


def parse_reflection(text: str, *, correct: bool, used: Sequence[str], max_chars: int = 300) -> Reflection:
    """The valid parts of a Reflector reply: text fields that are strings, tags on used ids with a known
    tag; everything else is counted in :attr:`Reflection.rejected`."""
    reflection = Reflection(correct=correct)
    value = extract_json(text)
    if not isinstance(value, dict):
        reflection.rejected.append("no JSON object found")
        return reflection
    reflection.parsed = True
    for key in sorted(set(value) - {"error", "insight", "bullet_tags"}):
        reflection.rejected.append(f"unknown key {key!r}")
    for key in ("error", "insight"):
        item = value.get(key, "")
        if isinstance(item, str):
            setattr(reflection, key, " ".join(item.split())[:max_chars])
        else:
            reflection.rejected.append(f"{key} is not a string")
    tags = value.get("bullet_tags", {})
    if isinstance(tags, list):  # [{"id": ..., "tag": ...}] is a common way of writing the same thing
        tags = {t.get("id"): t.get("tag") for t in tags if isinstance(t, dict)}
    if not isinstance(tags, dict):
        reflection.rejected.append("bullet_tags is not an object")
        return reflection
    for bullet_id, tag in tags.items():
        if bullet_id not in used:
            reflection.rejected.append(f"tag on a bullet that was not used: {bullet_id!r}")
        elif tag not in TAGS:
            reflection.rejected.append(f"unknown tag {tag!r}")
        else:
            reflection.tags[bullet_id] = tag
    return reflection


def curator_messages(
    qa: QAPair, answer: str, reflection: Reflection, playbook: Playbook, shown: Sequence[Bullet]
) -> list[Message]:
    current = playbook.render(shown) or "(empty)"
    insight = reflection.insight or "(none)"
    verdict = "correct" if reflection.correct else "wrong"
    user = (
        f"Sections: {', '.join(playbook.sections)}\nRelevant playbook bullets:\n{current}\n\n"
        f"Question: {qa.question}\nModel answer ({verdict}): {answer}\nReference answer: {qa.answer}\n"
        f"Reflector's insight: {insight}\n\n{CURATOR_FORMAT}"
    )
    return [{"role": "system", "content": CURATOR_SYSTEM}, {"role": "user", "content": user}]
