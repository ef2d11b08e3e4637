"""``lora`` on both projection kinds: nn.Linear (tiny Llama) and transformers' Conv1D (tiny GPT-2)."""

from __future__ import annotations

import pytest
import torch
from conftest import fast_config, make_backbone
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
