"""A lexical index over word terms: BM25 (Okapi, Lucene's non-negative idf) or TF-IDF cosine, on sparse
matrices.

Why not ``rank_bm25``: its ``get_scores`` walks a Python list of per-document dicts for every query term,
which is seconds per query at 100k chunks, and its idf turns negative (then patched by an ``epsilon`` rule)
when a term is in more than half of the documents — including every term of a one-document index. Here the
index is a CSR matrix of term counts; weights are computed once per change (vectorised over the non-zeros) and
a query is one sparse matrix product.

Besides the ranking score, :meth:`LexicalIndex.search` returns a *relevance* in ``[0, 1]`` for every hit: the
idf-weighted fraction of the query's content words that the chunk contains. Unlike a raw BM25 score it does
not depend on the size of the corpus or the length of the query, so one threshold can gate "is this question
about anything I have read?" (a query word never seen in the index carries the largest idf, so a question
about an unknown name is not relevant to a chunk that only shares its generic words).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import sparse

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[^\W_]+", re.UNICODE)

# Function words carry no topic; leaving them out keeps "What is the capital of X?" from matching every chunk.
STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most
    my myself no nor not now of off on once only or other our ours ourselves out over own same she
    should so some such than that the their theirs them themselves then there these they this those
    through to too under until up very was we were what when where which while who whom why will with
    would you your yours yourself yourselves also s t""".split()
)


@lru_cache(maxsize=1 << 17)
def _stem(word: str) -> str:
    """A deliberately light suffix stripper: plurals and -ed/-ing forms meet their stem (flowed -> flow)."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("sses", "shes", "ches", "xes", "zes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    if len(word) > 5 and word.endswith("ing"):
        return word[:-3]
    if len(word) > 4 and word.endswith("ed") and not word.endswith("eed"):
        return word[:-2]
    return word


def analyze(text: str) -> list[str]:
    """Lower-cased, stemmed word terms of ``text`` without stop words (digits are words: years matter)."""
    return [_stem(w) for w in _WORD.findall(text.lower()) if w not in STOP_WORDS]


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk."""

    index: int
    """Position of the chunk in the index (insertion order, after removals)."""
    score: float
    """Ranking score (BM25, or TF-IDF cosine)."""
    relevance: float
    """Idf-weighted fraction of the query's terms found in the chunk, in ``[0, 1]``."""


class LexicalIndex:
    """Chunks as bags of word terms; ``scoring`` is ``bm25`` or ``tfidf`` (cosine of sublinear tf-idf
    vectors)."""

    def __init__(self, scoring: str = "bm25", *, k1: float = 1.5, b: float = 0.75) -> None:
        if scoring not in ("bm25", "tfidf"):
            raise ValueError(f"scoring must be bm25 or tfidf, got {scoring!r}")
        self.scoring = scoring
        self.k1 = k1
        self.b = b
        self.vocab: dict[str, int] = {}
        self._terms: list[np.ndarray] = []  # per chunk: sorted unique term ids
        self._counts: list[np.ndarray] = []  # per chunk: their counts
        self._dirty = True
        self._weights: sparse.csc_matrix | None = None
        self._presence: sparse.csr_matrix | None = None
        self._idf: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._terms)

    # -- building -------------------------------------------------------------------------------------------
    def add(self, texts: Iterable[str]) -> None:
        """Append chunks (their positions continue from ``len(self)``)."""
        vocab = self.vocab
        for text in texts:
            terms = [vocab.setdefault(term, len(vocab)) for term in analyze(text)]
            ids, counts = np.unique(np.array(terms, dtype=np.int64), return_counts=True)
            self._terms.append(ids)
            self._counts.append(counts.astype(np.float32))
        self._dirty = True

    def remove(self, indices: Iterable[int]) -> None:
        """Drop chunks; later chunks move up (positions stay in insertion order)."""
        drop = set(indices)
        self._terms = [t for i, t in enumerate(self._terms) if i not in drop]
        self._counts = [c for i, c in enumerate(self._counts) if i not in drop]
        self._dirty = True

    def clear(self) -> None:
        self.__init__(self.scoring, k1=self.k1, b=self.b)  # type: ignore[misc]

    def _build(self) -> None:
        n_docs, n_terms = len(self._terms), max(len(self.vocab), 1)
        lengths = np.fromiter((len(t) for t in self._terms), dtype=np.int64, count=n_docs)
        indptr = np.zeros(n_docs + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        indices = np.concatenate(self._terms) if n_docs else np.zeros(0, dtype=np.int64)
        tf = np.concatenate(self._counts) if n_docs else np.zeros(0, dtype=np.float32)
        rows = np.repeat(np.arange(n_docs), lengths)
        df = np.bincount(indices, minlength=n_terms).astype(np.float64)
        # BM25 idf (Lucene form, never negative); also the weight of each term in the relevance fraction.
        self._idf = np.log1p((n_docs - df + 0.5) / (df + 0.5))
        self._unknown_idf = math.log1p((n_docs + 0.5) / 0.5)
        if self.scoring == "bm25":
            doc_len = np.zeros(n_docs, dtype=np.float64)
            np.add.at(doc_len, rows, tf)
            avg = float(doc_len.mean()) if n_docs else 1.0
            norm = self.k1 * (1 - self.b + self.b * doc_len[rows] / max(avg, 1e-9))
            data = self._idf[indices] * tf * (self.k1 + 1) / (tf + norm)
        else:
            idf = np.log((1 + n_docs) / (1 + df)) + 1
            data = (1 + np.log(tf)) * idf[indices]
            row_norm = np.zeros(n_docs, dtype=np.float64)
            np.add.at(row_norm, rows, data**2)
            data = data / np.sqrt(np.maximum(row_norm[rows], 1e-12))
            self._tfidf_idf = idf
        shape = (n_docs, n_terms)
        self._weights = sparse.csr_matrix((data.astype(np.float32), indices, indptr), shape=shape).tocsc()
        self._presence = sparse.csr_matrix((np.ones_like(tf), indices, indptr), shape=shape)
        self._dirty = False

    # -- searching ------------------------------------------------------------------------------------------
    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """The best ``k`` chunks of each query (fewer when the index is smaller), best first.

        Chunks that share no term with the query are never returned. Each query costs one column slice of the
        (CSC) weight matrix and a sum over the chunks that contain its terms.
        """
        if not self._terms or not queries:
            return [[] for _ in queries]
        if self._dirty:
            self._build()
        assert self._weights is not None
        results: list[list[Hit]] = []
        for query in queries:
            terms = set(analyze(query))
            known = np.array(sorted(self.vocab[t] for t in terms if t in self.vocab), dtype=np.int64)
            if len(known) == 0:
                results.append([])
                continue
            columns = self._weights[:, known]
            if self.scoring == "bm25":
                scores = np.asarray(columns.sum(axis=1)).ravel()
            else:
                weights = self._tfidf_idf[known]
                scores = columns @ (weights / np.linalg.norm(weights)).astype(np.float32)
            results.append(self._top(scores, known, len(terms) - len(known), k))
        return results

    def _top(self, scores: np.ndarray, known: np.ndarray, unknown_count: int, k: int) -> list[Hit]:
        if len(known) == 0:
            return []
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        top = top[scores[top] > 0]
        if len(top) == 0:
            return []
        idf = self._idf[known]  # type: ignore[index]
        total = float(idf.sum()) + unknown_count * self._unknown_idf
        covered = np.asarray(self._presence[top][:, known] @ idf).ravel()  # type: ignore[index]
        return [Hit(int(i), float(scores[i]), float(c / total)) for i, c in zip(top, covered)]
