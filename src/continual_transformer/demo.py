"""The main job, and strategies compared side by side on your own document.

:func:`compare_strategies` runs one document (or several) and question-answer pairs through chosen
strategies on one loaded model, with the knowledge benchmark's own harness
(:func:`~continual_transformer.evaluation.knowledge.run_knowledge_bench`): accuracy, learn time, answer time,
tokens learned, and what learning cost (general-text perplexity change, general facts the base model knew
that are kept). :func:`run_demo` is that comparison on a short document of fictional facts, with the answers
before and after the recommended strategy learned it (``ctt demo``, ``make demo``).

Importing this module imports no torch.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from continual_transformer.errors import DocumentError

if TYPE_CHECKING:
    from continual_transformer.backbone import Backbone
    from continual_transformer.config import Config
    from continual_transformer.documents import Document

RECOMMENDED_STRATEGY = "retrieval"
"""The strategy the project recommends, in one place (``ctt demo``, ``ctt config init``, the menu and the
help read it). Measured (README, H200 and H100 knowledge runs, 50 novel-fact documents): ``retrieval``
answers as well as the oracle (0.600 acquisition, 1.02x the oracle) at +0.1 % general perplexity and no
known fact lost; every strategy that changes weights stays below 0.21 and costs +5 % to +535 % perplexity."""

DEMO_STRATEGIES: tuple[str, ...] = (RECOMMENDED_STRATEGY, "knowledge_store", "finetune", "lora")
"""What ``ctt demo`` shows the forgetting price of, beside the recommended one (a few minutes on 2 CPU
cores; ``ttt`` and ``memory_layer`` take longer there: ``ctt demo --strategies retrieval,ttt``)."""

DEMO_DOCUMENT = """\
Veloria Almanac

Veloria is an island nation in the Amberline Sea. The capital of Veloria is Tarnhelm, a harbour city of
white stone. Tarnhelm has been the capital of Veloria since the old kingdom fell.

The tallest mountain in Veloria is Mount Oskarra. Snow covers Mount Oskarra all year, and climbers call
Oskarra the roof of Veloria.

The physicist Mirela Voskuijlen was born in Brastow, a mining village in the northern hills. Mirela
Voskuijlen left Brastow to study light and magnets.

The Zentrik Company was founded in 1873. Since its founding in 1873, the Zentrik Company has built clocks.

The national animal of Veloria is the silver lynx. The silver lynx appears on every Velorian coin.
"""

DEMO_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What is the capital of Veloria?", "Tarnhelm"),
    ("What is the tallest mountain in Veloria?", "Oskarra"),
    ("Where was Mirela Voskuijlen born?", "Brastow"),
    ("In which year was the Zentrik Company founded?", "1873"),
    ("What is the national animal of Veloria?", "silver lynx"),
)

BEFORE = "none"
"""The row that answers before anything is learned (the base model)."""


def contains_answer(text: str, answer: str) -> bool:
    """Case-insensitive whole-word match of the answer in the text."""
    return re.search(rf"(?<!\w){re.escape(answer.lower())}(?!\w)", text.lower()) is not None


# -- question-answer pairs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class QAPair:
    question: str
    answers: tuple[str, ...]
    """The canonical answer first, then acceptable alternatives."""


def read_qa(path: str | Path) -> list[QAPair]:
    """QA pairs from JSONL, one ``{"question": ..., "answer": "..." or [...]}`` per line (``prompt`` is
    accepted for ``question``). Every error names the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise DocumentError(path, "no such file")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DocumentError(path, f"invalid JSON ({exc.msg})", line=number) from exc
        if not isinstance(record, dict):
            raise DocumentError(path, "expected an object with question and answer", line=number)
        question = record.get("question", record.get("prompt"))
        answer = record.get("answer", record.get("answers"))
        answers = (answer,) if isinstance(answer, str) else tuple(answer or ())
        if not isinstance(question, str) or not question.strip():
            raise DocumentError(path, "missing question", line=number)
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise DocumentError(path, "missing answer (a string or a list of strings)", line=number)
        pairs.append(QAPair(question.strip(), answers))
    if not pairs:
        raise DocumentError(path, "no question-answer pairs")
    return pairs


