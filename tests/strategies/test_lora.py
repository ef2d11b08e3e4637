"""``lora`` on both projection kinds: nn.Linear (tiny Llama) and transformers' Conv1D (tiny GPT-2)."""

from __future__ import annotations

import pytest
import torch
from conftest import fast_config, make_backbone
from peft.tuners.lora import LoraLayer
from transformers.pytorch_utils import Conv1D

from continual_transformer import ContinualTransformer

DOC = "The capital of Veloria is Tarnhelm. The Orvalis river flows through the city of Quenmark."
PROBE = ["The capital of Veloria is", "A quick brown fox jumps over the lazy dog."]
FAST = {
    "rank": 4,
    "optim": {"learning_rate": 1e-2, "epochs": 10, "stop_loss": 0.0},
    "windows": {"window": 64, "context": 8},
}


def build(tokenizer, arch: str, **overrides) -> ContinualTransformer:
    config = fast_config(strategies={"lora": {**FAST, **overrides}})
    return ContinualTransformer(make_backbone(tokenizer, arch=arch), strategy="lora", config=config)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_learns_and_round_trips(tokenizer, arch, tmp_path):
    ct = build(tokenizer, arch)
    assert ct.strategy.stats().params_added > 0, "adapters were injected"
    base = ct.strategy.forward_logits(PROBE)
    report = ct.learn_document(DOC)
    assert report.loss_after < report.loss_before * 0.8
    assert report.step_losses[-1] < report.step_losses[0]
    learned = ct.strategy.forward_logits(PROBE)
    assert not torch.equal(learned, base)
    ct.save(tmp_path / "s")
    fresh = build(tokenizer, arch)
    assert torch.equal(fresh.strategy.forward_logits(PROBE), base)
    fresh.load(tmp_path / "s")
    assert torch.equal(fresh.strategy.forward_logits(PROBE), learned)


def test_lora_wraps_every_conv1d_of_the_chosen_gpt2_layers(tokenizer):
    ct = build(tokenizer, "gpt2", layers="-1")
    wrapped = {n.rsplit(".lora_A", 1)[0] for n in ct.strategy.trainable_state() if ".lora_A." in n}
    expected = {f"transformer.h.2.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert all(isinstance(ct.backbone.model.get_submodule(f"{n}.base_layer"), Conv1D) for n in expected)
    assert wrapped == expected


def test_lora_initialisation_leaves_the_global_generator_alone(tokenizer):
    from continual_transformer.strategies import registry, strategy_config

    backbone = make_backbone(tokenizer)  # builds a model from a seed of its own
    config = fast_config(strategies={"lora": FAST})
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    registry.get("lora")(backbone, strategy_config(config, "lora"), settings=config)
    assert torch.equal(torch.rand(3), expected)


def test_lora_adapters_do_not_depend_on_the_global_generator(tokenizer):
    torch.manual_seed(1)
    a = build(tokenizer, "llama").strategy.trainable_state()
    torch.manual_seed(2)
    b = build(tokenizer, "llama").strategy.trainable_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_answers_decode_merged_layers_as_the_wrapped_ones(tokenizer, arch, tmp_path, monkeypatch):
    """Answers are decoded with each adapted projection merged into one plain layer: the same greedy tokens
    as peft's wrappers, the wrappers back after the call, the copies rebuilt when the adapters change."""
    ct = build(tokenizer, arch)
    ct.learn_document(DOC)
    ct.save(tmp_path / "s")
    wrapped = build(tokenizer, arch, merge_answers=False)
    wrapped.load(tmp_path / "s")
    seen: list[list[type]] = []
    generate = ct.backbone.generate

    def spy(*args, **kwargs):
        seen.append([type(m) for m in ct.backbone.model.modules()])
        return generate(*args, **kwargs)

    monkeypatch.setattr(ct.backbone, "generate", spy)
    answers = ct.strategy.generate(PROBE, max_new_tokens=8)
    assert answers == wrapped.strategy.generate(PROBE, max_new_tokens=8)
    assert answers != build(tokenizer, arch).strategy.generate(PROBE, max_new_tokens=8), "learning shows"
    assert not any(issubclass(t, LoraLayer) for t in seen[0]), "plain layers while decoding"
    assert any(isinstance(m, LoraLayer) for m in ct.backbone.model.modules()), "the wrappers are back"
    merged = [layer for *_, layer in ct.strategy._merged]
    ct.strategy.generate(PROBE, max_new_tokens=8)
    assert [layer for *_, layer in ct.strategy._merged] == merged, "kept while the adapters are unchanged"
    with ct.backbone.training():  # a fused optimiser step writes without a new tensor version
        pass
    ct.strategy.generate(PROBE, max_new_tokens=8)
    assert [layer for *_, layer in ct.strategy._merged] != merged, "rebuilt after a training"
    merged = [layer for *_, layer in ct.strategy._merged]
    ct.strategy.reset()  # adapters back to their start: the base model's answers
    assert ct.strategy.generate(PROBE, max_new_tokens=8) == build(tokenizer, arch).strategy.generate(
        PROBE, max_new_tokens=8
    )
    assert [layer for *_, layer in ct.strategy._merged] != merged, "rebuilt after the adapters changed"


def test_the_wrapped_layers_are_listed_again_only_when_the_model_changes(tokenizer):
    ct = build(tokenizer, "llama")
    ct.learn_document(DOC)
    listed = ct.strategy._wrapped_layers()
    ct.strategy.generate(PROBE[:1], max_new_tokens=2)
    assert ct.strategy._wrapped_layers() is listed, "kept across answers (merged layers swapped in and out)"
    parent, child, wrapper = listed[0]
    parent._modules[child] = wrapper.get_base_layer()  # one layer unwrapped behind the strategy's back
    relisted = ct.strategy._wrapped_layers()
    assert len(relisted) == len(listed) - 1 and all(w is not wrapper for *_, w in relisted)
