"""The real packaged model: SmolLM2-135M-Instruct on CPU. Run by `make test` after `ctt models pull`."""

from __future__ import annotations

import pytest
import torch

from continual_transformer import ContinualTransformer, load_config
from continual_transformer.backbone import Backbone
from continual_transformer.demo import DEMO_DOCUMENT, contains_answer
from continual_transformer.errors import ModelNotFoundError

pytestmark = pytest.mark.real_model

FACT = DEMO_DOCUMENT
QUESTION = "What is the capital of Veloria?"
PROBE = ["The capital of Veloria is", "Water boils at a temperature of"]


def load_backbone() -> Backbone:
    from continual_transformer import zoo

    config = load_config(set_items=["model.device=cpu", "generation.max_new_tokens=24"])
    try:
        zoo.resolve(config.model.name, config.model.cache_dir, auto_pull=False)
    except ModelNotFoundError as exc:
        pytest.skip(f"packaged model not pulled ({exc}); run `make models`")
    return Backbone.load(config.model, config.generation)


@pytest.fixture(scope="module")
def smol() -> ContinualTransformer:
    torch.set_num_threads(2)
    return ContinualTransformer(
        load_backbone(), config=load_config(set_items=["generation.max_new_tokens=24"])
    )


def test_packaged_model_loads_as_llama_with_chat_template(smol):
    assert type(smol.backbone.model).__name__ == "LlamaForCausalLM"
    assert 134_000_000 < smol.backbone.num_parameters() < 135_000_000
    assert smol.backbone.tokenizer.chat_template
    assert smol.backbone.num_layers == 30


def test_greedy_answer_to_a_known_fact(smol):
    assert contains_answer(smol.ask("What is the capital of France?"), "Paris")


def test_finetune_learns_a_fictional_fact_and_checkpoint_round_trips(smol, tmp_path):
    assert not contains_answer(smol.ask(QUESTION), "Tarnhelm")
    report = smol.learn_document(FACT)
    assert report.loss_after < report.loss_before / 2
    assert contains_answer(smol.ask(QUESTION), "Tarnhelm")

    logits = smol.strategy.forward_logits(PROBE)
    smol.save(tmp_path / "state")
    fresh = ContinualTransformer(load_backbone(), config=smol.config)
    fresh.load(tmp_path / "state")
    assert torch.equal(fresh.strategy.forward_logits(PROBE), logits)
    assert fresh.ask(QUESTION) == smol.ask(QUESTION)

    smol.reset()
    assert not contains_answer(smol.ask(QUESTION), "Tarnhelm")
