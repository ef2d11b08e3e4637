"""BoolQ (Clark et al., 2019) as a knowledge benchmark: learn a Wikipedia passage, answer yes/no questions on
it.

Read from the copy shipped with the continual-learning benchmark collection
(``<data_dir>/cl_benchmark/BoolQA/BoolQA/{train,test}.json``), where each record packs the question and the
passage into one string: ``{"sentence": "question: ...\\npassage: ...", "label": "True" | "False"}``.
Passages asked about more than once become one document with all their (distinct) questions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from continual_transformer.documents import make_document
from continual_transformer.errors import DocumentError
from continual_transformer.evaluation.datasets.base import KnowledgeBenchmark, Probe

BOOLQ_SUBDIR = Path("cl_benchmark", "BoolQA", "BoolQA")
_SPLITS = ("train", "test")
_LABELS = {"true": "yes", "false": "no"}


def boolq_prompt(question: str) -> str:
    """The probe's wording: asks for a bare yes/no so exact match can score it."""
    question = question.strip().rstrip("?").strip()
    return f"Answer yes or no: {question[:1].upper()}{question[1:]}?"


def boolq(data_dir: str | Path, n_docs: int = 50, *, seed: int = 0) -> KnowledgeBenchmark:
    """``n_docs`` BoolQ passages sampled by ``seed`` (from train and test together), each with its
    questions."""
    if n_docs < 1:
        raise ValueError(f"n_docs must be >= 1, got {n_docs}")
    folder = Path(data_dir) / BOOLQ_SUBDIR
    passages: dict[str, list[tuple[str, str]]] = {}  # passage -> [(question, yes/no)], in file order
    for split in _SPLITS:
        path = folder / f"{split}.json"
        for question, passage, answer in _read_split(path):
            asked = passages.setdefault(passage, [])
            if (question, answer) not in asked:
                asked.append((question, answer))

    order = list(passages)
    random.Random(seed).shuffle(order)
    chosen = order[:n_docs]
    documents, probes = [], []
    for number, passage in enumerate(chosen):
        doc_id = f"boolq-{number:03d}"
        documents.append(make_document(passage, doc_id, source=str(folder)))
        for q_number, (question, answer) in enumerate(passages[passage]):
            probes.append(Probe(doc_id, boolq_prompt(question), (answer,), "qa", f"{doc_id}:q{q_number}"))
    yes = sum(p.answers[0] == "yes" for p in probes)
    meta = {
        "source": str(folder),
        "seed": seed,
        "n_docs": len(documents),
        "requested_docs": n_docs,
        "passages_available": len(order),
        "yes_share": round(yes / len(probes), 3) if probes else 0.0,
    }
    return KnowledgeBenchmark("boolq", tuple(documents), tuple(probes), meta)


def _read_split(path: Path) -> list[tuple[str, str, str]]:
    """(question, passage, "yes"/"no") for every record of one split file, validated."""
    if not path.is_file():
        raise DocumentError(
            path,
            "BoolQ file not found; point data_dir at the shared data folder (it holds cl_benchmark/BoolQA)",
        )
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DocumentError(path, f"file is not valid UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DocumentError(path, f"invalid JSON ({exc.msg})", line=exc.lineno) from None
    if not isinstance(records, list):
        raise DocumentError(path, f"expected a JSON list of records, got {type(records).__name__}")
    out = []
    for index, record in enumerate(records):
        where = f"record {index}"
        if not isinstance(record, dict) or "sentence" not in record or "label" not in record:
            raise DocumentError(path, f"{where}: expected an object with 'sentence' and 'label'")
        label = _LABELS.get(str(record["label"]).strip().lower())
        if label is None:
            raise DocumentError(path, f"{where}: label must be True or False, got {record['label']!r}")
        sentence = str(record["sentence"])
        head, sep, passage = sentence.partition("\npassage:")
        if not sep or not head.startswith("question:"):
            raise DocumentError(path, f"{where}: expected 'question: ...\\npassage: ...' in 'sentence'")
        question, passage = head[len("question:") :].strip(), passage.strip()
        if not question or not passage:
            raise DocumentError(path, f"{where}: empty question or passage")
        out.append((question, passage, label))
    return out
