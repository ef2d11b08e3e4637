"""The ``knowledge_store`` strategy (kNN-LM) on the tiny test models (its modules: tests/modules)."""

from __future__ import annotations

import pytest
import torch
from conftest import fast_config, make_backbone

from continual_transformer import ContinualTransformer
from continual_transformer.config import ConfigError

DOC = "The capital of Veloria is Tarnhelm. The Orvalis river flows through the city of Quenmark."
UNRELATED = "A quick brown fox jumps over the lazy dog."


def build(tokenizer, arch: str = "llama", **settings) -> ContinualTransformer:
    config = fast_config(strategies={"knowledge_store": settings})
    return ContinualTransformer(
        make_backbone(tokenizer, arch=arch), strategy="knowledge_store", config=config
    )


# -- the strategy --------------------------------------------------------------------------------------------
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
