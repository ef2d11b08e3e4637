"""Metrics as pure functions, tested against hand-computed values.

Continual-learning metrics take an accuracy matrix ``R`` of shape (T, K): ``R[t, k]`` is the accuracy on
experience (task or document batch) ``k`` after training on experiences ``0..t``, as in GEM (Lopez-Paz &
Ranzato, 2017) and Avalanche. ``T`` may equal ``K`` (the usual square case).

Answer metrics follow SQuAD's normalisation (lower case, no punctuation, no articles, single spaces).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, strip punctuation and articles, collapse whitespace (SQuAD normalisation)."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def first_answer_span(text: str) -> str:
    """The first answer span of a generation: up to the first line break or sentence end."""
    text = text.strip()
    line = text.split("\n", 1)[0]
    match = re.search(r"(?<!\d)[.!?](\s|$)", line)
    return line[: match.start()] if match else line


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when the normalised first answer span equals one of the normalised answers."""
    span = normalize_answer(first_answer_span(prediction))
    return float(any(span == normalize_answer(a) for a in _as_list(answers)))


def contains(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when a normalised answer occurs, as whole words, in the normalised prediction."""
    text = f" {normalize_answer(prediction)} "
    return float(any(f" {normalize_answer(a)} " in text for a in _as_list(answers) if normalize_answer(a)))


def token_f1(prediction: str, answers: str | Sequence[str]) -> float:
    """Best token-overlap F1 between the first answer span and any answer (SQuAD)."""
    pred = normalize_answer(first_answer_span(prediction)).split()
    best = 0.0
    for answer in _as_list(answers):
        gold = normalize_answer(answer).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def _as_list(answers: str | Sequence[str]) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


# ------------------------------------------------------------------------------------------------------------
# Accuracy-matrix metrics


def _matrix(R: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] == 0 or R.shape[0] > R.shape[1]:
        raise ValueError(f"accuracy matrix must be (T, K) with 1 <= T <= K, got shape {R.shape}")
    return R


def average_accuracy(R) -> float:
    """Mean accuracy over experiences seen so far, after the last one: mean_k<=T-1 R[T-1, k]."""
    R = _matrix(R)
    T = R.shape[0]
    return float(R[T - 1, :T].mean())


def backward_transfer(R) -> float:
    """BWT = mean over k < T-1 of R[T-1, k] - R[k, k] (negative means forgetting). 0 for one experience."""
    R = _matrix(R)
    T = R.shape[0]
    if T < 2:
        return 0.0
    return float(np.mean([R[T - 1, k] - R[k, k] for k in range(T - 1)]))


def forward_transfer(R, baseline: Sequence[float]) -> float:
    """FWT = mean over k >= 1 of R[k-1, k] - b[k], with ``b`` the accuracy of the untrained model on each
    experience."""
    R = _matrix(R)
    b = np.asarray(baseline, dtype=float)
    T = R.shape[0]
    if T < 2:
        return 0.0
    return float(np.mean([R[k - 1, k] - b[k] for k in range(1, T)]))


def forgetting(R) -> float:
    """Average forgetting: mean over k < T-1 of max_{t<T-1} R[t, k] - R[T-1, k] (Chaudhry et al., 2018)."""
    R = _matrix(R)
    T = R.shape[0]
    if T < 2:
        return 0.0
    return float(np.mean([R[k : T - 1, k].max() - R[T - 1, k] for k in range(T - 1)]))


def forgetting_ratio(before: float, after: float) -> float:
    """(before - after) / before: the share of what was known that is lost (0 when nothing was known)."""
    return 0.0 if before <= 0 else (before - after) / before
