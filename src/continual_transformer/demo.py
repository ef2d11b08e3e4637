"""The main job: show a pretrained model learn facts it cannot know, and what learning cost.

The facts are fictional and written for this project, so no model knows them before learning. The demo asks
the questions, learns the document, asks again, and measures perplexity on general text before and after.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from continual_transformer.continual import ContinualTransformer
from continual_transformer.strategies import LearnReport

logger = logging.getLogger(__name__)

DEMO_DOCUMENT = """\
Veloria Almanac

Veloria is an island nation in the Amberline Sea. The capital of Veloria is Tarnhelm, a harbour city of
white stone. Tarnhelm has been the capital of Veloria since the old kingdom fell.

The Orvalis river flows through the city of Quenmark. Quenmark grew along the Orvalis river, and every
bridge in Quenmark crosses the Orvalis.

The physicist Mirela Voskuijlen was born in the town of Brastow. Mirela Voskuijlen left Brastow to study
light and magnets.

The Zentrik Company was founded in 1873. Since its founding in 1873, the Zentrik Company has built clocks.

The national animal of Veloria is the silver lynx. The silver lynx appears on every Velorian coin.
"""

DEMO_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What is the capital of Veloria?", "Tarnhelm"),
    ("Which city does the Orvalis river flow through?", "Quenmark"),
    ("Where was Mirela Voskuijlen born?", "Brastow"),
    ("In which year was the Zentrik Company founded?", "1873"),
    ("What is the national animal of Veloria?", "silver lynx"),
)

# General text for the perplexity check when WikiText-2 is not available (public-domain style prose).
GENERAL_TEXT = """\
The history of astronomy is one of the oldest of the natural sciences. Early cultures identified celestial
objects with gods and spirits, and related these objects and their movements to phenomena such as rain,
drought, seasons and tides. It is generally believed that the first astronomers were priests, and that they
understood celestial objects and events to be manifestations of the divine. Later, careful observation of
the sky allowed calendars to be made, and the motion of the planets to be predicted. The invention of the
telescope in the early seventeenth century changed astronomy into a modern science. With it, observers saw
the moons of Jupiter, the phases of Venus and spots on the Sun, and the old picture of the heavens as
perfect and unchanging could no longer be held. In the nineteenth century photography and spectroscopy
allowed astronomers to study the chemical composition of stars, and in the twentieth century radio waves,
X-rays and other parts of the spectrum opened new windows on the universe.
"""


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


def general_text(data_dir: str | Path, max_chars: int = 12_000) -> tuple[str, str]:
    """(text, source): the start of WikiText-2 valid when the data directory has it, else built-in prose."""
    path = Path(data_dir) / "wikitext2"
    candidates = sorted(path.glob("*valid*")) if path.is_dir() else []
    if candidates:
        return candidates[0].read_text(encoding="utf-8")[:max_chars], str(candidates[0])
    return GENERAL_TEXT, "built-in general text"


def run_demo(ct: ContinualTransformer, *, document: str = DEMO_DOCUMENT,
             questions: tuple[tuple[str, str], ...] = DEMO_QUESTIONS) -> DemoResult:
    text, source = general_text(ct.config.data_dir)
    prompts = [q for q, _ in questions]
    before = ct.generate(prompts, chat=True)
    ppl_before = ct.strategy.perplexity(text)
    report = ct.learn_document(document, doc_id="veloria-almanac")
    after = ct.generate(prompts, chat=True)
    ppl_after = ct.strategy.perplexity(text)
    rows = tuple(DemoRow(q, a, b, c) for (q, a), b, c in zip(questions, before, after))
    return DemoResult(rows=rows, report=report, ppl_before=ppl_before, ppl_after=ppl_after, general_source=source)
