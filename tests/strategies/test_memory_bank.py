"""The ``memory_bank`` strategy on the tiny test models (its memory store: tests/modules)."""

from __future__ import annotations

import pytest
import torch
from conftest import fast_config, make_backbone

from continual_transformer import ContinualTransformer
from continual_transformer.config import ConfigError
from continual_transformer.documents import make_document

DOC = "The capital of Veloria is Tarnhelm. The Orvalis river flows through the city of Quenmark."
UNRELATED = "A quick brown fox jumps over the lazy dog."


def build(tokenizer, **settings) -> ContinualTransformer:
    config = fast_config(strategies={"memory_bank": {"steps": 8, **settings}})
    return ContinualTransformer(make_backbone(tokenizer), strategy="memory_bank", config=config)


# -- the strategy --------------------------------------------------------------------------------------------
def test_examples_are_sentences_with_short_ones_joined(tokenizer):
    ct = build(tokenizer, min_tokens=4)
    assert ct.strategy.examples("Hi. " + DOC) == [
        "Hi. The capital of Veloria is Tarnhelm.",
        "The Orvalis river flows through the city of Quenmark.",
    ]
    chunks = build(tokenizer, unit="chunk", chunk_tokens=8).strategy.examples(DOC)
    assert len(chunks) > 2


def test_trained_values_lower_their_example_loss_with_the_backbone_frozen(tokenizer):
    ct = build(tokenizer)
    before = {k: v.clone() for k, v in ct.backbone.model.named_parameters()}
    trained = ct.strategy.train_values(ct.strategy.examples(DOC))
    assert (trained["after"] < trained["before"]).all()
    assert trained["values"].shape == (2, 64)
    assert all(torch.equal(v, before[k]) for k, v in ct.backbone.model.named_parameters())
    assert not any(p.requires_grad for p in ct.backbone.model.parameters())


def test_learning_stores_memories_and_relearning_finds_duplicates(tokenizer):
    ct = build(tokenizer)
    first = ct.learn_document(DOC)
    assert first.extra["kept"] == 2 and ct.strategy.store.size == 2
    importance = ct.strategy.store.importance[:2].clone()
    assert ct.learn_document(DOC).extra["already_learned"]  # the session learns one text once
    second = ct.strategy.learn(make_document(DOC, doc_id="again"))  # the strategy itself, asked again
    assert second.extra["duplicates"] == 2 and second.extra["kept"] == 0 and ct.strategy.store.size == 2
    assert (ct.strategy.store.importance[:2] > importance).all()  # the duplicates reinforced what was stored


def test_memory_is_rejected_when_it_does_not_lower_the_loss_enough(tokenizer):
    ct = build(tokenizer, min_gain=0.99)
    base = ct.strategy.forward_logits([DOC])
    report = ct.learn_document(DOC)
    assert report.extra["rejected"] == 2 and ct.strategy.store.size == 0
    assert torch.equal(ct.strategy.forward_logits([DOC]), base)


def test_gate_zero_gives_base_logits(tokenizer):
    ct = build(tokenizer, gate=0.0, min_gain=-1.0)
    base = ct.strategy.forward_logits([DOC, "The capital of Veloria is"])
    ct.learn_document(DOC)
    assert ct.strategy.store.size == 2
    assert ct.strategy.deltas(["The capital of Veloria is"]) is not None  # retrieved, but gated to nothing
    assert torch.equal(ct.strategy.forward_logits([DOC, "The capital of Veloria is"]), base)


def test_unrelated_prompt_retrieves_nothing_and_matches_the_base_model(tokenizer):
    ct = build(tokenizer)
    base_logits = ct.strategy.forward_logits([UNRELATED])
    base_answer = ct.generate([UNRELATED])
    ct.learn_document(DOC)
    assert ct.strategy.deltas([UNRELATED]) is None
    assert torch.equal(ct.strategy.forward_logits([UNRELATED]), base_logits)
    assert ct.generate([UNRELATED]) == base_answer
    related = ct.strategy.forward_logits(["The capital of Veloria is"])
    assert not torch.equal(
        related, ct.backbone.model(**ct.backbone.encode(["The capital of Veloria is"])).logits
    )


