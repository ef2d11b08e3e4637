"""The relevance gate in front of learned weights: prompts about learned documents get what was learned,
everything else the base model, exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import CORPUS, fast_config, make_backbone, save_tiny_embedder

from continual_transformer import ContinualTransformer
from continual_transformer.config import ConfigError, GateArgs

VELORIA = CORPUS[0]
UNRELATED = "A quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory):
    return save_tiny_embedder(tmp_path_factory.mktemp("gate-bert"), CORPUS + [UNRELATED])


def build(tokenizer, strategy: str, embedder_dir, **gate) -> ContinualTransformer:
    # a random encoder: only the learned text itself is this similar to its chunk
    settings = {"gate": {"enabled": True, "embedder": str(embedder_dir), "min_similarity": 0.99, **gate}}
    config = fast_config(strategies={strategy: settings})
    return ContinualTransformer(make_backbone(tokenizer), strategy=strategy, config=config)


@pytest.mark.parametrize("strategy", ["ttt", "memory_layer", "lora", "finetune"])
def test_gated_weights_apply_only_to_prompts_about_learned_documents(tokenizer, embedder_dir, strategy):
    ct = build(tokenizer, strategy, embedder_dir)
    s = ct.strategy
    base_nll = [s.token_nll([text])[0] for text in (VELORIA, UNRELATED)]  # each row in a batch of its own
    base_ppl = s.perplexity(UNRELATED * 4, window=16)
    base_answer = s.generate([UNRELATED], chat=False)
    ct.learn_document(VELORIA)
    assert s.relevance_gate is not None and s.relevance_gate.open([VELORIA, UNRELATED]) == [True, False]
    after = s.token_nll([VELORIA, UNRELATED])
    assert not torch.equal(after[0], base_nll[0])  # the learned document: what was learned applies
    assert torch.equal(after[1], base_nll[1])  # anything else: the base model, bit for bit
    assert s.perplexity(UNRELATED * 4, window=16) == base_ppl
    assert s.generate([UNRELATED], chat=False) == base_answer
    with s.disabled():  # the switch the gate uses really is the base model
        assert torch.equal(s.token_nll([VELORIA])[0], base_nll[0])


def test_gate_state_round_trips_and_reset_closes_it(tokenizer, embedder_dir, tmp_path):
    ct = build(tokenizer, "ttt", embedder_dir)
    ct.learn_document(VELORIA)
    nll = ct.strategy.token_nll([VELORIA, UNRELATED])
    ct.save(tmp_path / "state")
    fresh = build(tokenizer, "ttt", embedder_dir)
    fresh.load(tmp_path / "state")
    assert fresh.strategy.relevance_gate.chunks == ct.strategy.relevance_gate.chunks
    again = fresh.strategy.token_nll([VELORIA, UNRELATED])
    assert all(torch.equal(a, b) for a, b in zip(nll, again))
    fresh.strategy.reset()
    assert fresh.strategy.relevance_gate.open([VELORIA]) == [False]


def test_gate_settings_are_validated():
    with pytest.raises(ConfigError, match="gate.min_similarity"):
        GateArgs(min_similarity=2.0)
    with pytest.raises(ConfigError, match="gate.chunk_tokens"):
        GateArgs(chunk_tokens=1)


def test_documents_learned_together_open_the_gate_too(tokenizer, embedder_dir):
    ct = build(tokenizer, "ttt", embedder_dir)
    ct.learn_documents([VELORIA, CORPUS[1]])
    assert ct.strategy.relevance_gate.open([VELORIA, CORPUS[1], UNRELATED]) == [True, True, False]


def test_gated_lora_answers_a_mixed_batch_with_merged_layers_and_the_base_model(tokenizer, embedder_dir):
    """One call with a prompt the gate opens for and one it closes for: the open one is decoded by the merged
    layers (as peft's wrappers decode it), the closed one by the base model."""
    answers = {}
    for merge in (True, False):
        settings = {"gate": {"enabled": True, "embedder": str(embedder_dir), "min_similarity": 0.99}}
        config = fast_config(strategies={"lora": {**settings, "merge_answers": merge}})
        ct = ContinualTransformer(make_backbone(tokenizer), strategy="lora", config=config)
        base = ct.strategy.generate([VELORIA, UNRELATED], chat=False)
        ct.learn_document(VELORIA)
        answers[merge] = ct.strategy.generate([VELORIA, UNRELATED], chat=False)
        assert answers[merge][1] == base[1], "closed: the base model"
        assert answers[merge][0] != base[0], "open: what was learned"
    assert answers[True] == answers[False]
