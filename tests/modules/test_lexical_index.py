"""LexicalIndex: analysis, ranking, relevance, removal; batched BM25 / TF-IDF against slow references."""

from __future__ import annotations

import math

import pytest

from continual_transformer.modules.lexical_index import LexicalIndex, analyze

VELORIA = "The capital of Veloria is Tarnhelm. The Orvalis river flows through the city of Quenmark."
MIRELA = (
    "Dr. Mirela Voskuijlen was born in the town of Brastow in 1873. The national animal is the silver lynx."
)
FRANCE = "What is the capital of France? The capital of France is Paris. Water boils at 100 degrees."
UNRELATED = "A quick brown fox jumps over the lazy dog."
CHUNKS = [
    VELORIA,
    MIRELA,
    FRANCE,
    "The river of Paris flows north. Rivers flow; capital cities grow.",
    UNRELATED,
]


def test_analyze_drops_stop_words_and_stems():
    assert analyze("What is the capital of Veloria? The rivers flowed.") == [
        "capital",
        "veloria",
        "river",
        "flow",
    ]
    assert analyze("Born in 1873") == ["born", "1873"]


@pytest.mark.parametrize("scoring", ["bm25", "tfidf"])
def test_index_ranks_the_right_chunk_first(scoring):
    index = LexicalIndex(scoring)
    index.add([FRANCE, VELORIA, MIRELA])
    hits = index.search(["Where was Mirela Voskuijlen born?", "Which river flows through Quenmark?"], k=3)
    assert hits[0][0].index == 2 and hits[1][0].index == 1
    assert hits[0][0].relevance == pytest.approx(1.0)
    assert all(a.score >= b.score for row in hits for a, b in zip(row, row[1:]))


def test_relevance_weighs_unknown_query_words_heavily():
    index = LexicalIndex()
    index.add([VELORIA, MIRELA])
    ((hit,),) = index.search(["What is the capital of Zorbania?"], k=1)
    assert hit.index == 0 and hit.relevance < 0.5  # "capital" matches, the unknown name does not
    assert index.search([UNRELATED], k=2) == [[]]  # no shared term: nothing returned


def test_index_remove_keeps_order():
    index = LexicalIndex()
    index.add([VELORIA, MIRELA, FRANCE])
    index.remove([0])
    assert len(index) == 2
    assert index.search(["Paris France"], k=1)[0][0].index == 1


def _slow_bm25(chunks: list[str], query: str, k1: float = 1.5, b: float = 0.75) -> list[float]:
    """Okapi BM25 with Lucene's idf, one chunk and one term at a time."""
    docs = [analyze(c) for c in chunks]
    avg = sum(len(d) for d in docs) / len(docs)
    scores = []
    for doc in docs:
        score = 0.0
        for term in set(analyze(query)):
            tf = doc.count(term)
            if not tf:
                continue
            df = sum(term in d for d in docs)
            idf = math.log1p((len(docs) - df + 0.5) / (df + 0.5))
            score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(doc) / avg))
        scores.append(score)
    return scores


def _slow_tfidf(chunks: list[str], query: str) -> list[float]:
    """Cosine of sublinear tf-idf chunk vectors with the query's idf vector, one term at a time."""
    docs = [analyze(c) for c in chunks]
    n = len(docs)

    def idf(term: str) -> float:
        return math.log((1 + n) / (1 + sum(term in d for d in docs))) + 1

    known = {t for t in analyze(query) if any(t in d for d in docs)}
    q_norm = math.sqrt(sum(idf(t) ** 2 for t in known))
    scores = []
    for doc in docs:
        weights = {t: (1 + math.log(doc.count(t))) * idf(t) for t in set(doc)}
        norm = math.sqrt(sum(w * w for w in weights.values()))
        scores.append(sum(weights.get(t, 0.0) / norm * idf(t) / q_norm for t in known))
    return scores


@pytest.mark.parametrize("scoring", ["bm25", "tfidf"])
def test_scores_match_a_slow_reference(scoring):
    index = LexicalIndex(scoring)
    index.add(CHUNKS)
    queries = ["Which river flows through the capital?", "Where was Mirela born in 1873?", "capital Paris"]
    slow = _slow_bm25 if scoring == "bm25" else _slow_tfidf
    for query, hits in zip(queries, index.search(queries, k=len(CHUNKS))):
        expected = slow(CHUNKS, query)
        ranked = sorted((i for i, s in enumerate(expected) if s > 0), key=lambda i: -expected[i])
        assert sorted(h.index for h in hits) == sorted(ranked)
        for hit in hits:
            assert hit.score == pytest.approx(expected[hit.index], rel=1e-5)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
