"""Datasets of the knowledge benchmark: documents to learn, and probes that test whether their facts were
learnt.

Built-in benchmarks (see :func:`load_benchmark`):

- ``novel_facts``: generated documents about fictional entities; no model knows the answers beforehand.
- ``boolq``: Wikipedia passages with yes/no questions (BoolQ), from the shared data folder.
- ``news``: BBC News articles with cloze probes on their own names, numbers and years.
- a path: your own benchmark in JSONL (``docs/benchmark-format.md``).

:data:`KNOWN_FACTS` are general-knowledge probes for measuring what learning must not destroy.
"""

from __future__ import annotations

from pathlib import Path

from continual_transformer.errors import DocumentError
from continual_transformer.evaluation.datasets.base import (
    GENERAL_DOC_ID,
    PROBE_KINDS,
    KnowledgeBenchmark,
    Probe,
)
from continual_transformer.evaluation.datasets.boolq import boolq
from continual_transformer.evaluation.datasets.custom import load_custom
from continual_transformer.evaluation.datasets.known_facts import KNOWN_FACTS
from continual_transformer.evaluation.datasets.news import news
from continual_transformer.evaluation.datasets.novel_facts import novel_facts

BUILTIN_BENCHMARKS = ("novel_facts", "boolq", "news")
DEFAULT_N_DOCS = 50

__all__ = [
    "BUILTIN_BENCHMARKS",
    "GENERAL_DOC_ID",
    "KNOWN_FACTS",
    "PROBE_KINDS",
    "KnowledgeBenchmark",
    "Probe",
    "boolq",
    "load_benchmark",
    "load_custom",
    "news",
    "novel_facts",
]


def load_benchmark(
    name_or_path: str | Path,
    *,
    n_docs: int | None = DEFAULT_N_DOCS,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> KnowledgeBenchmark:
    """A built-in benchmark by name, or a custom one from a JSONL file or directory.

    ``n_docs`` caps a custom benchmark too (its first ``n_docs`` documents, in file order, with their probes);
    ``None`` means the default for a built-in and everything for a custom one. ``data_dir`` is needed by
    ``boolq`` only (the shared data folder, ``config.data_dir``).
    """
    if n_docs is not None and n_docs < 1:
        raise ValueError(f"n_docs must be >= 1, got {n_docs}")
    name = str(name_or_path)
    if name == "novel_facts":
        return novel_facts(n_docs or DEFAULT_N_DOCS, seed=seed)
    if name == "boolq":
        if data_dir is None:
            raise DocumentError("boolq", "needs data_dir, the shared data folder holding cl_benchmark/BoolQA")
        return boolq(data_dir, n_docs or DEFAULT_N_DOCS, seed=seed)
    if name == "news":
        return news(n_docs or DEFAULT_N_DOCS, seed=seed)
    path = Path(name_or_path)
    if not path.exists():
        raise DocumentError(
            path,
            f"no such benchmark file or directory (built-in benchmarks: {', '.join(BUILTIN_BENCHMARKS)})",
        )
    bench = load_custom(path)
    if n_docs is None or n_docs >= len(bench.documents):
        return bench
    documents = bench.documents[:n_docs]
    kept = {doc.id for doc in documents}
    probes = tuple(p for p in bench.probes if p.doc_id in kept)
    return KnowledgeBenchmark(bench.name, documents, probes, {**bench.meta, "n_docs": n_docs})
