"""Speed options of the training loop (packing, autocast, deferred loss reads); batched document learning."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import fast_config, make_backbone

from continual_transformer import ContinualTransformer, training
from continual_transformer.backbone import sequence_nll
from continual_transformer.config import ConfigError, OptimArgs, WindowArgs

TEXTS = [
    "The capital of Veloria is Tarnhelm.",
    "The Orvalis river flows through the city of Quenmark.",
    "Dr. Mirela Voskuijlen was born in the town of Brastow in 1873.",
    "The national animal is the silver lynx.",
]


def _examples(backbone):
    return [e for t in TEXTS for e in training.window_examples(backbone, t, WindowArgs(window=64, context=8))]


def test_packing_keeps_every_example_to_itself(tokenizer):
    """The NLL of each example inside a packed row equals its NLL alone (attention does not cross)."""
    backbone = make_backbone(tokenizer)
    examples = _examples(backbone)
    packed = training.pack_examples(examples, 64)
    assert len(packed) < len(examples)
    assert sum(len(p.input_ids) for p in packed) == sum(len(e.input_ids) for e in examples)
    with torch.no_grad():
        alone = [
            sequence_nll(
                backbone.model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits,
                torch.tensor([e.labels]),
            ).sum()
            for e in examples
        ]
        batch = training.collate(packed, backbone.tokenizer.pad_token_id, backbone.device)
        logits = backbone.model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        together = sequence_nll(logits, batch["labels"]).sum()
    assert torch.allclose(together, torch.stack(alone).sum(), rtol=1e-5)
    assert training.next_token_loss(backbone, batch) > 0


def test_examples_with_extras_are_not_packed():
    example = training.Example((1, 2, 3), (1, 2, 3), {"x": torch.zeros(2)})
    with pytest.raises(ValueError, match="extras"):
        training.pack_examples([example], 16)


@pytest.mark.parametrize(
    "options",
    [
        {"pack_tokens": 64},
        {"autocast": True},
        {"pack_tokens": 64, "autocast": True},
        {"pack_tokens": 64, "compile": True, "compile_mode": "reduce-overhead"},  # compiles: ~25 s
    ],
)
def test_speed_options_still_learn(tokenizer, options):
    backbone = make_backbone(tokenizer)
    params = list(backbone.layers[-1].parameters())
    optim = OptimArgs(learning_rate=1e-2, epochs=8, batch_size=4, stop_loss=0.0, **options)
    losses = training.train(backbone, _examples(backbone), params, optim)
    assert all(isinstance(x, float) for x in losses)
    assert losses[-1] < losses[0] * 0.8
    assert not any(p.requires_grad for p in params)


def test_pack_tokens_is_validated():
    with pytest.raises(ConfigError, match="pack_tokens"):
        OptimArgs(pack_tokens=-1)
    with pytest.raises(ConfigError, match="compile_mode"):
        OptimArgs(compile=True, compile_mode="max-autotune")


@pytest.mark.parametrize("name", ["finetune", "ttt", "retrieval"])
def test_learn_documents_learns_each_document(tokenizer, name):
    ct = ContinualTransformer(make_backbone(tokenizer), strategy=name, config=fast_config())
    reports = ct.learn_documents([*TEXTS, TEXTS[0]])
    assert [r.tokens > 0 for r in reports] == [True] * 4 + [False], "a repeated text is learned once"
    assert len(ct.history) == 4
    if ct.strategy.changes_outputs and not ct.strategy.reads_context:
        assert all(r.loss_after < r.loss_before for r in reports[:4])
    if name != "retrieval":
        assert reports[0].extra["batch_documents"] == 4
        assert ct.strategy.documents_learned == 4


def test_learn_documents_of_one_document_is_learn(tokenizer):
    a = ContinualTransformer(make_backbone(tokenizer), strategy="finetune", config=fast_config())
    b = ContinualTransformer(make_backbone(tokenizer), strategy="finetune", config=fast_config())
    ra, rb = a.learn_documents([TEXTS[0]])[0], b.learn_document(TEXTS[0])
    assert ra.step_losses == rb.step_losses and ra.loss_after == rb.loss_after
    assert dataclasses.asdict(a.stats()) == dataclasses.asdict(b.stats())


@pytest.mark.parametrize("name", ["finetune", "ttt", "memory_layer"])
def test_learn_documents_tokenises_each_document_once(tokenizer, name, monkeypatch):
    """The examples and both scorings of a ``learn_documents`` call come from one tokenisation of the
    documents; the windows made from those ids are the ones a document's own tokenisation makes."""
    from continual_transformer.documents import make_document

    ct = ContinualTransformer(make_backbone(tokenizer), strategy=name, config=fast_config())
    docs = [make_document(t, f"d{i}") for i, t in enumerate(TEXTS)]
    if name == "memory_layer":  # its own training plans
        ct.strategy.calibrate()  # reads its background text first (not one of the documents)
        alone = [ct.strategy.training_plan(d).examples for d in docs]
        together = ct.strategy.training_plans(docs, ct.backbone.token_ids_many([d.text for d in docs]))
        assert [plan.examples for plan in together] == alone
    else:
        alone = [ct.strategy.training_examples(d)[0] for d in docs]
    texts = {d.text for d in docs}
    seen = []
    call = type(ct.backbone.tokenizer).__call__

    def counting(self, text, *args, **kwargs):
        batch = text if isinstance(text, list) else [text]
        seen.extend(t for t in batch if t in texts)
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(ct.backbone.tokenizer), "__call__", counting)
    # every encoding through the tokenizer's call, where it is counted (not its Rust backend alone)
    ct.backbone._backend_checked = (ct.backbone.tokenizer.backend_tokenizer, False)
    if name != "memory_layer":
        made = ct.strategy._examples(docs, ct.backbone.token_ids_many([d.text for d in docs]))
        assert [examples for examples, _ in made] == alone
    seen.clear()
    ct.learn_documents(docs)
    assert sorted(seen) == sorted(texts), "each document tokenised once"


