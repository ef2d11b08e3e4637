"""kNN-LM distribution and mixture (modules.logits) against slow references; the token bias."""

from __future__ import annotations

import math

import pytest
import torch

from continual_transformer.modules.logits import (
    TokenBiasProcessor,
    knn_distribution,
    mix_log_probs,
    token_bias,
)
from continual_transformer.modules.vector_store import VectorStore


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_knn_distribution_matches_a_slow_reference(metric):
    torch.manual_seed(0)
    n, dim, vocab, k, temperature = 200, 16, 30, 8, 0.7
    keys, values = torch.randn(n, dim), torch.randint(0, vocab, (n,))
    queries = torch.randn(5, dim)
    store = VectorStore(dim, metric=metric, initial_capacity=16)
    for start in range(0, n, 37):
        store.add(keys[start : start + 37], values[start : start + 37])
    dist, rows = store.search(queries, k)
    fast = knn_distribution(dist, store.values[rows], vocab, temperature)

    for q, query in enumerate(queries):  # the definition, one key and one token at a time
        scored = []
        for key, value in zip(keys, values):
            a, b = (
                (torch.nn.functional.normalize(query, dim=0), torch.nn.functional.normalize(key, dim=0))
                if metric == "cosine"
                else (query, key)
            )
            scored.append((float(((a - b) ** 2).sum()), int(value)))
        nearest = sorted(scored)[:k]
        weights = torch.softmax(torch.tensor([-d / temperature for d, _ in nearest]), 0)
        expected = torch.zeros(vocab)
        for w, (_, token) in zip(weights, nearest):
            expected[token] += w
        assert torch.allclose(fast[q], expected, atol=1e-5)
        assert torch.allclose(dist[q], torch.tensor([d for d, _ in nearest]), atol=1e-4)


def test_mixture_with_lambda_zero_is_the_model():
    logits = torch.randn(3, 10)
    p_knn = torch.softmax(torch.randn(3, 10), -1)
    assert torch.allclose(mix_log_probs(logits, p_knn, 0.0), torch.log_softmax(logits, -1))
    mixed = mix_log_probs(logits, p_knn, 0.25).exp()
    assert torch.allclose(mixed, 0.75 * torch.softmax(logits, -1) + 0.25 * p_knn, atol=1e-6)


def test_mixture_matches_a_slow_reference_per_row():
    torch.manual_seed(1)
    logits, p_knn = torch.randn(4, 7), torch.softmax(torch.randn(4, 7), -1)
    lam = torch.tensor([0.0, 0.25, 0.5, 0.9])
    fast = mix_log_probs(logits, p_knn, lam)
    for row in range(4):  # one probability at a time
        z = sum(math.exp(float(x)) for x in logits[row])
        for token in range(7):
            p = (1 - float(lam[row])) * math.exp(float(logits[row, token])) / z + float(lam[row]) * float(
                p_knn[row, token]
            )
            assert float(fast[row, token]) == pytest.approx(math.log(p), abs=1e-5)


def test_token_bias_and_its_processor():
    bias = token_bias([[1, 3, 3, 99], []], 5, 2.0)
    assert bias.tolist() == [[0, 2, 0, 2, 0], [0, 0, 0, 0, 0]]  # ids past the vocabulary ignored
    scores = torch.zeros(2, 6)
    out = TokenBiasProcessor(bias)(torch.zeros(2, 1, dtype=torch.long), scores)
    assert out[:, :5].tolist() == bias.tolist() and not out[:, 5].any() and not scores.any()