def test_generation_reinforces_used_memories(tokenizer):
    ct = build(tokenizer)
    ct.learn_document(DOC)
    importance = ct.strategy.store.importance[:2].clone()
    ct.strategy.token_nll(["The capital of Veloria is Tarnhelm."])  # scoring is measurement: no change
    assert torch.equal(ct.strategy.store.importance[:2], importance)
    ct.generate(["The capital of Veloria is"])
    assert ct.strategy.store.importance[:2].sum() > importance.sum()


def test_fusing_only_the_last_prompt_tokens(tokenizer):
    everywhere, last = build(tokenizer), build(tokenizer, fuse_tokens=1)
    for ct in (everywhere, last):
        ct.learn_document(DOC)
    args = ([" Tarnhelm."],)
    kwargs = {"contexts": ["The capital of Veloria is"]}
    a, b = everywhere.strategy.token_nll(*args, **kwargs)[0], last.strategy.token_nll(*args, **kwargs)[0]
    assert a.shape == b.shape and not torch.equal(a, b)
    assert last.generate(["The capital of Veloria is"])[0] is not None


def test_config_errors_name_the_key():
    from continual_transformer.strategies.memory_bank import MemoryBankConfig

    with pytest.raises(ConfigError, match="strategies.memory_bank.gate"):
        MemoryBankConfig(gate=2.0)
    with pytest.raises(ConfigError, match="strategies.memory_bank.on_duplicate"):
        MemoryBankConfig(on_duplicate="merge")


# -- keys from a sentence embedder (a tiny random BERT) ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_embedder_dir(tmp_path_factory):
    from conftest import CORPUS, save_tiny_embedder

    return save_tiny_embedder(tmp_path_factory.mktemp("tiny-bert"), CORPUS + [DOC, UNRELATED])


def test_embedder_keys_retrieve_their_sentence_and_round_trip(tokenizer, tiny_embedder_dir, tmp_path):
    ct = build(
        tokenizer, key_encoder=str(tiny_embedder_dir), min_similarity=0.9999, duplicate_threshold=0.99999
    )
    strategy = ct.strategy
    assert (
        strategy.min_similarity == 0.9999 and strategy.store.key_dim == 32
    )  # the embedder's width, not the model's
    ct.learn_document(DOC)
    sentences = strategy.examples(DOC)
    assert strategy.store.size == 2
    assert torch.allclose(strategy.store.keys[:2], strategy.embedder.encode(sentences), atol=1e-6)
    slots, _, valid = strategy.store.retrieve(strategy.keys(sentences), 1, strategy.min_similarity)
    assert slots[:, 0].tolist() == [0, 1] and valid.all()  # each sentence finds its own memory
    assert strategy.deltas([UNRELATED]) is None
    expected = strategy.forward_logits([sentences[0], UNRELATED])
    ct.save(tmp_path / "state")
    fresh = build(
        tokenizer, key_encoder=str(tiny_embedder_dir), min_similarity=0.9999, duplicate_threshold=0.99999
    )
    fresh.load(tmp_path / "state")
    assert torch.equal(fresh.strategy.forward_logits([sentences[0], UNRELATED]), expected)


def test_state_saved_with_other_keys_is_refused(tokenizer, tiny_embedder_dir, tmp_path):
    ct = build(tokenizer)  # backbone keys: 64 wide
    ct.learn_document(DOC)
    ct.save(tmp_path / "state")
    other = build(tokenizer, key_encoder=str(tiny_embedder_dir))
    with pytest.raises(Exception, match="key encoder"):
        other.load(tmp_path / "state")
    assert other.strategy.store.size == 0  # nothing half-loaded


def test_default_similarity_threshold_depends_on_the_key_encoder(tokenizer, tiny_embedder_dir):
    from continual_transformer.strategies.memory_bank import MemoryBankConfig

    assert MemoryBankConfig().key_encoder == "minilm-l6"
    assert build(tokenizer).strategy.min_similarity == 0.65
    assert build(tokenizer, key_encoder=str(tiny_embedder_dir)).strategy.min_similarity == 0.6