@pytest.mark.parametrize("budget", [40, 8192])
def test_document_losses_in_length_sorted_batches_equal_each_document_alone(tokenizer, monkeypatch, budget):
    from continual_transformer.documents import make_document
    from continual_transformer.strategies import base

    monkeypatch.setattr(base, "DOCUMENT_NLL_TOKENS", budget)  # 40: several batches, one document alone
    ct = ContinualTransformer(make_backbone(tokenizer), strategy="finetune", config=fast_config())
    texts = [TEXTS[2], TEXTS[0], " ".join(TEXTS), TEXTS[3], TEXTS[1]]
    docs = [make_document(t, f"d{i}") for i, t in enumerate(texts)]
    together = ct.strategy._document_nll(docs, *ct.strategy._scoring(docs))
    alone = [float(ct.strategy.backbone.token_nll([t])[0].mean()) for t in texts]
    assert together == pytest.approx(alone, rel=1e-5)
    assert len(set(together)) == len(texts)


@pytest.mark.parametrize("pack", [0, 64])
def test_batches_padded_wider_give_the_same_loss(tokenizer, pack):
    """Compiled steps pad batches to 64-position buckets and fill an epoch's last batch with empty rows: the
    extra positions and rows change nothing."""
    backbone = make_backbone(tokenizer)
    examples = _examples(backbone)
    if pack:
        examples = training.pack_examples(examples, pack)
    pad = backbone.tokenizer.pad_token_id
    with torch.no_grad():
        plain = training.collate(examples, pad, backbone.device)
        wide = training.collate(examples, pad, backbone.device, width=plain["input_ids"].shape[1] + 37)
        assert wide["input_ids"].shape[1] == plain["input_ids"].shape[1] + 37
        if pack:
            assert wide["position_ids"].shape == wide["input_ids"].shape
        loss, wide_loss = training.next_token_loss(backbone, plain), training.next_token_loss(backbone, wide)
        filled = training.collate(
            [*examples, *[training.empty_like(examples[0], pad)] * 3], pad, backbone.device
        )  # rows that score nothing fill a batch to a fixed size
        filled_loss = training.next_token_loss(backbone, filled)
    assert filled["input_ids"].shape[0] == len(examples) + 3
    assert torch.allclose(loss, wide_loss, rtol=1e-5) and torch.allclose(loss, filled_loss, rtol=1e-5)
