"""The product-key memory: batched lookup against the slow reference, k-means, sparse values and training."""

from __future__ import annotations

import pytest
import torch

from continual_transformer.modules.product_key_memory import ProductKeyMemory, kmeans, reference_read

D, V = 12, 6


def fitted_memory(*, n_keys: int = 8, heads: int = 2, topk: int = 4, query_dim: int = 8) -> ProductKeyMemory:
    memory = ProductKeyMemory(D, V, n_keys=n_keys, heads=heads, topk=topk, query_dim=query_dim, seed=3)
    generator = torch.Generator().manual_seed(0)
    background = torch.randn(200, D, generator=generator) * torch.linspace(0.5, 20.0, D) + 3.0
    memory.fit(background, iterations=5, seed=0)
    return memory


def hidden_states(n: int = 10, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, D, generator=generator) * torch.linspace(0.5, 20.0, D) + 3.0


def dense_values(memory: ProductKeyMemory) -> torch.Tensor:
    table = torch.zeros(memory.slots, V)
    state = memory.value_state()
    table[state["slots"]] = state["rows"]
    return table


def test_product_key_search_finds_the_exact_top_k_of_all_slots():
    memory = fitted_memory()
    queries = memory.queries(hidden_states().reshape(-1, D))  # (N, h, Q)
    scores, slots = memory.select(queries)
    half = memory.query_dim // 2
    first = torch.einsum("nhd,hkd->nhk", queries[..., :half], memory.sub_keys[:, 0])
    second = torch.einsum("nhd,hkd->nhk", queries[..., half:], memory.sub_keys[:, 1])
    full = (first[..., :, None] + second[..., None, :]).flatten(-2) / memory.query_dim**0.5  # (N, h, K*K)
    expected_scores, expected_slots = full.topk(memory.topk, dim=-1)
    torch.testing.assert_close(scores, expected_scores)
    assert torch.equal(slots.sort(-1).values, expected_slots.sort(-1).values)


def test_batched_read_matches_the_slow_reference():
    memory = fitted_memory()
    generator = torch.Generator().manual_seed(5)
    written = torch.randperm(memory.slots, generator=generator)[:40]
    memory.write(written, torch.randn(40, V, generator=generator))
    hidden = hidden_states()
    torch.testing.assert_close(memory(hidden), reference_read(memory, hidden, dense_values(memory)))


def test_gradients_of_trained_rows_match_the_slow_reference():
    memory = fitted_memory()
    generator = torch.Generator().manual_seed(7)
    memory.write(torch.arange(0, 64, 2), torch.randn(32, V, generator=generator))
    hidden = hidden_states()
    upstream = torch.randn(2, hidden.shape[1], V, generator=generator)
    _, read = memory.select(memory.queries(hidden.reshape(-1, D)))
    train = read.unique()[::2]  # half of the slots the tokens read, some written and some not
    rows = memory.begin_training(train)
    (memory(hidden) * upstream).sum().backward()

    table = dense_values(memory).requires_grad_(True)
    with torch.no_grad():
        table[train] = rows.detach()
    reference = reference_read(memory, hidden, table)
    (reference * upstream).sum().backward()
    torch.testing.assert_close(memory(hidden), reference)
    torch.testing.assert_close(rows.grad, table.grad[train])
    assert rows.grad.abs().sum() > 0
    memory.end_training(commit=False)


def test_untrained_memory_reads_zero_and_is_inactive():
    memory = fitted_memory()
    assert not memory.active
    assert torch.equal(memory(hidden_states()), torch.zeros(2, 10, V))


def test_training_commits_only_the_chosen_slots():
    memory = fitted_memory()
    memory.write(torch.tensor([1, 2, 3]), torch.ones(3, V))
    rows = memory.begin_training(torch.tensor([3, 9]))
    assert torch.equal(rows.detach(), torch.stack([torch.ones(V), torch.zeros(V)]))
    with torch.no_grad():
        rows.add_(5.0)
    memory.end_training()
    state = memory.value_state()
    assert state["slots"].tolist() == [1, 2, 3, 9]
    assert torch.equal(state["rows"][:2], torch.ones(2, V))
    assert torch.equal(state["rows"][2:], torch.stack([torch.full((V,), 6.0), torch.full((V,), 5.0)]))


def test_abandoned_training_changes_nothing():
    memory = fitted_memory()
    memory.write(torch.tensor([4]), torch.ones(1, V))
    rows = memory.begin_training(torch.tensor([4, 5]))
    with torch.no_grad():
        rows.add_(1.0)
    memory.end_training(commit=False)
    assert memory.value_state()["slots"].tolist() == [4]
    assert torch.equal(memory.value_state()["rows"], torch.ones(1, V))


def test_value_state_round_trip_and_checks():
    memory = fitted_memory()
    memory.write(torch.tensor([7, 2]), torch.randn(2, V))
    state = memory.value_state()
    other = fitted_memory()
    other.load_value_state(state["slots"], state["rows"])
    hidden = hidden_states()
    assert torch.equal(other(hidden), memory(hidden))
    with pytest.raises(ValueError, match="distinct"):
        other.load_value_state(torch.tensor([1, 1]), torch.zeros(2, V))
    with pytest.raises(ValueError, match="do not fit"):
        other.load_value_state(torch.tensor([1]), torch.zeros(1, V + 1))
    memory.clear()
    assert memory.written == 0 and not memory.active


def test_access_counts_and_document_frequency():
    memory = fitted_memory()
    hidden = hidden_states(n=6).reshape(-1, D)  # 12 tokens
    _, slots = memory.select(memory.queries(hidden))
    slots = slots.flatten(1)
    counts = memory.access_counts(hidden)
    assert counts.sum() == slots.numel()
    assert torch.equal(counts, torch.bincount(slots.reshape(-1), minlength=memory.slots).float())
    groups = torch.tensor([0] * 6 + [1] * 6)
    df = memory.access_counts(hidden, groups)
    expected = torch.zeros(memory.slots)
    for g in (0, 1):
        expected[slots[groups == g].unique()] += 1
    assert torch.equal(df, expected)


def test_kmeans_recovers_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = (centers.repeat(50, 1) + 0.1 * torch.randn(150, 2, generator=generator))[None]  # (1, 150, 2)
    found = kmeans(points, 3, iterations=10, seed=1)[0]
    distance = torch.cdist(found, centers).min(dim=0).values
    assert (distance < 0.2).all()


def test_kmeans_with_fewer_points_than_clusters_gives_distinct_keys():
    points = torch.randn(2, 5, 4)
    centroids = kmeans(points, 16, iterations=3, seed=0)
    assert centroids.shape == (2, 16, 4)
    assert torch.isfinite(centroids).all()
    assert torch.unique(centroids[0], dim=0).shape[0] == 16


def test_calibrated_memory_spreads_reads_over_many_slots():
    memory = fitted_memory(n_keys=8, heads=2, topk=4)
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(400, D, generator=generator) * torch.linspace(0.5, 20.0, D) + 3.0
    counts = memory.access_counts(hidden)
    assert (counts > 0).float().mean() > 0.8  # 64 slots, 400 tokens x 8 reads: nearly all are used


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="even"):
        ProductKeyMemory(D, V, query_dim=7)
    with pytest.raises(ValueError, match="topk"):
        ProductKeyMemory(D, V, n_keys=4, topk=5)
