"""Checkpoints hold what learning changed: deltas against the base weights, bit-exact, and saves that write
only the files whose content changed."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tokenizer, fast_config, make_backbone

from continual_transformer.checkpoint import read_manifest
from continual_transformer.documents import make_document
from continual_transformer.session import Session
from continual_transformer.strategies.base import apply_delta_state, delta_state

DOC = "The capital of Veloria is Tarnhelm. The Orvalis river flows through Quenmark."


def test_delta_state_round_trips_bit_exactly_and_stores_only_changes():
    torch.manual_seed(0)
    base = {
        "same": torch.randn(6, 4),
        "rows": torch.randn(8, 4),
        "cols": torch.randn(4, 8),
        "dense": torch.randn(5, 3),
        "signed_zero": torch.zeros(4, 4),
        "vector": torch.randn(10),
        "scalar": torch.tensor(1.0),
        "half": torch.randn(6, 4).to(torch.bfloat16),
    }
    current = {k: v.clone() for k, v in base.items()}
    current["rows"][[1, 5]] += 0.5
    current["cols"][:, 2] -= 1.0
    current["dense"] += 1e-3
    current["signed_zero"][0, 0] = -0.0  # equal as numbers, not as bits
    current["vector"][3] = float("nan")
    current["scalar"] += 1
    current["half"][0] += 1
    state = delta_state(current, base)
    assert "same" not in state and "same@rows" not in state
    assert state["rows@rows"].tolist() == [1, 5] and state["rows@row_values"].shape == (2, 4)
    assert state["cols@cols"].tolist() == [2] and state["cols@col_values"].shape == (4, 1)
    assert "dense" in state and "scalar" in state and "signed_zero@rows" in state
    stored = sum(t.numel() * t.element_size() for t in state.values())
    assert stored < sum(t.numel() * t.element_size() for t in current.values()) / 2
    full = apply_delta_state(state, base, "test")
    for name, tensor in current.items():
        assert torch.equal(full[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), (
            name
        )
    with pytest.raises(ValueError, match="unexpected"):
        apply_delta_state({**state, "foreign": torch.zeros(1)}, base, "test")
    with pytest.raises(ValueError, match="does not fit"):
        apply_delta_state({"rows@rows": torch.tensor([9]), "rows@row_values": torch.zeros(1, 4)}, base, "t")


FAST_FINETUNE = {
    "learning_rate": 1e-2,
    "epochs": 20,
    "stop_loss": 0.0,
    "window_tokens": 64,
    "context_tokens": 8,
}


def session(strategy: str, **settings) -> Session:
    config = fast_config(strategy=strategy)
    if settings:
        fast = FAST_FINETUNE if strategy == "finetune" else {}
        config = fast_config(strategy=strategy, strategies={strategy: {**fast, **settings}})
    return Session(config, backbone=make_backbone(build_tokenizer()))


def tensor_bytes_on_disk(path) -> int:
    return read_manifest(path)["tensors"]["bytes"]


@pytest.mark.parametrize("strategy", ["finetune", "ttt"])
def test_an_unlearned_model_saves_no_trained_weights_and_a_changed_one_reloads_exactly(strategy, tmp_path):
    s = session(strategy)
    s.save(tmp_path / "empty")
    whole = sum(p.numel() * p.element_size() for p in s.strategy.trainable_parameters().values())
    assert tensor_bytes_on_disk(tmp_path / "empty") < whole / 100, "nothing learned: no weights stored"
    s.learn(make_document(DOC, "d"))
    s.save(tmp_path / "learned")
    fresh = session(strategy)
    fresh.load(tmp_path / "learned")
    probe = ["Where does the Orvalis flow?"]
    assert torch.equal(fresh.strategy.forward_logits(probe), s.strategy.forward_logits(probe))


def test_sparse_ttt_stores_only_the_updated_neurons(tmp_path):
    s = session("ttt", sparse=True, trainable_neurons=8)
    s.learn(make_document(DOC, "d"))
    whole = sum(p.numel() * p.element_size() for p in s.strategy.trainable_parameters().values())
    s.save(tmp_path / "state")
    assert tensor_bytes_on_disk(tmp_path / "state") < whole / 2
    fresh = session("ttt", sparse=True, trainable_neurons=8)
    fresh.load(tmp_path / "state")
    probe = ["Where does the Orvalis flow?"]
    assert torch.equal(fresh.strategy.forward_logits(probe), s.strategy.forward_logits(probe))


def test_a_save_after_one_more_document_writes_only_changed_files(tmp_path):
    s = session("finetune", layers="-1:")
    s.learn(make_document(DOC, "d1"))
    path = s.save(tmp_path / "state")
    before = {p.name for p in path.iterdir()}
    s.save(path)  # nothing changed: no tensor file written
    assert {p.name for p in path.iterdir()} == before
    s.learn(make_document("Another fact: the Quenmark bell rings twice.", "d2"))
    s.save(path)
    new = {p.name for p in path.iterdir()} - before
    assert new and all(name.startswith("tensors-") for name in new)