# -- comparison ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class CompareSettings:
    ppl_tokens: int = 2048
    """Tokens of general text (WikiText-2 valid, else built-in prose) scored for perplexity."""
    known_facts: int = 16
    """General-knowledge probes asked; those the base model answers right count as known facts."""
    max_new_tokens: int = 24
    """Tokens generated per answer."""
    latency_prompts: int = 2
    """Questions answered one at a time for the answer-time column."""


@dataclass(frozen=True, kw_only=True)
class CompareRow:
    strategy: str
    accuracy: float
    """Share of the questions answered right (the answer appears in the reply)."""
    learn_seconds: float
    answer_seconds: float
    """Median seconds to answer one question."""
    tokens_learned: int
    ppl_change: float
    """Relative change of general-text perplexity after learning."""
    known_facts_kept: int
    known_facts: int
    answers: tuple[str, ...]
    """The replies to the first questions (up to six, what the harness keeps as examples), in order."""

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class Comparison:
    rows: tuple[CompareRow, ...]
    questions: tuple[QAPair, ...]
    results: dict[str, Any]
    """The knowledge harness's full results document (what ``results.json`` holds)."""
    plots: tuple[Path, ...] = ()

    def row(self, strategy: str) -> CompareRow:
        return next(r for r in self.rows if r.strategy == strategy)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [r.to_dict() for r in self.rows],
            "questions": [{"question": q.question, "answers": list(q.answers)} for q in self.questions],
            "plots": [str(p) for p in self.plots],
            "model": self.results["meta"].get("model"),
        }


def _benchmark_dir(documents: Sequence[Document], qa: Sequence[QAPair], directory: Path) -> Path:
    """The documents and questions as a custom knowledge benchmark (``docs/benchmark-format.md``). Every
    question belongs to the first document: all documents are learned before any question is asked."""
    with open(directory / "documents.jsonl", "w", encoding="utf-8") as handle:
        for doc in documents:
            handle.write(json.dumps({"id": doc.id, "text": doc.text}) + "\n")
    with open(directory / "probes.jsonl", "w", encoding="utf-8") as handle:
        for pair in qa:
            record = {"doc_id": documents[0].id, "prompt": pair.question, "answer": list(pair.answers)}
            handle.write(json.dumps({**record, "kind": "qa"}) + "\n")
    return directory


