"""The ``knowledge_store`` strategy (kNN-LM) and its vector store, on the tiny test models."""

from __future__ import annotations

import pytest
import torch
from conftest import fast_config, make_backbone

from continual_transformer import ContinualTransformer
from continual_transformer.config import ConfigError
from continual_transformer.modules.logits import knn_distribution, mix_log_probs
from continual_transformer.modules.vector_store import VectorStore

DOC = "The capital of Veloria is Tarnhelm. The Orvalis river flows through the city of Quenmark."
UNRELATED = "A quick brown fox jumps over the lazy dog."


def build(tokenizer, arch: str = "llama", **settings) -> ContinualTransformer:
    config = fast_config(strategies={"knowledge_store": settings})
    return ContinualTransformer(
        make_backbone(tokenizer, arch=arch), strategy="knowledge_store", config=config
    )


# -- the vector store ----------------------------------------------------------------------------------------
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


def test_store_state_round_trips():
    store = VectorStore(4, capacity=6, eviction="lru")
    store.add(torch.randn(5, 4), torch.arange(5))
    store.search(torch.randn(2, 4), 2)
    other = VectorStore(4, capacity=6, eviction="lru")
    other.load_state_dict(store.state_dict("s."), "s.")
    assert other.size == 5 and other.clock == store.clock
    for name, tensor in store.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor)


# -- the strategy ----------------------------------------------------------------------------------------------
def test_learning_stores_every_position_and_lowers_the_nll(tokenizer):
    ct = build(tokenizer)
    n_tokens = len(tokenizer(DOC, add_special_tokens=False)["input_ids"])
    report = ct.learn_document(DOC)
    assert ct.strategy.store.size == n_tokens - 2  # every prediction but the one from the attention sink
    assert report.loss_after < 0.5 * report.loss_before
    assert ct.strategy.token_nll([" Tarnhelm."], contexts=["The capital of Veloria is"])[0].mean() < 1.5


def test_lambda_zero_gives_base_logits(tokenizer):
    ct = build(tokenizer, interpolation=0.0)
    base = ct.strategy.forward_logits([DOC, UNRELATED])
    ct.learn_document(DOC)
    assert ct.strategy.store.size > 0
    assert torch.equal(ct.strategy.forward_logits([DOC, UNRELATED]), base)


def test_distance_gate_leaves_far_positions_bit_identical(tokenizer):
    ct = build(tokenizer, max_distance=0.05)
    base = ct.strategy.forward_logits([UNRELATED, DOC])
    ct.learn_document(DOC)
    after = ct.strategy.forward_logits([UNRELATED, DOC])
    batch = ct.backbone.encode([UNRELATED, DOC])
    _, hidden = ct.strategy._forward(batch["input_ids"], batch["attention_mask"])
    nearest = ct.strategy.store.search(hidden.reshape(-1, hidden.shape[-1]), 1, mark_used=False)[0][:, 0]
    far = (nearest > 0.05).reshape(batch["attention_mask"].shape) & batch["attention_mask"].bool()
    assert far.any() and torch.equal(after[far], base[far])
    near = (~far) & batch["attention_mask"].bool()
    assert near[
        1, 1:-1
    ].all()  # the document's stored positions (all but the sink and the last) find themselves
    assert not torch.equal(after[1], base[1])


def test_generation_copies_the_stored_continuation(tokenizer):
    ct = build(tokenizer, interpolation=1.0)
    ct.learn_document(DOC)
    answer = ct.strategy.generate(["The capital of Veloria is"], chat=False, max_new_tokens=6)[0]
    assert answer.startswith("Tarnhelm")
    base = ct.backbone.generate(["The capital of Veloria is"], chat=False, max_new_tokens=6)[0]
    assert base != answer


def test_capacity_bounds_the_store(tokenizer):
    ct = build(tokenizer, capacity=10, initial_capacity=4, eviction="fifo")
    ct.learn_document(DOC)
    assert ct.strategy.store.size == 10 and ct.strategy.store.allocated == 10
    assert ct.stats().state_bytes == sum(
        t.numel() * t.element_size() for t in ct.strategy.trainable_state().values()
    )


@pytest.mark.parametrize(
    ("arch", "settings"),
    [("gpt2", {}), ("llama", {"key_source": "final"}), ("llama", {"metric": "l2", "max_distance": 1.0})],
)
def test_other_architectures_and_keys(tokenizer, arch, settings):
    ct = build(tokenizer, arch=arch, **settings)
    report = ct.learn_document(DOC)
    assert report.loss_after < report.loss_before


def test_config_errors_name_the_key():
    from continual_transformer.strategies.knowledge_store import KnowledgeStoreConfig

    with pytest.raises(ConfigError, match="strategies.knowledge_store.interpolation"):
        KnowledgeStoreConfig(interpolation=1.5)
    with pytest.raises(ConfigError, match="strategies.knowledge_store.eviction"):
        KnowledgeStoreConfig(eviction="random")
