"""The ``ttt`` strategy and its modules (dual MLP, neuron usage statistics), on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_backbone

from continual_transformer import ContinualTransformer
from continual_transformer.backbone import model_fingerprint
from continual_transformer.config import ConfigError, OptimArgs, WindowArgs, load_config
from continual_transformer.documents import Document
from continual_transformer.modules.dual_mlp import DualMLP, find_mlp, neuron_layout
from continual_transformer.modules.neuron_stats import (
    UsageAccumulator,
    inverse_document_frequency,
    tfidf_scores,
    top_neurons,
    topk_counts,
)
from continual_transformer.strategies import ttt as ttt_module
from continual_transformer.strategies.ttt import (
    TTTConfig,
    clean_rephrasing,
    grounded,
    parse_qa_pairs,
    select_ttt_layers,
    sentence_exchanges,
    split_sentences,
)

DOC = "The capital of Veloria is Tarnhelm. The Orvalis river flows through the city of Quenmark."
PROBE = ["The capital of Veloria is", "A quick brown fox jumps over the lazy dog."]
# Small background and no augmentation: the tests check mechanics, not what a random model writes.
FAST = {
    "background_prompts": 4,
    "background_new_tokens": 24,
    "augment": False,
    "optim": {"epochs": 20, "learning_rate": 1e-2},
    "sparse": True,
    "trainable_neurons": 16,
    "windows": {"window": 64, "context": 8},
    "anchor_weight": 0.0,
}


def build(tokenizer, *, arch: str = "llama", seed: int = 0, **overrides) -> ContinualTransformer:
    """``epochs`` and ``stop_loss`` go into ``optim`` (as does a dict ``optim``); everything else is a ttt
    setting."""
    optim = {
        **FAST["optim"],
        **overrides.pop("optim", {}),
        **{k: overrides.pop(k) for k in ("epochs", "stop_loss") if k in overrides},
    }
    section = {**FAST, **overrides, "optim": optim}
    config = load_config(overrides={"generation": {"max_new_tokens": 8}, "strategies": {"ttt": section}})
    return ContinualTransformer(make_backbone(tokenizer, arch=arch, seed=seed), strategy="ttt", config=config)


def trainable(ct) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in ct.strategy.trainable_parameters().items()}


# -- dual MLP ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_wrapped_model_gives_bit_identical_base_logits(tokenizer, arch):
    backbone = make_backbone(tokenizer, arch=arch)
    batch = backbone.encode(PROBE)
    base = backbone.model(**batch).logits
    config = load_config(overrides={"strategies": {"ttt": {**FAST, "layers": "all"}}})
    ct = ContinualTransformer(backbone, strategy="ttt", config=config)
    assert all(isinstance(find_mlp(layer)[1], DualMLP) for layer in backbone.layers)
    assert torch.equal(backbone.model(**batch).logits, base)
    for dual in ct.strategy.duals:
        dual.set_alpha(0.3)  # the mixed path (alpha 0 computes the copy alone): the delta itself is zero
    assert torch.equal(backbone.model(**batch).logits, base)


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("llama", {"gate_proj.weight": 0, "up_proj.weight": 0, "down_proj.weight": 1}),
        ("gpt2", {"c_fc.weight": 1, "c_fc.bias": 0, "c_proj.weight": 0, "c_proj.bias": None}),
    ],
)
def test_neuron_layout_is_found_by_structure(tokenizer, arch, expected):
    backbone = make_backbone(tokenizer, arch=arch)
    _, mlp = find_mlp(backbone.layers[0])
    layout = neuron_layout(mlp)
    assert layout.neurons == 128 if arch == "llama" else 256
    assert {name: axis.axis for name, axis in layout.axes.items()} == expected


def test_fused_gate_up_projection_masks_both_halves():
    class FusedMLP(torch.nn.Module):  # Phi-3 style: gate and up in one projection of width 2 I
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Linear(8, 2 * 6, bias=False)
            self.down_proj = torch.nn.Linear(6, 8, bias=False)

        def forward(self, x):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(torch.nn.functional.silu(gate) * up)

    mlp = FusedMLP()
    layout = neuron_layout(mlp)
    assert layout.neurons == 6
    chosen = torch.tensor([True, False, False, True, False, False])
    masks = layout.masks(chosen, dict(mlp.named_parameters()))
    assert masks["gate_up_proj.weight"].flatten().tolist() == [1, 0, 0, 1, 0, 0] * 2
    assert masks["down_proj.weight"].flatten().tolist() == [1, 0, 0, 1, 0, 0]


def test_alpha_zero_computes_the_trainable_copy_alone(tokenizer):
    backbone = make_backbone(tokenizer)
    _, mlp = find_mlp(backbone.layers[0])
    dual = DualMLP(mlp, alpha=0.0)
    with torch.no_grad():
        for p in dual.trainable.parameters():
            p.add_(0.1)
    calls = []
    mlp.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(2, 5, 64)
    assert torch.equal(dual(x), dual.trainable(x)) and calls == []
    dual.set_alpha(0.5)
    dual(x)
    assert calls == [1]


def test_delta_disabled_gives_the_base_mlp(tokenizer):
    backbone = make_backbone(tokenizer)
    _, mlp = find_mlp(backbone.layers[0])
    dual = DualMLP(mlp, alpha=0.25)
    with torch.no_grad():
        for p in dual.trainable.parameters():
            p.add_(0.1)
    x = torch.randn(2, 5, 64)
    base, trained = mlp(x), dual.trainable(x)
    torch.testing.assert_close(dual(x), base + 0.75 * (trained - base))
    with dual.delta_disabled():
        assert torch.equal(dual(x), base)
    assert dual.delta_enabled


# -- alpha ---------------------------------------------------------------------------------------------------


def test_alpha_schedule_decays_per_document_to_its_floor_and_survives_save_load(tokenizer, tmp_path):
    ct = build(tokenizer, alpha_initial=0.5, alpha_decay=0.5, alpha_min=0.2, epochs=1, sparse=False)
    assert ct.strategy.alpha == 0.5
    alphas = []
    for i in range(3):
        report = ct.learn_document(f"{DOC} Number {i}.")
        alphas.append(ct.strategy.alpha)
        assert report.extra["alpha"] == pytest.approx(
            [0.5, 0.25, 0.2][i]
        )  # the alpha the document was learned with
    assert alphas == pytest.approx([0.25, 0.2, 0.2])
    assert all(float(d.alpha) == ct.strategy.alpha for d in ct.strategy.duals)
    ct.save(tmp_path / "s")
    fresh = build(tokenizer, alpha_initial=0.5, alpha_decay=0.5, alpha_min=0.2, epochs=1, sparse=False)
    fresh.load(tmp_path / "s")
    assert fresh.strategy.alpha == pytest.approx(0.2)
    fresh.reset()
    assert fresh.strategy.alpha == 0.5


def test_alpha_scales_the_learned_delta(tokenizer):
    ct = build(tokenizer, sparse=False, epochs=3)
    ct.learn_document(DOC)
    batch = ct.backbone.encode(PROBE)
    with torch.no_grad():
        full = ct.backbone.model(**batch).logits
        for dual in ct.strategy.duals:
            dual.set_alpha(0.999999)
        damped = ct.backbone.model(**batch).logits
        with ttt_module.deltas_disabled(ct.strategy.duals):
            base = ct.backbone.model(**batch).logits
    assert not torch.equal(full, base)
    assert (damped - base).abs().max() < 1e-3 * (full - base).abs().max()


# -- sparse updates ------------------------------------------------------------------------------------------


def test_masked_neurons_get_exactly_zero_gradients_and_keep_their_weights(tokenizer):
    ct = build(tokenizer, arch="gpt2", trainable_neurons=16, epochs=5)
    strategy = ct.strategy
    strategy.calibrate()
    examples, _ = strategy.training_examples(Document(id="d", text=DOC))
    chosen = [top_neurons(scores, 16) for scores in strategy.neuron_scores(examples)]  # (I,) per layer
    before = trainable(ct)
    seen: list[dict[str, torch.Tensor]] = []
    original_hook = strategy._mask_gradients

    def spy(params):
        original_hook(params)
        seen.append({name: p.grad.clone() for name, p in strategy.trainable_parameters().items()})

    strategy._mask_gradients = spy
    ct.learn_document(DOC)
    assert len(seen) == 5
    after = trainable(ct)
    for i, keep in zip(strategy.layer_ids, chosen):
        names = ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias")
        fc_w, fc_b, proj_w, proj_b = (f"layers.{i}.{n}" for n in names)
        masked = ~keep
        for (
            grads
        ) in seen:  # GPT-2 Conv1D: c_fc weight (H, I) columns, c_proj weight (I, H) rows are the neurons
            assert torch.count_nonzero(grads[fc_w][:, masked]) == 0
            assert torch.count_nonzero(grads[fc_b][masked]) == 0
            assert torch.count_nonzero(grads[proj_w][masked]) == 0
            assert torch.count_nonzero(grads[proj_b]) == 0  # shared by all neurons: frozen when sparse
        assert torch.equal(after[fc_w][:, masked], before[fc_w][:, masked])
        assert torch.equal(after[fc_b][masked], before[fc_b][masked])
        assert torch.equal(after[proj_w][masked], before[proj_w][masked])
        assert torch.equal(after[proj_b], before[proj_b])
        assert not torch.equal(after[proj_w][keep], before[proj_w][keep]), "the chosen neurons learn"


def test_selected_neurons_are_the_documents_top_tfidf_neurons(tokenizer):
    ct = build(tokenizer, trainable_neurons=8, epochs=2)
    ct.strategy.calibrate()
    examples, _ = ct.strategy.training_examples(Document(id="d", text=DOC))
    expected = [top_neurons(s, 8) for s in ct.strategy.neuron_scores(examples)]
    before = trainable(ct)
    ct.learn_document(DOC)
    after = trainable(ct)
    for i, chosen in zip(ct.strategy.layer_ids, expected):
        key = f"layers.{i}.down_proj.weight"
        moved = (after[key] != before[key]).any(0)  # (I,) columns of down_proj
        assert not (moved & ~chosen).any() and moved.any()
        for name in ("gate_proj.weight", "up_proj.weight"):
            rows_moved = (after[f"layers.{i}.{name}"] != before[f"layers.{i}.{name}"]).any(1)
            assert not (rows_moved & ~chosen).any()


def test_sparse_false_updates_every_neuron(tokenizer):
    ct = build(tokenizer, sparse=False, epochs=2)
    before = trainable(ct)
    report = ct.learn_document(DOC)
    after = trainable(ct)
    assert not ct.strategy.calibrated, "dense updates need no background statistics"
    for key in before:
        moved = after[key] != before[key]
        assert moved.float().mean() > 0.9, key
    assert report.extra["neurons_per_layer"] == [128] * ct.backbone.num_layers


def test_optimizer_state_does_not_leak_across_documents(tokenizer):
    """A neuron chosen for document 1 but not document 2 must not move during document 2 (no momentum)."""
    ct = build(tokenizer, trainable_neurons=8, epochs=3)
    ct.learn_document(DOC)
    examples, _ = ct.strategy.training_examples(
        Document(id="d2", text="A quick brown fox jumps over the lazy dog. 0123456789 questions answers.")
    )
    chosen = top_neurons(ct.strategy.neuron_scores(examples)[0], 8)
    before = trainable(ct)
    ct.learn_document("A quick brown fox jumps over the lazy dog. 0123456789 questions answers.")
    after = trainable(ct)
    key = f"layers.{ct.strategy.layer_ids[0]}.down_proj.weight"
    assert torch.equal(after[key][:, ~chosen], before[key][:, ~chosen])


# -- TF-IDF statistics ---------------------------------------------------------------------------------------


def slow_topk_counts(acts: torch.Tensor, k: int, mask: torch.Tensor) -> torch.Tensor:
    b, t, units = acts.shape
    counts = torch.zeros(b, units)
    for row in range(b):
        for tok in range(t):
            if mask[row, tok]:
                magnitudes = [(abs(float(acts[row, tok, u])), u) for u in range(units)]
                for _, u in sorted(magnitudes, key=lambda m: -m[0])[:k]:
                    counts[row, u] += 1
    return counts


def test_tfidf_top_neurons_match_a_slow_reference():
    torch.manual_seed(0)
    units, k = 12, 3
    background = torch.randn(6, 10, units)  # 6 chunks of up to 10 tokens
    background[..., 0] *= 10  # neuron 0 is busy everywhere: low IDF
    bg_mask = torch.ones(6, 10, dtype=torch.long)
    bg_mask[2, 7:] = 0
    document = torch.randn(2, 8, units)
    document[..., 0] *= 10
    document[..., 5] *= 5  # neuron 5 is the document's own: high TF and IDF
    doc_mask = torch.ones(2, 8, dtype=torch.long)
    doc_mask[1, 5:] = 0

    assert torch.equal(topk_counts(background, k, bg_mask), slow_topk_counts(background, k, bg_mask))
    acc_bg, acc_doc = (
        UsageAccumulator(units, k, torch.device("cpu")),
        UsageAccumulator(units, k, torch.device("cpu")),
    )
    acc_bg.add(background[:4], bg_mask[:4])  # two batches, as calibration runs them
    acc_bg.add(background[4:], bg_mask[4:])
    acc_doc.add(document, doc_mask)
    scores = tfidf_scores(acc_doc.rate, acc_bg.rate_sum, 6.0)

    # Slow reference: per-chunk rates, soft document frequency, IDF, TF, then a ranking by hand.
    bg_counts = slow_topk_counts(background, k, bg_mask)
    lengths = bg_mask.sum(1).tolist()
    df = [sum(float(bg_counts[c, u]) / lengths[c] for c in range(6)) for u in range(units)]
    doc_counts = slow_topk_counts(document, k, doc_mask).sum(0)
    tf = [float(doc_counts[u]) / int(doc_mask.sum()) for u in range(units)]
    ref = [tf[u] * math.log(7.0 / (df[u] + 1.0)) for u in range(units)]
    torch.testing.assert_close(scores, torch.tensor(ref))
    ranked = sorted(range(units), key=lambda u: (-ref[u], u))[:4]
    assert set(top_neurons(scores, 4).nonzero().flatten().tolist()) == set(ranked)
    assert 5 in ranked and 0 not in ranked
    assert inverse_document_frequency(torch.tensor([6.0, 0.0]), 6.0).tolist() == pytest.approx(
        [0.0, math.log(7.0)]
    )


def test_top_neurons_breaks_ties_by_index():
    assert top_neurons(torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0]), 2).tolist() == [
        False,
        True,
        True,
        False,
        False,
    ]


def test_calibration_is_saved_and_restored_without_recalibrating(tokenizer, tmp_path, monkeypatch):
    ct = build(tokenizer)
    report = ct.learn_document(DOC)
    assert ct.strategy.calibrated and report.extra["calibration_seconds"] > 0
    ct.save(tmp_path / "s")
    examples, _ = ct.strategy.training_examples(Document(id="w", text="Water boils at 100 degrees."))
    masks = [top_neurons(s, 16) for s in ct.strategy.neuron_scores(examples)]

    fresh = build(tokenizer)
    fresh.load(tmp_path / "s")
    monkeypatch.setattr(
        type(fresh.strategy), "calibrate", lambda self: pytest.fail("recalibrated after load")
    )
    assert fresh.strategy.calibrated
    for a, b in zip(fresh.strategy._df, ct.strategy._df):
        assert torch.equal(a, b)
    restored = [top_neurons(s, 16) for s in fresh.strategy.neuron_scores(examples)]
    assert len(restored) == len(masks) and all(torch.equal(a, b) for a, b in zip(restored, masks))
    fresh.learn_document("Water boils at 100 degrees.")  # would fail if it recalibrated


def test_background_file_is_used_when_configured(tokenizer, tmp_path):
    path = tmp_path / "bg.txt"
    path.write_text("A quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    ct = build(tokenizer, background=str(path), background_chunk_tokens=16)
    ct.strategy.calibrate()
    n_tokens = len(tokenizer(path.read_text(), add_special_tokens=False)["input_ids"])
    assert float(ct.strategy._chunks) == n_tokens // 16 + (1 if n_tokens % 16 >= 4 else 0)
    bad = build(tokenizer, background=str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="strategies.ttt.background"):
        bad.learn_document(DOC)


# -- learning, state, close ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_document_loss_drops(tokenizer, arch):
    ct = build(tokenizer, arch=arch)
    report = ct.learn_document(DOC)
    assert report.loss_after < 0.8 * report.loss_before
    assert len(report.step_losses) == report.extra["steps"] > 0
    assert ct.stats().params_added == sum(d.trainable_parameter_count() for d in ct.strategy.duals)


def test_close_restores_original_modules(tokenizer):
    ct = build(tokenizer, layers="all")
    originals = [find_mlp(layer)[1].base for layer in ct.backbone.layers]
    fingerprint = ct.backbone.fingerprint
    ct.learn_document(DOC)
    ct.strategy.close()
    restored = [find_mlp(layer)[1] for layer in ct.backbone.layers]
    assert all(a is b for a, b in zip(restored, originals))
    assert not any(isinstance(m, DualMLP) for m in ct.backbone.model.modules())
    assert type(restored[0]).__name__ == "LlamaMLP"
    assert model_fingerprint(ct.backbone.model) == fingerprint


def test_layer_shares_and_config_validation():
    assert select_ttt_layers("25%", 30) == list(range(22, 30))  # round(7.5) = 8
    assert select_ttt_layers("25%", 4) == [3]
    assert select_ttt_layers("1%", 4) == [3]
    assert select_ttt_layers("-2:", 4) == [2, 3]
    bad_configs = [
        ({"layers": "top"}, "layers"),
        ({"layers": "0%"}, "layers"),
        ({"alpha_initial": 1.0}, "alpha"),
        ({"alpha_initial": 0.1, "alpha_min": 0.2}, "alpha"),
        ({"alpha_decay": 0.0}, "alpha_decay"),
        ({"optim": OptimArgs(weight_decay=0.1), "sparse": True}, "optim.weight_decay"),
        ({"trainable_neurons": 2.5}, "trainable_neurons"),
        ({"trainable_neurons": 0}, "trainable_neurons"),
        ({"augment_rephrasings": 4}, "augment_rephrasings"),
    ]
    for bad, field in bad_configs:
        with pytest.raises(ConfigError, match=f"strategies.ttt.{field}"):
            TTTConfig(**bad)
    for bad, field in [({"optimizer": "adam"}, "optim.optimizer"), ({"epochs": 0}, "optim.epochs")]:
        with pytest.raises(ConfigError, match=field):
            OptimArgs(**bad)
    with pytest.raises(ConfigError, match="windows.context"):
        WindowArgs(window=256, context=256)
    TTTConfig(optim=OptimArgs(weight_decay=0.1), sparse=False)
    TTTConfig(trainable_neurons=0.25)


# -- augmentation --------------------------------------------------------------------------------------------


def test_qa_parser_handles_messy_model_output():
    messy = """Sure! Here are 5 questions and answers about the text:

