"""The two records every knowledge benchmark is made of: documents to learn and probes that test them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from continual_transformer.documents import Document

PROBE_KINDS = ("cloze", "qa")
GENERAL_DOC_ID = "general"
"""``doc_id`` of probes on general knowledge (:data:`KNOWN_FACTS`), which belong to no document."""


@dataclass(frozen=True)
class Probe:
    """One test of a fact: a prompt and the answers that count as right.

    ``cloze`` prompts end right before the answer ("Mirela Voskuijlen was born in the town of"); ``qa``
    prompts are questions ("Where was Mirela Voskuijlen born?"). Both are scored on the model's first
    answer span (:mod:`continual_transformer.evaluation.metrics`).
    """

    doc_id: str
    prompt: str
    answers: tuple[str, ...]
    """The canonical answer first, then acceptable alternatives."""
    kind: str
    """``"cloze"`` or ``"qa"``."""
    fact_id: str | None = None
    """Probes of the same fact (a cloze and a question, say) share it."""

    def __post_init__(self) -> None:
        if isinstance(self.answers, str) or not isinstance(self.answers, Iterable):
            raise ValueError(f"Probe.answers must be a tuple of strings, got {self.answers!r}")
        answers = tuple(self.answers)
        object.__setattr__(self, "answers", answers)
        if self.kind not in PROBE_KINDS:
            raise ValueError(f"Probe.kind must be one of {', '.join(PROBE_KINDS)}, got {self.kind!r}")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("Probe.prompt must be a non-empty string")
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise ValueError(f"Probe.answers must hold at least one non-empty string, got {answers!r}")

    @property
    def answer(self) -> str:
        """The canonical answer."""
        return self.answers[0]


@dataclass(frozen=True)
class KnowledgeBenchmark:
    """Documents to learn, in stream order, and the probes that test what each one says."""

    name: str
    documents: tuple[Document, ...]
    probes: tuple[Probe, ...]
    meta: dict[str, Any] = field(default_factory=dict, hash=False)
    """How it was made (source, seed, counts); JSON-serialisable."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "documents", tuple(self.documents))
        object.__setattr__(self, "probes", tuple(self.probes))
        ids: set[str] = set()
        for doc in self.documents:
            if doc.id in ids:
                raise ValueError(f"benchmark {self.name!r}: duplicate document id {doc.id!r}")
            ids.add(doc.id)
        for probe in self.probes:
            if probe.doc_id not in ids:
                raise ValueError(
                    f"benchmark {self.name!r}: probe {probe.prompt!r} names unknown document {probe.doc_id!r}"
                )

    def probes_for(self, doc_ids: str | Iterable[str]) -> list[Probe]:
        """Probes of the given documents, in benchmark order."""
        wanted = {doc_ids} if isinstance(doc_ids, str) else set(doc_ids)
        return [p for p in self.probes if p.doc_id in wanted]

    def document(self, doc_id: str) -> Document:
        """The document with this id."""
        for doc in self.documents:
            if doc.id == doc_id:
                return doc
        raise KeyError(doc_id)

    def counts(self) -> dict[str, int]:
        """Documents, probes and probes per kind."""
        out = {"documents": len(self.documents), "probes": len(self.probes)}
        for kind in PROBE_KINDS:
            out[kind] = sum(p.kind == kind for p in self.probes)
        return out
