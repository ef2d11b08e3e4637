"""Prompt-prefix reuse (``generation.prefix_reuse_tokens``): a one-prompt call that begins as the last one did
copies that prompt's keys and values and runs only the rest; the answers stay those of a whole prompt pass."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_backbone

from continual_transformer.backbone import Backbone
from continual_transformer.config import GenerationConfig
from continual_transformer.errors import ConfigError

DOC = (
    "The capital of Veloria is Tarnhelm. The Orvalis river flows through the city of Quenmark. "
    "Tarnhelm was founded by river traders who sailed from Quenmark in the spring."
)
QUESTIONS = [
    f"{DOC}\n\nQuestion: {q}" for q in ("Where is Tarnhelm?", "What flows through Quenmark?", "Who?")
]


def on(backbone: Backbone, backend: str = "static", tokens: int = 8, **changes) -> None:
    backbone.generation = dataclasses.replace(
        backbone.generation, backend=backend, prefix_reuse_tokens=tokens, **changes
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("speculate", [0, 3])
def test_questions_about_one_document_reuse_its_keys_and_values(tokenizer, arch, speculate):
    """Questions about one document, asked one after another: from the second on, the document's part of the
    prompt is not run again, and every answer equals the one of a whole prompt pass (reuse off)."""
    backbone = make_backbone(tokenizer, arch=arch, max_new_tokens=12)
    on(backbone, tokens=0, speculative_tokens=speculate)
    whole = [backbone.generate([q])[0] for q in QUESTIONS]
    on(backbone, speculative_tokens=speculate)
    assert [backbone.generate([q])[0] for q in QUESTIONS] == whole
    reused = backbone.prefix_reused
    doc_tokens = len(backbone.token_ids(DOC))
    assert reused["calls"] >= len(QUESTIONS) - 1 and reused["tokens"] >= (len(QUESTIONS) - 1) * doc_tokens
    assert backbone.generate([QUESTIONS[0]])[0] == whole[0], "the same prompt again: all but its last token"


def test_kept_prompt_is_dropped_when_the_model_changes(tokenizer):
    """A weight written in place (an optimiser step, a load, a reset), a training (whose fused optimiser
    steps write without a new version), a hook, or several prompts at once: the prompt runs whole; the
    answers follow the changed model."""
    backbone = make_backbone(tokenizer, max_new_tokens=10)
    on(backbone)
    backbone.generate([QUESTIONS[0]])
    with torch.no_grad():
        backbone.model.lm_head.weight.mul_(1.5)  # in place: the same tensor, a new version
    calls = backbone.prefix_reused["calls"]
    changed = backbone.generate([QUESTIONS[1]])
    assert backbone.prefix_reused["calls"] == calls, "the kept keys and values were made by other weights"
    on(backbone, tokens=0)
    assert backbone.generate([QUESTIONS[1]]) == changed

    on(backbone)
    backbone.generate([QUESTIONS[0]])
    weight = backbone.model.lm_head.weight
    version = weight._version
    with backbone.training():  # a fused optimiser step writes without bumping the version
        weight.data.mul_(1.5)
    assert weight._version == version
    calls = backbone.prefix_reused["calls"]
    trained = backbone.generate([QUESTIONS[1]])
    assert backbone.prefix_reused["calls"] == calls, "kept from before a training"
    on(backbone, tokens=0)
    assert backbone.generate([QUESTIONS[1]]) == trained

    on(backbone)
    backbone.generate([QUESTIONS[0]])
    calls = backbone.prefix_reused["calls"]
    handle = backbone.layers[0].register_forward_hook(lambda module, args, output: output)
    backbone.generate([QUESTIONS[1]])
    handle.remove()
    assert backbone.prefix_reused["calls"] == calls, "a hook may change what the layers make"
    backbone.generate(QUESTIONS[:2])
    assert backbone.prefix_reused["calls"] == calls, "several prompts run whole"


def test_a_short_shared_beginning_is_run_again(tokenizer):
    """Below prefix_reuse_tokens shared tokens nothing is copied."""
    backbone = make_backbone(tokenizer, max_new_tokens=4)
    on(backbone, tokens=10_000)
    for q in QUESTIONS:
        backbone.generate([q])
    assert backbone.prefix_reused["calls"] == 0


def test_prefix_reuse_setting_is_validated():
    with pytest.raises(ConfigError):
        GenerationConfig(prefix_reuse_tokens=-1)


@pytest.mark.real_model
def test_prompt_reuse_on_the_packaged_model():
    """SmolLM2-135M-Instruct, chat prompts about one passage: the answers equal whole prompt passes', and
    the passage is run once."""
    from continual_transformer.config import load_config

    config = load_config(
        set_items=["model.device=cpu", "generation.max_new_tokens=24", "generation.backend=static"]
    )
    backbone = Backbone.load(config.model, config.generation)
    on(backbone, tokens=0)
    whole = [backbone.generate([q])[0] for q in QUESTIONS]
    on(backbone, tokens=32)
    assert [backbone.generate([q])[0] for q in QUESTIONS] == whole
    assert backbone.prefix_reused["calls"] == len(QUESTIONS) - 1