1. **Q:** What is the capital of Veloria? **A:** Tarnhelm.
Q2: Which river flows through Quenmark?
A2: The Orvalis river
   flows through it.

- Question: Where was Mirela Voskuijlen born?
  Answer: In Brastow.
Q: When was the Zentrik Company founded? A: In 1873.
4. What is the national animal of Veloria?
   The silver lynx.
Q: What is on every Velorian coin?
A:
Q: What does Zentrik build? A: Clocks.
Q: What is the capital of Veloria? A: Tarnhelm.
Q: Which city is the harbour"""
    assert parse_qa_pairs(messy) == [
        ("What is the capital of Veloria?", "Tarnhelm."),
        ("Which river flows through Quenmark?", "The Orvalis river flows through it."),
        ("Where was Mirela Voskuijlen born?", "In Brastow."),
        ("When was the Zentrik Company founded?", "In 1873."),
        ("What is the national animal of Veloria?", "The silver lynx."),
        ("What does Zentrik build?", "Clocks."),
    ]
    assert parse_qa_pairs("") == [] and parse_qa_pairs("I cannot answer that.") == []


def test_rephrasing_cleanup_and_grounding():
    out = "Here is the rewritten text:\n\nTarnhelm is the capital of Veloria.\nQuenmark lies on the Orvalis."
    assert clean_rephrasing(out) == "Tarnhelm is the capital of Veloria.\nQuenmark lies on the Orvalis."
    assert grounded(clean_rephrasing(out), DOC, min_share=0.6)
    assert not grounded("Paris is the capital of France since 1789.", DOC, min_share=0.6)
    assert split_sentences("First one here. Second\nwrapped line!\n\nNew para here? 3 more.") == [
        "First one here.",
        "Second wrapped line!",
        "New para here?",
        "3 more.",
    ]
    pairs = sentence_exchanges(DOC + " Too short.")
    assert pairs == [
        ('Tell me a fact: "The capital of ..."', "The capital of Veloria is Tarnhelm."),
        (
            'Tell me a fact: "The Orvalis river flows ..."',
            "The Orvalis river flows through the city of Quenmark.",
        ),
    ]


@pytest.mark.parametrize("augment", [False, True])
def test_augmentation_off_and_on_run_on_the_tiny_model(tokenizer, augment, monkeypatch):
    ct = build(
        tokenizer, augment=augment, sentence_exchanges=augment, augment_new_tokens=24, sparse=False, epochs=3
    )
    calls: list[bool] = []
    generate = ct.backbone.generate

    def spy(prompts, **kwargs):
        calls.append(all(not d.delta_enabled for d in ct.strategy.duals))
        if any("Use the format" in p for p in prompts):  # what a well-behaved model would answer
            answer = "Q: What is the capital of Veloria? A: Tarnhelm."
            return [answer if "Use the format" in p else generate([p], **kwargs)[0] for p in prompts]
        return generate(prompts, **kwargs)

    monkeypatch.setattr(ct.backbone, "generate", spy)
    report = ct.learn_document(DOC)
    if augment:
        assert calls == [True], "augmentation is generated once, by the base model"
        assert report.extra["qa_pairs"] == 1 and report.extra["sentences"] == 2
        assert report.extra["windows"] == 1
    else:
        assert calls == [] and report.extra["qa_pairs"] == 0
    assert report.loss_after < report.loss_before


# -- precision and anchoring ---------------------------------------------------------------------------------


def test_float32_copy_under_a_half_precision_model_is_exact_before_learning_and_keeps_small_updates(
    tokenizer,
):
    backbone = make_backbone(tokenizer)
    backbone.model.to(torch.bfloat16)
    _, mlp = find_mlp(backbone.layers[0])
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    wide = DualMLP(mlp, alpha=0.0, trainable_dtype=torch.float32)
    narrow = DualMLP(mlp, alpha=0.0)
    assert all(p.dtype == torch.float32 for p in wide.trainable.parameters())
    assert torch.equal(wide(x), mlp(x))  # unchanged copy: the base computes, bit for bit
    with torch.no_grad():
        for dual in (wide, narrow):
            for p in dual.trainable.parameters():
                p.mul_(1 + 1e-3)  # a relative step below bfloat16's resolution (2^-8)
    assert not any(
        torch.equal(p.float(), b.float()) for p, b in zip(wide.trainable.parameters(), mlp.parameters())
    )
    assert all(
        torch.equal(p, b) for p, b in zip(narrow.trainable.parameters(), mlp.parameters())
    )  # rounded away
    wide.mark_changed()
    out = wide(x)
    assert out.dtype == torch.bfloat16 and not torch.equal(out, mlp(x))
    wide.reset_trainable()
    assert not wide.changed and torch.equal(wide(x), mlp(x))


def test_trainable_dtype_model_keeps_the_models_dtype(tokenizer):
    ct = build(tokenizer, trainable_dtype="model", sparse=False)
    assert all(p.dtype == torch.float32 for p in ct.strategy.trainable_parameters().values())
    with pytest.raises(ConfigError, match="trainable_dtype"):
        TTTConfig(trainable_dtype="float64")


def _background_kl(ct) -> float:
    from continual_transformer import training
    from continual_transformer.modules.dual_mlp import deltas_disabled

    strategy = ct.strategy
    rows = strategy.background_rows()
    batch = training.collate(
        [training.Example(tuple(r), tuple(r)) for r in rows], 0, strategy.backbone.device
    )
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        with deltas_disabled(strategy.duals):
            reference = strategy.backbone.model(**inputs).logits
        logits = strategy.backbone.model(**inputs).logits
    return float(training.kl_to_reference(reference, logits, batch["attention_mask"]))


def test_anchor_keeps_background_text_closer_to_the_base_model(tokenizer):
    kls, losses = {}, {}
    for weight in (0.0, 5.0):
        ct = build(tokenizer, sparse=False, anchor_weight=weight, anchor_batch=4, stop_loss=0.0, epochs=10)
        report = ct.learn_document(DOC)
        kls[weight], losses[weight] = _background_kl(ct), report.loss_after
        assert report.loss_after < report.loss_before  # the document is still learned
    assert kls[5.0] < 0.5 * kls[0.0], kls


def test_kl_to_reference_matches_a_hand_computed_value():
    from continual_transformer.training import kl_to_reference

    ref = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    own = torch.log(torch.tensor([[[0.25, 0.75], [0.9, 0.1]]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_to_reference(ref, own, torch.tensor([[1, 0]])).item() == pytest.approx(expected, rel=1e-5)
    assert kl_to_reference(ref, own, torch.tensor([[1, 1]])).item() == pytest.approx(expected / 2, rel=1e-5)


# -- the anchor's fast path: one forward pass with the examples, the base model's logits kept ----------------


def _reference_anchor(strategy):
    """The reference path: a forward pass of its own per step, the base model's logits computed every step."""
    from continual_transformer import training

    def anchor(seed: int) -> training.Anchor:
        reference = training.ReferenceLogits(strategy.background_rows(), strategy._base_model, max_bytes=0)
        return training.Anchor(
            reference, weight=strategy.config.anchor_weight, batch=strategy.config.anchor_batch, seed=seed,
            fused=False,
        )  # fmt: skip

    return anchor


