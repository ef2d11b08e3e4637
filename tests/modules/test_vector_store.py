"""VectorStore: preallocation, growth, eviction, state; batched top-k search against a slow reference."""

from __future__ import annotations

import pytest
import torch

from continual_transformer.modules.vector_store import VectorStore


def test_store_is_preallocated_and_grows_geometrically():
    store = VectorStore(8, initial_capacity=4)
    buffer = store.keys.data_ptr()
    store.add(torch.randn(3, 8), torch.arange(3))
    assert store.size == 3 and store.allocated == 4 and store.keys.data_ptr() == buffer  # written in place
    store.add(torch.randn(1, 8), torch.tensor([3]))
    assert store.size == 4 and store.keys.data_ptr() == buffer
    store.add(torch.randn(6, 8), torch.arange(4, 10))
    assert store.size == 10 and store.allocated == 16  # doubled twice, not grown per key
    assert store.values[:10].tolist() == list(range(10))


def test_fifo_eviction_keeps_the_newest():
    store = VectorStore(4, capacity=5, initial_capacity=2, eviction="fifo")
    store.add(torch.randn(4, 4), torch.arange(4))
    store.add(torch.randn(3, 4), torch.arange(4, 7))
    assert store.size == 5 and store.allocated == 5
    assert sorted(store.values[:5].tolist()) == [2, 3, 4, 5, 6]
    store.add(torch.randn(9, 4), torch.arange(10, 19))  # more than the capacity: the last 5 stay
    assert sorted(store.values[:5].tolist()) == [14, 15, 16, 17, 18]


def test_lru_eviction_keeps_the_most_recently_retrieved():
    keys = torch.eye(4)
    store = VectorStore(4, capacity=4, eviction="lru")
    store.add(keys, torch.arange(4))
    store.search(keys[:2], k=1)  # keys 0 and 1 are used: 2 and 3 are now the least recently retrieved
    store.add(torch.randn(2, 4), torch.tensor([8, 9]))
    assert sorted(store.values[:4].tolist()) == [0, 1, 8, 9]


def test_store_state_round_trips():
    store = VectorStore(4, capacity=6, eviction="lru")
    store.add(torch.randn(5, 4), torch.arange(5))
    store.search(torch.randn(2, 4), 2)
    other = VectorStore(4, capacity=6, eviction="lru")
    other.load_state_dict(store.state_dict("s."), "s.")
    assert other.size == 5 and other.clock == store.clock
    for name, tensor in store.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor)


def _slow_search(
    keys: torch.Tensor, queries: torch.Tensor, k: int, metric: str
) -> list[list[tuple[float, int]]]:
    """The definition: every (query, key) distance in a Python loop, sorted, the k smallest."""
    out = []
    for query in queries:
        scored = []
        for row, key in enumerate(keys):
            a, b = query, key
            if metric == "cosine":
                a, b = torch.nn.functional.normalize(a, dim=0), torch.nn.functional.normalize(b, dim=0)
            scored.append((float(((a - b) ** 2).sum()), row))
        out.append(sorted(scored)[:k])
    return out


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_search_matches_a_slow_reference(metric, monkeypatch):
    torch.manual_seed(0)
    keys, queries = torch.randn(300, 12), torch.randn(9, 12)
    # a tiny block budget: the queries are searched in several blocks, as a large store would be
    monkeypatch.setattr("continual_transformer.modules.vector_store._BLOCK_ELEMENTS", 700)
    store = VectorStore(12, metric=metric, initial_capacity=8)
    for start in range(0, 300, 41):
        store.add(keys[start : start + 41], torch.arange(start, min(start + 41, 300)))
    dist, rows = store.search(queries, 7)
    for q, expected in enumerate(_slow_search(keys, queries, 7, metric)):
        assert rows[q].tolist() == [row for _, row in expected]
        assert torch.allclose(dist[q], torch.tensor([d for d, _ in expected]), atol=1e-4)
        assert store.values[rows[q]].tolist() == [row for _, row in expected]  # value i was stored with key i


def test_search_returns_at_most_size_neighbours_and_marks_use():
    store = VectorStore(3, eviction="lru")
    assert store.search(torch.randn(2, 3), 4)[0].shape == (2, 0)
    store.add(torch.eye(3), torch.arange(3))
    clock = store.clock
    dist, rows = store.search(torch.eye(3)[:1], 10)
    assert rows.shape == (1, 3) and rows[0, 0] == 0 and dist[0, 0] == pytest.approx(0.0)
    assert store.clock == clock + 1 and int(store.last_used[0]) == clock
    store.search(torch.eye(3)[:1], 1, mark_used=False)
    assert store.clock == clock + 1


def test_keep_compacts_in_order():
    store = VectorStore(2)
    store.add(torch.randn(5, 2), torch.arange(5))
    store.keep(torch.tensor([True, False, True, False, True]))
    assert store.size == 3 and store.values[:3].tolist() == [0, 2, 4]


def test_bad_shapes_are_refused():
    store = VectorStore(4)
    with pytest.raises(ValueError, match=r"keys must be \(n, 4\)"):
        store.add(torch.randn(2, 3), torch.arange(2))
    with pytest.raises(ValueError, match="values must be"):
        store.add(torch.randn(2, 4), torch.arange(3))