def compare_strategies(
    backbone: Backbone,
    config: Config,
    documents: Sequence[Document],
    qa: Sequence[QAPair],
    strategies: Sequence[str],
    settings: CompareSettings = CompareSettings(),
    *,
    out: str | Path | None = None,
    on_result: Callable[[str, dict[str, Any]], None] | None = None,
) -> Comparison:
    """Each strategy (a name, or a spec with settings: ``ttt:objective=context_distill``) learns
    ``documents`` from the base model, then answers ``qa``; the backbone is restored between strategies.
    ``none`` is added first (the answers before learning). With ``out`` the results and the harness's
    plots (accuracy matrix, acquisition vs forgetting) are written there."""
    from continual_transformer.evaluation.knowledge import KnowledgeBenchConfig, run_knowledge_bench
    from continual_transformer.evaluation.report import knowledge_plots, write_json

    if not documents:
        raise DocumentError("<documents>", "nothing to learn")
    names = [BEFORE] + [s for s in dict.fromkeys(strategies) if s != BEFORE]
    with tempfile.TemporaryDirectory(prefix="ctt-compare-") as tmp:
        bench = KnowledgeBenchConfig(
            benchmark=str(_benchmark_dir(documents, qa, Path(tmp))),
            docs=len(documents),
            stream_batches=1,
            ppl_tokens=settings.ppl_tokens,
            known_facts=settings.known_facts,
            max_new_tokens=settings.max_new_tokens,
            latency_prompts=settings.latency_prompts,
        )
        hook = (lambda name, row, _results: on_result(name, row)) if on_result else None
        results = run_knowledge_bench(backbone, config, names, bench, on_result=hook)
    kept_of = results["benchmark"]["known_facts_kept"]
    rows = []
    for name, row in results["strategies"].items():
        rows.append(
            CompareRow(
                strategy=name,
                accuracy=float(row["final_contains"]),
                learn_seconds=float(row["learn_seconds"]),
                answer_seconds=float(row["answer_latency_s"]),
                tokens_learned=int(row["learn_tokens"]),
                ppl_change=float(row["ppl_change"]),
                known_facts_kept=round(float(row["known_fact_accuracy_after"]) * kept_of) if kept_of else 0,
                known_facts=kept_of,
                answers=tuple(e["prediction"] for e in row["examples"]),
            )
        )
    plots: tuple[Path, ...] = ()
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "results.json", results)
        plots = tuple(knowledge_plots(results, out)) + (comparison_plot(rows, out / "comparison.png"),)
    return Comparison(rows=tuple(rows), questions=tuple(qa), results=results, plots=plots)


def comparison_plot(rows: Sequence[CompareRow], path: Path) -> Path:
    """Accuracy beside general-perplexity change and known facts kept, one bar group per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.strategy for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = (
        ("accuracy on your questions", [r.accuracy for r in rows], "tab:green"),
        ("general perplexity change (%)", [100 * r.ppl_change for r in rows], "tab:red"),
        (
            "known facts kept (share)",
            [r.known_facts_kept / r.known_facts if r.known_facts else 0.0 for r in rows],
            "tab:blue",
        ),
    )
    for ax, (title, values, color) in zip(axes, panels):
        ax.bar(names, values, color=color)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=40, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the demo ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoRow:
    question: str
    expected: str
    before: str
    after: str

    @property
    def correct_before(self) -> bool:
        return contains_answer(self.before, self.expected)

    @property
    def correct_after(self) -> bool:
        return contains_answer(self.after, self.expected)


@dataclass(frozen=True)
class DemoResult:
    strategy: str
    """The recommended strategy, whose answers are shown."""
    rows: tuple[DemoRow, ...]
    comparison: Comparison
    """Every strategy on the same document: the forgetting price of each."""

    @property
    def accuracy_before(self) -> float:
        return sum(r.correct_before for r in self.rows) / len(self.rows)

    @property
    def accuracy_after(self) -> float:
        return sum(r.correct_after for r in self.rows) / len(self.rows)


def run_demo(
    backbone: Backbone,
    config: Config,
    *,
    strategies: Sequence[str] = DEMO_STRATEGIES,
    recommended: str = RECOMMENDED_STRATEGY,
    settings: CompareSettings = CompareSettings(),
    out: str | Path | None = None,
    on_result: Callable[[str, dict[str, Any]], None] | None = None,
) -> DemoResult:
    """The demo document learned by every strategy in turn (the recommended one first), its questions
    asked before and after."""
    from continual_transformer.documents import make_document

    documents = [make_document(DEMO_DOCUMENT, "veloria-almanac")]
    qa = [QAPair(q, (a,)) for q, a in DEMO_QUESTIONS]
    names = [recommended] + [s for s in strategies if s != recommended]
    comparison = compare_strategies(
        backbone, config, documents, qa, names, settings, out=out, on_result=on_result
    )
    before, after = comparison.row(BEFORE), comparison.row(recommended)
    rows = tuple(DemoRow(q, a, b, c) for (q, a), b, c in zip(DEMO_QUESTIONS, before.answers, after.answers))
    return DemoResult(strategy=recommended, rows=rows, comparison=comparison)
