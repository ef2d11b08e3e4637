"""Invariants every registered strategy must keep, run on tiny models. New strategies inherit them."""

from __future__ import annotations

import pytest
import torch
from conftest import fast_config, make_backbone

from continual_transformer import ContinualTransformer
from continual_transformer.checkpoint import read_tensors
from continual_transformer.errors import CheckpointError, StrategyError
from continual_transformer.strategies import registry
from continual_transformer.strategies.finetune import select_layers

DOC = "The capital of Veloria is Tarnhelm. The Orvalis river flows through the city of Quenmark."
PROBE = ["The capital of Veloria is", "A quick brown fox jumps over the lazy dog."]
STRATEGIES = registry.names()


def build(tokenizer, name: str, *, seed: int = 0) -> ContinualTransformer:
    return ContinualTransformer(make_backbone(tokenizer, seed=seed), strategy=name, config=fast_config())


@pytest.mark.parametrize("name", STRATEGIES)
def test_untouched_backbone_parameters_stay_bit_identical(tokenizer, name):
    ct = build(tokenizer, name)
    before = {k: v.clone() for k, v in ct.backbone.model.named_parameters()}
    ct.learn_document(DOC)
    allowed = ct.strategy.trained_backbone_parameters()
    changed = {k for k, v in ct.backbone.model.named_parameters() if not torch.equal(v, before[k])}
    assert changed <= allowed
    assert not any(p.requires_grad for p in ct.backbone.model.parameters()), (
        "learning must leave no gradient switched on"
    )


@pytest.mark.parametrize("name", STRATEGIES)
def test_learning_lowers_document_loss(tokenizer, name):
    ct = build(tokenizer, name)
    report = ct.learn_document(DOC)
    assert report.tokens > 0 and report.seconds > 0
    if report.loss_before is not None and not ct.strategy.reads_context:
        assert report.loss_after < report.loss_before * 0.8


@pytest.mark.parametrize("name", STRATEGIES)
def test_save_then_load_in_fresh_model_gives_identical_logits(tokenizer, name, tmp_path):
    ct = build(tokenizer, name)
    ct.learn_document(DOC)
    expected = ct.strategy.forward_logits(PROBE)
    ct.save(tmp_path / "state")

    fresh = build(tokenizer, name)
    assert torch.equal(fresh.strategy.forward_logits(PROBE), expected) != ct.strategy.changes_outputs
    fresh.load(tmp_path / "state")
    assert torch.equal(fresh.strategy.forward_logits(PROBE), expected)
    assert fresh.history == ct.history
    assert fresh.stats() == ct.stats()


@pytest.mark.parametrize("name", STRATEGIES)
def test_reset_gives_base_model_logits(tokenizer, name):
    ct = build(tokenizer, name)
    base = ct.strategy.forward_logits(PROBE)
    ct.learn_document(DOC)
    assert torch.equal(ct.strategy.forward_logits(PROBE), base) != ct.strategy.changes_outputs
    ct.reset()
    assert torch.equal(ct.strategy.forward_logits(PROBE), base)
    assert ct.stats().documents == 0 and ct.history == []


@pytest.mark.parametrize("name", STRATEGIES)
def test_state_bytes_match_saved_tensors(tokenizer, name, tmp_path):
    ct = build(tokenizer, name)
    ct.learn_document(DOC)
    ct.save(tmp_path / "s")
    saved = read_tensors(tmp_path / "s")
    assert ct.stats().state_bytes == sum(t.numel() * t.element_size() for t in saved.values())


@pytest.mark.parametrize("name", STRATEGIES)
def test_checkpoint_from_another_base_model_is_refused(tokenizer, name, tmp_path):
    ct = build(tokenizer, name, seed=0)
    ct.learn_document(DOC)
    ct.save(tmp_path / "s")
    other = build(tokenizer, name, seed=1)
    logits = other.strategy.forward_logits(PROBE)
    with pytest.raises(CheckpointError, match="fingerprint"):
        other.load(tmp_path / "s")
    assert torch.equal(other.strategy.forward_logits(PROBE), logits), "a refused load must change nothing"


def test_unknown_strategy_is_a_clear_error(tokenizer):
    with pytest.raises(Exception, match="unknown strategy 'nope'"):
        ContinualTransformer(make_backbone(tokenizer), strategy="nope", config=fast_config())
    with pytest.raises(StrategyError, match="known: "):
        registry.get("nope")


