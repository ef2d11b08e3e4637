"""MemoryStore: eviction, ranking, duplicates and state; batched retrieval against a slow reference."""

from __future__ import annotations

import pytest
import torch

from continual_transformer.modules.memory_store import MemoryStore


def test_store_evicts_the_least_important_memory():
    store = MemoryStore(4, 4, capacity=2)
    store.add(torch.tensor([1.0, 0, 0, 0]), torch.ones(4), gate_logit=0.0, importance=0.5)
    store.add(torch.tensor([0, 1.0, 0, 0]), torch.ones(4), gate_logit=0.0, importance=0.1)
    slot, evicted = store.add(torch.tensor([0, 0, 1.0, 0]), torch.ones(4), gate_logit=0.0, importance=0.3)
    assert evicted == 1 and slot == 1 and store.size == 2
    assert sorted(store.importance[:2].tolist()) == pytest.approx([0.3, 0.5])
    store.reinforce(torch.tensor([1, 1]), 0.5)  # used twice: now the most important
    _, evicted = store.add(torch.tensor([0, 0, 0, 1.0]), torch.ones(4), gate_logit=0.0, importance=0.2)
    assert evicted == 0 and store.uses[1] == 2


def test_store_ranks_by_similarity_times_importance_above_a_threshold():
    store = MemoryStore(2, 2, capacity=4)
    store.add(torch.tensor([1.0, 0.0]), torch.zeros(2), gate_logit=0.0, importance=0.1)
    store.add(torch.tensor([0.8, 0.6]), torch.zeros(2), gate_logit=0.0, importance=1.0)
    store.add(torch.tensor([0.0, 1.0]), torch.zeros(2), gate_logit=0.0, importance=5.0)
    slots, sims, valid = store.retrieve(torch.tensor([[1.0, 0.0]]), k=3, min_similarity=0.5)
    assert slots[0, :2].tolist() == [
        1,
        0,
    ]  # 0.8 x 1.0 beats 1.0 x 0.1; the orthogonal memory fails the threshold
    assert valid[0].tolist() == [True, True, False]
    assert sims[0, 0] == pytest.approx(0.8)


def test_store_finds_duplicates():
    store = MemoryStore(2, 2, capacity=4)
    store.add(torch.tensor([1.0, 0.0]), torch.zeros(2), gate_logit=0.0, importance=1.0)
    best, slot = store.duplicates(torch.tensor([[0.99, 0.14], [0.0, 1.0]]), 0.95)
    assert best[0] > 0.95 > best[1] and slot[0] == 0


def test_retrieve_matches_a_slow_reference():
    torch.manual_seed(0)
    store = MemoryStore(6, 3, capacity=40)
    for _ in range(30):
        store.add(torch.randn(6), torch.randn(3), gate_logit=0.0, importance=float(torch.rand(())) + 0.1)
    queries = torch.nn.functional.normalize(torch.randn(5, 6), dim=-1)
    slots, sims, valid = store.retrieve(queries, k=4, min_similarity=0.1)
    for q, query in enumerate(queries):  # one memory at a time: similarity, threshold, score, best four
        ranked = []
        for slot in range(store.size):
            sim = float(query @ store.keys[slot])
            if sim >= 0.1:
                ranked.append((sim * float(store.importance[slot]), slot, sim))
        ranked.sort(reverse=True)
        expected = ranked[:4]
        n = len(expected)
        assert valid[q].tolist() == [True] * n + [False] * (4 - n)
        assert slots[q, :n].tolist() == [slot for _, slot, _ in expected]
        assert torch.allclose(sims[q, :n], torch.tensor([s for _, _, s in expected]), atol=1e-6)


def test_state_round_trips_and_refuses_too_many():
    store = MemoryStore(2, 2, capacity=3)
    store.add(torch.tensor([1.0, 0.0]), torch.ones(2), gate_logit=0.3, importance=0.5)
    other = MemoryStore(2, 2, capacity=3)
    other.load_state_dict(store.state_dict("m."), "m.")
    assert other.size == 1 and other.clock == store.clock
    assert all(torch.equal(other.state_dict()[k], v) for k, v in store.state_dict().items())
    small = MemoryStore(2, 2, capacity=1)
    store.add(torch.tensor([0.0, 1.0]), torch.ones(2), gate_logit=0.0, importance=0.5)
    with pytest.raises(ValueError, match="exceed the capacity"):
        small.load_state_dict(store.state_dict())
