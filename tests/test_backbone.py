from __future__ import annotations

import math

import pytest
import torch
from conftest import make_backbone, tiny_gpt2, tiny_llama

from continual_transformer.backbone import Backbone, find_decoder_layers, model_fingerprint, resolve_dtype
from continual_transformer.config import GenerationConfig


def test_batched_generation_matches_one_by_one(backbone):
    prompts = [
        "The capital of Veloria is",
        "A quick",
        "What is the capital of France? The capital of France is",
    ]
    batched = backbone.generate(prompts, chat=False)
    single = [backbone.generate([p], chat=False)[0] for p in prompts]
    assert batched == single


def test_chat_template_is_applied_only_when_asked(backbone):
    raw = backbone.format_prompt("Hello", chat=False)
    chat = backbone.format_prompt("Hello", chat=True)
    assert raw == "Hello"
    assert chat == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def test_system_prompt_goes_into_the_template(tokenizer):
    bb = make_backbone(tokenizer)
    bb.generation = GenerationConfig(system_prompt="Be brief.")
    assert bb.format_prompt("Hi").startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_format_exchange_splits_prompt_and_answer(backbone):
    context, completion = backbone.format_exchange("Q?", "A.")
    assert context.endswith("<|im_start|>assistant\n")
    assert completion.startswith("A.<|im_end|>")


def test_token_nll_matches_a_manual_computation(backbone):
    text = "The capital of Veloria is Tarnhelm."
    ids = backbone.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = backbone.model(ids).logits[0, :-1]
    manual = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    nll = backbone.token_nll([text, "short"])[0]  # padded together with a shorter text
    torch.testing.assert_close(nll, manual, rtol=1e-4, atol=1e-4)


def test_token_nll_with_context_scores_only_the_text(backbone):
    context, text = "The capital of Veloria is", " Tarnhelm."
    scored = backbone.token_nll([text], contexts=[context])[0]
    assert scored.numel() == len(backbone.tokenizer(text, add_special_tokens=False)["input_ids"])
    full = backbone.token_nll([context + text])[0]
    torch.testing.assert_close(scored, full[-scored.numel() :], rtol=1e-4, atol=1e-4)


def test_perplexity_is_exp_of_mean_nll(backbone):
    text = "A quick brown fox jumps over the lazy dog. " * 3
    nll = backbone.token_nll([text])[0]
    assert backbone.perplexity(text, window=512) == pytest.approx(math.exp(float(nll.mean())), rel=1e-4)
    with pytest.raises(ValueError, match="two tokens"):
        backbone.perplexity("")


def test_decoder_layers_found_by_structure(tokenizer):
    assert len(find_decoder_layers(tiny_llama(tokenizer, layers=3))) == 3
    gpt2 = tiny_gpt2(tokenizer)
    assert find_decoder_layers(gpt2) is gpt2.transformer.h


def test_fingerprint_tells_models_apart_and_is_stable(tokenizer):
    a, b = tiny_llama(tokenizer, seed=0), tiny_llama(tokenizer, seed=1)
    assert model_fingerprint(a) == model_fingerprint(tiny_llama(tokenizer, seed=0))
    assert model_fingerprint(a) != model_fingerprint(b)


def test_backbone_freezes_the_model_and_pads(tokenizer):
    bb = Backbone(tiny_llama(tokenizer), tokenizer, name="t")
    assert not any(p.requires_grad for p in bb.model.parameters())
    assert bb.tokenizer.pad_token_id is not None


def test_auto_dtype_is_float32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