def test_registry_rejects_bad_and_duplicate_names():
    with pytest.raises(StrategyError, match="lower-case"):
        registry.register("Bad-Name", config_cls=object)
    with pytest.raises(StrategyError, match="already registered"):
        registry.register("finetune", config_cls=object)(type("Other", (), {}))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("all", [0, 1, 2, 3]), ("-2:", [2, 3]), ("1:3", [1, 2]), ("-1", [3]), ("0", [0])],
)
def test_select_layers(spec, expected):
    assert select_layers(spec, 4) == expected


@pytest.mark.parametrize("spec", ["5", "top", "3:1", ""])
def test_select_layers_rejects_bad_specs(spec):
    with pytest.raises(Exception, match="layers"):
        select_layers(spec, 4)


def test_finetune_only_trains_chosen_layers(tokenizer):
    config = fast_config(strategies={"finetune": {"layers": "-1:", "learning_rate": 3e-3, "epochs": 3}})
    ct = ContinualTransformer(make_backbone(tokenizer), config=config)
    before = {k: v.clone() for k, v in ct.backbone.model.named_parameters()}
    ct.learn_document(DOC)
    changed = {k for k, v in ct.backbone.model.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all(".layers.3." in k for k in changed)
    assert ct.stats().params_added == 0
    assert ct.stats().params_trainable == sum(p.numel() for p in ct.backbone.layers[3].parameters())


def test_finetune_on_gpt2_architecture(tokenizer):
    ct = ContinualTransformer(make_backbone(tokenizer, arch="gpt2"), config=fast_config())
    report = ct.learn_document(DOC)
    assert report.loss_after < report.loss_before


@pytest.mark.parametrize("name", STRATEGIES)
def test_close_restores_the_base_model(tokenizer, name):
    ct = build(tokenizer, name)
    base_logits = ct.strategy.forward_logits(PROBE)
    fingerprint = ct.backbone.fingerprint
    ct.learn_document(DOC)
    ct.strategy.close()
    from continual_transformer.backbone import model_fingerprint

    assert model_fingerprint(ct.backbone.model) == fingerprint
    batch = ct.backbone.encode(PROBE)
    assert torch.equal(ct.backbone.model(**batch).logits.float(), base_logits)


@pytest.mark.parametrize("name", STRATEGIES)
def test_disabled_computes_the_base_model_and_learning_comes_back(tokenizer, name):
    ct = build(tokenizer, name)
    batch = ct.backbone.encode(PROBE)
    base_model = ct.backbone.model(**batch).logits.float()
    base_scored = ct.strategy.forward_logits(PROBE)
    base_nll = ct.strategy.token_nll(PROBE)
    ct.learn_document(DOC)
    learned_model = ct.backbone.model(**batch).logits.float()
    learned_scored = ct.strategy.forward_logits(PROBE)
    with ct.strategy.disabled():
        assert torch.equal(ct.backbone.model(**batch).logits.float(), base_model)
        assert torch.equal(ct.strategy.forward_logits(PROBE), base_scored)
        assert all(torch.equal(a, b) for a, b in zip(ct.strategy.token_nll(PROBE), base_nll))
        with ct.strategy.disabled():  # nests
            assert torch.equal(ct.backbone.model(**batch).logits.float(), base_model)
        assert torch.equal(ct.backbone.model(**batch).logits.float(), base_model)
    assert torch.equal(ct.backbone.model(**batch).logits.float(), learned_model)
    assert torch.equal(ct.strategy.forward_logits(PROBE), learned_scored)
    assert not torch.equal(learned_scored, base_scored) or not ct.strategy.changes_outputs
    assert not any(p.requires_grad for p in ct.backbone.model.parameters())


@pytest.mark.parametrize("name", STRATEGIES)
def test_disabled_restores_learning_when_the_body_raises(tokenizer, name):
    ct = build(tokenizer, name)
    ct.learn_document(DOC)
    learned = ct.strategy.forward_logits(PROBE)
    with pytest.raises(RuntimeError, match="teacher failed"), ct.strategy.disabled():
        raise RuntimeError("teacher failed")
    assert torch.equal(ct.strategy.forward_logits(PROBE), learned)


@pytest.mark.parametrize("name", STRATEGIES)
def test_no_strategy_module_writes_its_own_scoring(name):
    """Scoring is written once (Backbone + Strategy); strategies only supply hooks."""
    import inspect

    cls = registry.get(name)
    source = inspect.getsource(inspect.getmodule(cls))
    for banned in (
        "def perplexity",
        "def token_nll",
        "def forward_logits",
        "_labelled_batch",
        "def _mean_nll",
    ):
        assert banned not in source, f"{name} defines {banned!r}"
