"""The ``memory_layer`` strategy (sparse memory finetuning of product-key memories), on tiny models."""

from __future__ import annotations

import inspect

import pytest
import test_strategies as invariants
import torch
from conftest import make_backbone

from continual_transformer import ContinualTransformer
from continual_transformer.backbone import model_fingerprint
from continual_transformer.config import ConfigError, from_dict, load_config
from continual_transformer.documents import make_document
from continual_transformer.strategies import memory_layer as memory_layer_module  # registers the strategy
from continual_transformer.strategies.memory_layer import MemoryLayerConfig, select_memory_layers, tfidf_slots

DOC = invariants.DOC
PROBE = invariants.PROBE
# A small memory and background: the tests check mechanics, not what a random model stores.
FAST = {
    "n_keys": 16,
    "heads": 2,
    "topk": 4,
    "query_dim": 16,
    "top_t": 64,
    "background_tokens": 512,
    "background_chunk_tokens": 32,
    "kmeans_iterations": 5,
    "learning_rate": 300.0,
    "epochs": 20,
    "window_tokens": 64,
    "context_tokens": 8,
}


def config(**overrides):
    return load_config(
        overrides={"generation": {"max_new_tokens": 8}, "strategies": {"memory_layer": {**FAST, **overrides}}}
    )


def build(tokenizer, *, seed: int = 0, **overrides) -> ContinualTransformer:
    return ContinualTransformer(
        make_backbone(tokenizer, seed=seed), strategy="memory_layer", config=config(**overrides)
    )


# -- the registry invariants of tests/test_strategies.py, on this strategy with the small settings -----------
INVARIANTS = [
    invariants.test_untouched_backbone_parameters_stay_bit_identical,
    invariants.test_learning_lowers_document_loss,
    invariants.test_save_then_load_in_fresh_model_gives_identical_logits,
    invariants.test_reset_gives_base_model_logits,
    invariants.test_state_bytes_match_saved_tensors,
    invariants.test_checkpoint_from_another_base_model_is_refused,
    invariants.test_close_restores_the_base_model,
]