@pytest.mark.parametrize(
    ("pack_tokens", "anchor_batch", "layout"),
    [(0, 3, "a row each"), (64, 3, "a packed row each"), (256, 2, "one packed row")],
)
def test_fused_anchor_with_kept_base_logits_learns_as_the_reference_path(
    tokenizer, monkeypatch, pack_tokens, anchor_batch, layout
):
    """Two documents (the second reads base logits kept while the first changed the copies): the same step
    losses and the same weights as separate anchor passes that compute the base logits every step (within
    float tolerance: rows padded differently; SGD, whose steps keep float differences as small as they are,
    where Adam's normalised steps turn a sign into a whole step; ``delta_bits`` 0, since rounding to codes
    could likewise turn a float difference into a step of the code)."""
    from continual_transformer import training

    docs = [" ".join([DOC] * 5), "Dr. Mirela Voskuijlen was born in the town of Brastow in 1873."]
    layouts = []
    one_row = training.Anchor.one_row
    monkeypatch.setattr(
        training.Anchor,
        "one_row",
        lambda self, examples: layouts.append(one_row(self, examples)) or layouts[-1],
    )
    runs = {}
    for path in ("fast", "reference"):
        ct = build(
            tokenizer, sparse=False, anchor_weight=5.0, anchor_batch=anchor_batch, stop_loss=0.0, epochs=6,
            delta_bits=0,
            optim={"pack_tokens": pack_tokens, "batch_size": 2, "optimizer": "sgd", "learning_rate": 0.1},
        )  # fmt: skip
        if path == "reference":
            ct.strategy._anchor = _reference_anchor(ct.strategy)
        reports = [ct.learn_document(d) for d in docs]
        runs[path] = ([r.step_losses for r in reports], trainable(ct))
        if path == "fast":
            assert ct.strategy._reference.kept
    assert (True in layouts) == (layout == "one packed row"), layouts
    (fast_losses, fast_weights), (ref_losses, ref_weights) = runs["fast"], runs["reference"]
    for a, b in zip(fast_losses, ref_losses):
        assert len(a) == len(b) > 0
        assert a == pytest.approx(b, rel=1e-5)
        assert a[-1] < a[0]
    for key in ref_weights:
        assert torch.allclose(fast_weights[key], ref_weights[key], rtol=1e-5, atol=1e-6), key


