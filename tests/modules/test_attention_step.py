"""One-kernel attention steps (modules.attention_step) in Triton's interpreter: a Llama model decodes with
them as with Hugging Face's own layers; only Llama layers are stood in for, and only while installed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_backbone, tiny_llama
from transformers import StaticCache
from transformers.models.llama.modeling_llama import LlamaAttention

from continual_transformer.modules import triton_attention
from continual_transformer.modules.attention_step import AttentionSteps, eligible
from continual_transformer.modules.grouped_attention import register
from continual_transformer.modules.paired_cache import counters, pair_layers

pytest.importorskip("triton")


@pytest.fixture
def launches(monkeypatch):
    assert triton_attention.interpreting(), "TRITON_INTERPRET=1 must be set before Triton is imported"
    seen: list[int] = []
    launch = triton_attention._launch_step
    monkeypatch.setattr(triton_attention, "_launch_step", lambda *a: seen.append(1) or launch(*a))
    return seen


def _decode(model, cache, ids, mask, steps: int):
    """A left-padded prompt pass, then ``steps`` one-token steps (each row's last token again); logits."""
    out = [model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).logits]
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], dim=1)
        position = (mask.cumsum(-1)[:, -1:] - 1).clamp(min=0)
        token = out[-1][:, -1:].argmax(-1)
        step = model(input_ids=token, attention_mask=mask, position_ids=position, cache=cache, use_cache=True)
        out.append(step.logits)
    return out


def test_a_model_decodes_with_the_steps_as_with_its_own_layers(tokenizer, launches):
    """Prompts stay with the layers' own forward; each one-token step of each layer is one kernel launch;
    logits and the cache's counter as Hugging Face's sdpa layers with a static cache give them."""
    model = tiny_llama(tokenizer)
    ids = torch.randint(5, len(tokenizer), (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    layers = model.config.num_hidden_layers
    with torch.inference_mode():
        expected = _decode(model, StaticCache(config=model.config, max_cache_len=16), ids, mask, 4)
        paired = StaticCache(config=model.config, max_cache_len=16)
        assert pair_layers(paired, model.config)
        steps = AttentionSteps()
        assert steps.install(tuple(model.modules())) == layers
        model.config._attn_implementation = register(kernel="triton")
        try:
            got = _decode(model, paired, ids, mask, 4)
        finally:
            model.config._attn_implementation = "sdpa"
            steps.remove()
    assert len(launches) == 4 * layers
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-5)
    assert int(counters(paired)[0]) == 7 + 4


def test_other_caches_and_installs_keep_the_layers_own_forward(tokenizer, launches):
    """Steps over a static cache that is not paired run the layer's forward; after remove() every layer's
    forward is its class's again; installs give the same forward objects (a compiled step's guards)."""
    model = tiny_llama(tokenizer)
    walk = tuple(model.modules())
    steps = AttentionSteps()
    steps.install(walk)
    first = [m.__dict__["forward"] for m in steps.installed]
    steps.install(walk)
    assert [m.__dict__["forward"] for m in steps.installed] == first
    ids = torch.randint(5, len(tokenizer), (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        _decode(model, StaticCache(config=model.config, max_cache_len=8), ids, torch.ones_like(ids), 2)
    assert not launches
    steps.remove()
    assert all("forward" not in m.__dict__ for m in walk)


def test_only_layers_with_llamas_own_forward_are_stood_in_for(tokenizer):
    """A subclass with a forward of its own (a strategy's layer) and other modules are left alone."""

    class Changed(LlamaAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = tiny_llama(tokenizer)
    attention = model.model.layers[0].self_attn
    assert eligible(attention)
    changed = Changed(model.config, 0)
    assert not eligible(changed) and not eligible(model.model.layers[0].mlp)
    steps = AttentionSteps()
    assert steps.install((changed, attention, model.model.layers[0])) == 1
    assert steps.installed == [attention]


def test_compiled_decoding_answers_alike_with_fused_and_separate_steps(tokenizer, launches):
    """The compiled backend with the Triton kernel (the interpreter breaks its graph): one-kernel steps in
    calls of up to ``attention_step_rows`` rows, Hugging Face's layers in larger calls and at 0; every way
    answers as eager decoding, and the steps are taken out after each call."""
    backbone = make_backbone(tokenizer, max_new_tokens=6)
    prompts = ["hello there", "a longer prompt about the weather today", "x"]
    backbone.generation = dataclasses.replace(backbone.generation, backend="eager")
    eager = backbone.generate(prompts)
    backbone.generation = dataclasses.replace(
        backbone.generation, backend="compiled", decode_attention="grouped", decode_attention_kernel="triton"
    )
    assert backbone.generation.attention_step_rows >= len(prompts)
    assert backbone.generate(prompts) == eager
    assert launches and not backbone._attention_kernel_failed and not backbone._compile_failed
    assert not backbone._steps_installed(), "taken out after the call"
    for rows in (len(prompts) - 1, 0):
        launches.clear()
        backbone.generation = dataclasses.replace(backbone.generation, attention_step_rows=rows)
        assert backbone.generate(prompts) == eager
        assert not launches


def test_the_cache_is_found_and_passed_on_under_either_name(tokenizer, launches):
    """Transformers versions name the layer's cache ``cache`` or ``past_key_values``: a prompt goes to the
    layer's own forward with the cache as it came (and writes it), a step finds it under either name."""
    from continual_transformer.modules.attention_step import step_forward

    model = tiny_llama(tokenizer)
    attention = model.model.layers[0].self_attn
    cache = StaticCache(config=model.config, max_cache_len=8)
    assert pair_layers(cache, model.config)
    hidden = torch.randn(2, 3, model.config.hidden_size)
    rotary = model.model.rotary_emb
    with torch.inference_mode():
        embeddings = rotary(hidden, torch.arange(3).expand(2, 3))
        step_forward(attention, hidden, embeddings, None, past_key_values=cache)
        assert cache.layers[0].is_initialized and not launches
        for name in ("past_key_values", "cache"):
            position = torch.full((2, 1), int(cache.layers[0].cumulative_length))
            one = rotary(hidden[:, :1], position)
            out, _ = step_forward(
                attention, hidden_states=hidden[:, :1], position_embeddings=one, **{name: cache}
            )
            assert out.shape == (2, 1, model.config.hidden_size)
    assert len(launches) == 2
