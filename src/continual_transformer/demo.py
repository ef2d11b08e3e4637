"""The main job: show a pretrained model learn facts it cannot know, and what learning cost.

The facts are fictional and written for this project, so no model knows them before learning. The demo asks
the questions, learns the document, asks again, and measures perplexity on general text before and after.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from continual_transformer.continual import ContinualTransformer
from continual_transformer.evaluation.general import general_text
from continual_transformer.strategies import LearnReport

logger = logging.getLogger(__name__)

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
    rows: tuple[DemoRow, ...]
    report: LearnReport
    ppl_before: float
    ppl_after: float
    general_source: str

    @property
    def accuracy_before(self) -> float:
        return sum(r.correct_before for r in self.rows) / len(self.rows)

    @property
    def accuracy_after(self) -> float:
        return sum(r.correct_after for r in self.rows) / len(self.rows)


def contains_answer(text: str, answer: str) -> bool:
    """Case-insensitive whole-word match of the answer in the text."""
    return re.search(rf"(?<!\w){re.escape(answer.lower())}(?!\w)", text.lower()) is not None


def run_demo(
    ct: ContinualTransformer,
    *,
    document: str = DEMO_DOCUMENT,
    questions: tuple[tuple[str, str], ...] = DEMO_QUESTIONS,
) -> DemoResult:
    text, source = general_text(ct.config.data_dir, max_chars=12_000)
    prompts = [q for q, _ in questions]
    before = ct.generate(prompts, chat=True)
    ppl_before = ct.strategy.perplexity(text)
    report = ct.learn_document(document, doc_id="veloria-almanac")
    after = ct.generate(prompts, chat=True)
    ppl_after = ct.strategy.perplexity(text)
    rows = tuple(DemoRow(q, a, b, c) for (q, a), b, c in zip(questions, before, after))
    return DemoResult(
        rows=rows, report=report, ppl_before=ppl_before, ppl_after=ppl_after, general_source=source
    )