def test_kept_reference_logits_are_the_base_models_and_are_recomputed_when_they_must_be(tokenizer):
    from continual_transformer import training

    ct = build(tokenizer, sparse=False, anchor_weight=5.0, stop_loss=0.0, epochs=3)
    ct.learn_document(DOC)  # the copies now differ from the base MLPs
    strategy, backbone = ct.strategy, ct.strategy.backbone
    kept = strategy._reference
    rows = list(range(len(kept.rows)))
    fresh = training.ReferenceLogits(kept.rows, strategy._base_model, max_bytes=0)
    assert kept.kept and not fresh.kept
    assert torch.allclose(kept(backbone, rows[:3]), fresh(backbone, rows[:3]), atol=1e-5)
    assert not fresh.kept, "past max_bytes nothing is kept"
    with torch.no_grad():  # the reference itself changes: kept logits are stale until cleared
        backbone.model.get_output_embeddings().weight.mul_(2.0)
    stale = kept(backbone, rows[:3])
    assert torch.allclose(stale, kept._kept[:3, : stale.shape[1]])
    assert not torch.allclose(stale, fresh(backbone, rows[:3]), atol=1e-3)
    kept.clear()
    assert torch.allclose(kept(backbone, rows[:3]), fresh(backbone, rows[:3]), atol=1e-5)
    before = kept._kept
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept(backbone, rows[:1])
    assert kept._kept is not before and kept._kept_autocast, "another autocast setting computes them again"
    strategy.close()
    assert strategy._reference is None


