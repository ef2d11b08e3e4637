"""Grouped decoding attention (modules.grouped_attention) against Hugging Face's sdpa attention."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import tiny_llama
from transformers.integrations.sdpa_attention import repeat_kv

from continual_transformer.modules.grouped_attention import (
    NAME,
    REDUCED,
    grouped_sdpa_attention,
    names,
    register,
)


def _reference(query, key, value, mask, scaling):
    """The repeated-cache product the compiled sdpa path computes."""
    groups = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask, scale=scaling
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize("reduced", [False, True, "math"])
@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
def test_one_token_queries_attend_as_with_repeated_keys(tokenizer, monkeypatch, mask, reduced):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # reductions as compiled, run eagerly
    attention = tiny_llama(tokenizer).model.layers[0].self_attn  # 4 query heads, 2 key/value heads
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 4, 1, 16, generator=generator)
    key, value = torch.randn(2, 3, 2, 9, 16, generator=generator)
    seen = torch.rand(3, 1, 1, 9, generator=generator) > 0.3
    seen[..., 0] = True
    masks = {
        "none": None,
        "bool": seen,
        "additive": torch.zeros(seen.shape).masked_fill(~seen, torch.finfo(torch.float32).min),
    }
    choice = {"kernel": reduced} if isinstance(reduced, str) else {"reduced": reduced}
    out, weights = grouped_sdpa_attention(attention, query, key, value, masks[mask], scaling=0.25, **choice)
    assert weights is None and out.shape == (3, 1, 4, 16)
    torch.testing.assert_close(out, _reference(query, key, value, masks[mask], 0.25), rtol=0, atol=1e-6)


@pytest.mark.parametrize("reduced", [False, True])
def test_the_model_answers_as_with_sdpa_when_registered(tokenizer, monkeypatch, reduced):
    """Prompts (several tokens: Hugging Face's sdpa) and one-token steps (grouped, or its reductions) give
    sdpa's logits."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # reductions as compiled, run eagerly
    model = tiny_llama(tokenizer)
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.randint(0, len(tokenizer), (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = model(input_ids=ids, use_cache=True)
        model.config._attn_implementation = register(reduced=reduced)
        try:
            assert model.model.layers[0].self_attn.config._attn_implementation == (
                REDUCED if reduced else NAME
            )
            out = model(input_ids=ids, use_cache=True)
            step = model(input_ids=ids[:, -1:], **{keyword: out.past_key_values}).logits
        finally:
            model.config._attn_implementation = "sdpa"
        expected = model(input_ids=ids[:, -1:], **{keyword: reference.past_key_values}).logits
    torch.testing.assert_close(out.logits, reference.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(step, expected, rtol=0, atol=1e-5)


def test_a_named_kernel_holds_the_one_token_case_to_it(tokenizer):
    """``decode_attention_kernel``: each kernel registers under its own name, and the one-token case runs
    only that kernel (cuDNN's does not exist on a CPU: the call fails rather than falling back)."""
    assert register(kernel="math") == f"{NAME}_math" != register(kernel="cudnn") != register()
    assert set(names()) >= {NAME, REDUCED, f"{NAME}_math", f"{NAME}_efficient", f"{NAME}_cudnn"}
    attention = tiny_llama(tokenizer).model.layers[0].self_attn
    query, key, value = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    with pytest.raises(RuntimeError):
        grouped_sdpa_attention(attention, query, key, value, None, kernel="cudnn")
    out, _ = grouped_sdpa_attention(attention, query, key, value, None, kernel="math")
    torch.testing.assert_close(out, _reference(query, key, value, None, None), rtol=0, atol=1e-6)