@pytest.mark.parametrize("invariant", INVARIANTS, ids=lambda f: f.__name__)
def test_registry_invariants(invariant, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(invariants, "build", lambda tok, name, *, seed=0: build(tok, seed=seed))
    kwargs = {"tokenizer": tokenizer, "name": "memory_layer", "tmp_path": tmp_path}
    invariant(**{k: v for k, v in kwargs.items() if k in inspect.signature(invariant).parameters})


# -- behaviour -----------------------------------------------------------------------------------------------
def test_model_is_bit_identical_before_learning(tokenizer):
    backbone = make_backbone(tokenizer)
    batch = backbone.encode(PROBE)
    base = backbone.model(**batch).logits
    ct = ContinualTransformer(backbone, strategy="memory_layer", config=config())
    ct.strategy.calibrate()
    assert torch.equal(ct.backbone.model(**batch).logits, base)
    assert torch.equal(ct.strategy.forward_logits(PROBE), base.float())


def test_only_the_selected_slots_change(tokenizer):
    ct = build(tokenizer)
    strategy = ct.strategy
    strategy.calibrate()
    first = strategy.select_slots(strategy.training_plan(make_document(DOC)).examples)
    ct.learn_document(DOC)
    (memory,) = strategy.memories
    state = memory.value_state()
    assert torch.equal(state["slots"], first[0])
    assert 0 < state["slots"].numel() <= FAST["top_t"]

    other = "Dr. Mirela Voskuijlen was born in the town of Brastow in 1873."
    second = strategy.select_slots(strategy.training_plan(make_document(other)).examples)[0]
    ct.learn_document(other)
    after = memory.value_state()
    untouched = ~torch.isin(state["slots"], second)
    assert untouched.any()
    kept = torch.isin(after["slots"], state["slots"][untouched])
    assert torch.equal(after["rows"][kept], state["rows"][untouched])
    assert set(after["slots"].tolist()) == set(state["slots"].tolist()) | set(second.tolist())


def test_tfidf_prefers_document_specific_slots():
    counts = torch.tensor([10.0, 3.0, 5.0, 0.0, 1.0])
    df = torch.tensor([10.0, 0.0, 5.0, 0.0, 10.0])  # slots 0 and 4: read by every background chunk
    chosen = tfidf_slots(counts, df, chunks=10.0, top_t=2)
    assert chosen.tolist() == [1, 2]
    assert tfidf_slots(counts, df, chunks=10.0, top_t=10).tolist() == [
        1,
        2,
    ]  # never unread or all-chunk slots


def test_selection_picks_slots_the_background_reads_rarely(tokenizer, tmp_path):
    background = tmp_path / "background.txt"
    background.write_text(" ".join([invariants.PROBE[1]] * 60))
    ct = build(tokenizer, background=str(background), n_keys=32, top_t=16)
    strategy = ct.strategy
    strategy.calibrate()
    doc = f"{invariants.PROBE[1]} {DOC}"
    examples = strategy.training_plan(make_document(doc)).examples
    (chosen,) = strategy.select_slots(examples)
    inputs, _ = strategy.memory_inputs([e.input_ids for e in examples])
    counts = strategy.memories[0].access_counts(inputs[0])
    read = counts > 0
    df = strategy._df[0]
    assert df[read].max() > 0, "the document also reads slots the background reads"
    assert df[chosen].mean() < (df * counts)[read].sum() / counts[read].sum()
    assert (counts[chosen] > 0).all()


def test_learning_lowers_the_document_loss_and_reports(tokenizer):
    ct = build(tokenizer)
    report = ct.learn_document(DOC)
    assert report.loss_after < 0.8 * report.loss_before
    assert report.extra["slots_trained"] == report.extra["slots_written"]
    assert report.extra["calibration_seconds"] > 0
    assert ct.strategy.stats().params_trainable == 16**2 * 64


def test_disabled_computes_the_base_model(tokenizer):
    ct = build(tokenizer)
    base = ct.strategy.forward_logits(PROBE)
    ct.learn_document(DOC)
    learned = ct.strategy.forward_logits(PROBE)
    assert not torch.equal(learned, base)
    with ct.strategy.disabled():
        assert torch.equal(ct.strategy.forward_logits(PROBE), base)
    assert torch.equal(ct.strategy.forward_logits(PROBE), learned)


def test_reset_keeps_the_calibration_and_close_removes_the_hooks(tokenizer):
    ct = build(tokenizer)
    fingerprint = model_fingerprint(ct.backbone.model)
    ct.learn_document(DOC)
    keys = ct.strategy.memories[0].sub_keys.clone()
    ct.reset()
    assert ct.strategy.calibrated and torch.equal(ct.strategy.memories[0].sub_keys, keys)
    assert ct.strategy.memories[0].written == 0
    ct.strategy.close()
    assert all(not m._forward_hooks for m in ct.strategy.mlps)
    assert model_fingerprint(ct.backbone.model) == fingerprint


def test_loading_a_state_of_other_layers_is_refused(tokenizer, tmp_path):
    ct = build(tokenizer)
    ct.learn_document(DOC)
    ct.save(tmp_path / "s")
    other = build(tokenizer, layers="1")
    logits = other.strategy.forward_logits(PROBE)
    with pytest.raises(Exception, match="does not fit"):
        other.load(tmp_path / "s")
    assert torch.equal(other.strategy.forward_logits(PROBE), logits)


def test_gpt2_architecture(tokenizer):
    ct = ContinualTransformer(make_backbone(tokenizer, arch="gpt2"), strategy="memory_layer", config=config())
    report = ct.learn_document(DOC)
    assert report.loss_after < report.loss_before


def test_context_distill_trains_the_selected_slots_toward_the_teacher(tokenizer):
    ct = build(tokenizer, objective="context_distill", stop_loss=0.0, learning_rate=1.0)
    report = ct.learn_document(DOC)
    losses, per_epoch = report.step_losses, len(report.step_losses) // FAST["epochs"]
    first, last = sum(losses[:per_epoch]), sum(losses[-per_epoch:])
    assert last < first, "the student's KL to the teacher falls"
    assert 0 < sum(report.extra["slots_trained"]) <= FAST["top_t"] * len(ct.strategy.memories)


@pytest.mark.parametrize(
    "bad",
    [
        {"layers": "top"},
        {"topk": 17},
        {"query_dim": 15},
        {"top_t": 0},
        {"objective": "nope"},
        {"optimizer": "adam"},
        {"learning_rate": 0.0},
        {"context_tokens": 64},
        {"background": " "},
    ],
)
def test_config_validation(bad):
    with pytest.raises(ConfigError, match="memory_layer"):
        from_dict(MemoryLayerConfig, {**FAST, **bad}, "strategies.memory_layer")


def test_select_memory_layers():
    assert select_memory_layers("middle", 30) == [15]
    assert select_memory_layers("middle", 4) == [2]
    assert select_memory_layers("12:14", 30) == [12, 13]


def test_module_registers_the_strategy():
    from continual_transformer.strategies import registry

    assert registry.get("memory_layer") is memory_layer_module.MemoryLayerStrategy


def test_documents_learned_together_train_the_union_of_their_slots(tokenizer):
    """``learn_documents``: each document picks its slots as alone; one run trains their union, and a report
    per document shares the run's time."""
    other = "Dr. Mirela Voskuijlen was born in the town of Brastow in 1873."
    ct = build(tokenizer)
    strategy = ct.strategy
    strategy.calibrate()
    own = [strategy.select_slots(strategy.training_plan(make_document(t)).examples)[0] for t in (DOC, other)]
    before = ct.strategy.forward_logits([other])
    reports = strategy.learn_documents([make_document(DOC), make_document(other)])
    (memory,) = strategy.memories
    assert set(memory.value_state()["slots"].tolist()) == set(own[0].tolist()) | set(own[1].tolist())
    assert [r.extra["batch_documents"] for r in reports] == [2, 2]
    assert reports[0].step_losses == reports[1].step_losses and len(reports[0].step_losses) > 0
    assert reports[1].loss_after < reports[1].loss_before
    assert not torch.equal(ct.strategy.forward_logits([other]), before)
    assert strategy.documents_learned == 2
