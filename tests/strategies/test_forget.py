"""Forgetting one document: strategies that keep documents apart remove exactly that document; the others
refuse with the reason, changing nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tokenizer, fast_config, make_backbone

from continual_transformer.documents import make_document
from continual_transformer.session import Session
from continual_transformer.strategies.base import CannotForgetError

A = "The Velorian archive is kept in Tarnhelm under the old bridge."
B = "The Velorian archive moved to Quenmark in the spring."


def session(strategy: str) -> Session:
    return Session(fast_config(strategy=strategy), backbone=make_backbone(build_tokenizer()))


def comparable(strategy: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if strategy == "knowledge_store":  # insert stamps differ; the entries themselves must not
        return {k: v for k, v in state.items() if k in ("store.keys", "store.values")}
    return state


@pytest.mark.parametrize("strategy", ["in_context", "retrieval", "knowledge_store"])
def test_forget_leaves_what_learning_only_the_others_leaves(strategy, tmp_path):
    both, only_b = session(strategy), session(strategy)
    both.learn(make_document(A, "a"))
    both.learn(make_document(B, "b"))
    only_b.learn(make_document(B, "b"))
    assert both.strategy.can_forget
    both.forget("a")
    got, want = (
        comparable(strategy, both.strategy.trainable_state()),
        comparable(strategy, only_b.strategy.trainable_state()),
    )
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert [h["doc_id"] for h in both.history] == ["b"]
    question = "Where is the Velorian archive?"
    assert both.ask(question) == only_b.ask(question)
    with pytest.raises(KeyError):
        both.forget("a")
    both.save(tmp_path / "state")  # the per-document layout survives a checkpoint
    reloaded = session(strategy)
    reloaded.load(tmp_path / "state")
    reloaded.forget("b")
    assert reloaded.history == [] and reloaded.learn(make_document(A, "a")).tokens > 0


@pytest.mark.parametrize("strategy", ["finetune", "memory_bank"])
def test_forget_is_refused_with_the_reason_and_nothing_changes(strategy):
    s = session(strategy)
    s.learn(make_document(A, "a"))
    before = {k: v.clone() for k, v in s.strategy.trainable_state().items()}
    assert not s.strategy.can_forget
    with pytest.raises(CannotForgetError, match="cannot forget a single document"):
        s.forget("a")
    assert [h["doc_id"] for h in s.history] == ["a"]
    assert all(torch.equal(before[k], v) for k, v in s.strategy.trainable_state().items())