def test_anchor_draws_the_rows_of_the_reference_sampler():
    """The fused path draws as the separate regularizer did: ``random.Random(seed).sample(rows, k)``."""
    import random

    from continual_transformer import training

    rows = [[i, i + 1, i + 2] for i in range(10)]
    reference = training.ReferenceLogits(rows, lambda: torch.no_grad(), max_bytes=0)
    anchor = training.Anchor(reference, weight=1.0, batch=4, seed=7)
    rng = random.Random(7)
    for _ in range(5):
        assert [rows[i] for i in anchor.draw()] == rng.sample(rows, 4)


def test_alpha_host_copy_is_the_buffers_value_through_a_long_decay(tokenizer):
    """The schedule reads alpha without a device read: the host copy is the float32 buffer's value exactly,
    so a long decay gives the alphas a read of the buffer would."""
    ct = build(tokenizer, alpha_initial=0.9, alpha_decay=0.93, alpha_min=0.0, epochs=1, sparse=False)
    strategy = ct.strategy
    expected = torch.tensor(0.9, dtype=torch.float32)
    for _ in range(12):
        strategy.after_training(Document(id="d", text=DOC), [1.0])
        expected = torch.tensor(float(expected) * 0.93, dtype=torch.float32)
        assert all(d.current_alpha == float(d.alpha) == float(expected) for d in strategy.duals)


def test_anchor_rows_beside_packed_examples_fill_one_packed_row_when_that_is_smaller():
    from continual_transformer import training

    rows = [[5, 6, 7], [8, 9], [1, 2, 3, 4]]
    anchor = training.Anchor(training.ReferenceLogits(rows, torch.no_grad), weight=1.0, batch=2, seed=0)
    plain, packed = training.Example((1, 2), (1, 2)), training.Example((1, 2), (1, 2), {"position_ids": None})
    assert [e.input_ids for e in anchor.examples([1, 0], plain, 0, False)] == [(8, 9), (5, 6, 7)]
    (row,) = anchor.examples([1, 0], packed, 0, True)
    assert row.input_ids == (8, 9, 0, 0, 5, 6, 7, 0) and set(row.labels) == {training.IGNORE}
    assert row.extras["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert anchor.mask([1, 0], torch.device("cpu")).tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
    long = training.Example(tuple(range(20)), tuple(range(20)), {"position_ids": None})
    assert not anchor.one_row([plain]), "unpacked examples: a row each"
    assert not anchor.one_row([packed]), "one short example: 3 rows of 4 beat 2 rows of 8"
    assert anchor.one_row([long] * 4), "full packed rows: 5 rows of 20 beat 6 rows of 20"
