"""The one-kernel decoding attention (modules.triton_attention) in Triton's interpreter on the CPU, against
PyTorch's attention over repeated keys and values."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import tiny_llama
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from continual_transformer.modules import triton_attention
from continual_transformer.modules.grouped_attention import NAME, REDUCED, grouped_sdpa_attention, register

pytest.importorskip("triton")


@pytest.fixture
def interpreted():
    assert triton_attention.interpreting(), "TRITON_INTERPRET=1 must be set before Triton is imported"


def _reference(query, key, value, mask, scale):
    """(B, H, 1, D) queries over (B, KV, L, D) keys and values, each repeated per query head."""
    groups = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2)


def _masks(rows: int, length: int, generator: torch.Generator) -> dict[str, torch.Tensor | None]:
    seen = torch.rand(rows, 1, 1, length, generator=generator) > 0.4
    seen[..., -1] = True  # every row sees its new token
    return {
        "none": None,
        "bool": seen,
        "additive": torch.zeros(seen.shape).masked_fill(~seen, torch.finfo(torch.float32).min),
        "shared": seen[:1],  # (1, 1, 1, L): one mask for every row
    }


@pytest.mark.parametrize(
    ("rows", "kv_heads", "groups", "length", "dim"),
    [(3, 2, 2, 9, 16), (2, 3, 3, 130, 64), (1, 3, 3, 64, 24), (4, 1, 5, 200, 32)],
)
@pytest.mark.parametrize("mask", ["none", "bool", "additive", "shared"])
@pytest.mark.parametrize("block", [None, 16])
def test_one_token_queries_attend_as_with_repeated_keys(
    interpreted, rows, kv_heads, groups, length, dim, mask, block
):
    """Groups of 2 to 5 query heads (padded to one 16-row tile), head sizes that are not a power of two,
    the whole cache in one block (the default at these lengths) and across several blocks of 16 positions,
    one cut short at the cache's end; every kind of mask; keys and values as the halves of one tensor (the
    paired cache), so their strides are not their shapes'."""
    generator = torch.Generator().manual_seed(rows * 100 + length)
    query = torch.randn(rows, kv_heads * groups, 1, dim, generator=generator)
    pair = torch.randn(2, rows, kv_heads, length, dim, generator=generator)
    key, value = pair[0], pair[1]
    chosen = _masks(rows, length, generator)[mask]
    grouped = query.reshape(rows, kv_heads, groups, dim)
    out = triton_attention.decode_attention(grouped, key, value, chosen, 0.3, block)
    assert out.shape == (rows, 1, kv_heads * groups, dim) and out.is_contiguous()
    torch.testing.assert_close(out, _reference(query, key, value, chosen, 0.3), rtol=0, atol=2e-5)


def _step(query, key, value, cos, sin, pair, position: int, mask):
    """decode_step of Hugging Face-shaped tensors: query (B, H, 1, D), key and value (B, KV, 1, D), cos and
    sin (B or 1, 1, D); scale 0.3, blocks of 16 positions."""
    rows, heads, _, dim = query.shape
    grouped = query.reshape(rows, key.shape[1], heads // key.shape[1], dim)
    return triton_attention.decode_step(
        grouped,
        key[:, :, 0],
        value[:, :, 0],
        cos[:, 0],
        sin[:, 0],
        pair,
        torch.tensor(position),
        mask,
        0.3,
        16,
    )


@pytest.mark.parametrize(
    ("rows", "kv_heads", "groups", "length", "dim", "position"),
    [(3, 2, 2, 9, 16, 5), (2, 3, 3, 130, 64, 97), (1, 3, 3, 64, 24, 0), (4, 1, 5, 40, 32, 39)],
)
@pytest.mark.parametrize("mask", ["none", "bool", "additive", "shared"])
@pytest.mark.parametrize("shared_rotary", [False, True])
def test_a_step_rotates_writes_and_attends_as_hugging_faces_layer(
    interpreted, rows, kv_heads, groups, length, dim, position, mask, shared_rotary
):
    """decode_step: Hugging Face's rotary embedding of the queries and the new key, the new key and value
    written at ``position`` (nothing else in the cache changes) and attention over the positions up to it,
    across blocks of 16 positions; the first position (nothing cached before), the cache's last; every kind
    of mask; one cos/sin row for every row."""
    generator = torch.Generator().manual_seed(rows * 100 + length)
    query = torch.randn(rows, kv_heads * groups, 1, dim, generator=generator)
    key, value = (torch.randn(rows, kv_heads, 1, dim, generator=generator) for _ in range(2))
    cos, sin = (torch.randn(1 if shared_rotary else rows, 1, dim, generator=generator) for _ in range(2))
    pair = torch.randn(2, rows, kv_heads, length, dim, generator=generator)
    chosen = _masks(rows, length, generator)[mask]
    if chosen is not None:  # the new token is seen; the positions after it are not (the mask of a step)
        chosen = chosen.clone()
        if chosen.dtype == torch.bool:
            chosen[..., position], chosen[..., position + 1 :] = True, False
        else:
            chosen[..., position], chosen[..., position + 1 :] = 0.0, torch.finfo(torch.float32).min
    rotated_query, rotated_key = apply_rotary_pos_emb(query, key, cos, sin)
    expected_pair = pair.clone()
    expected_pair[0, :, :, position], expected_pair[1, :, :, position] = rotated_key[:, :, 0], value[:, :, 0]
    reference_mask = chosen
    if chosen is None:
        reference_mask = (torch.arange(length) <= position).expand(1, 1, 1, length)
    expected = _reference(rotated_query, expected_pair[0], expected_pair[1], reference_mask, 0.3)
    out = _step(query, key, value, cos, sin, pair, position, chosen)
    assert out.shape == (rows, 1, kv_heads * groups, dim)
    torch.testing.assert_close(pair, expected_pair, rtol=0, atol=1e-6)
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-5)


def test_a_step_past_the_caches_end_attends_but_writes_nothing(interpreted):
    """A full cache: the new token is attended from registers after every cached position (with the mask's
    last column for those) and the cache is left as it was (no write past its end)."""
    generator = torch.Generator().manual_seed(7)
    rows, kv_heads, groups, length, dim = 2, 2, 2, 20, 16
    query = torch.randn(rows, kv_heads * groups, 1, dim, generator=generator)
    key, value = (torch.randn(rows, kv_heads, 1, dim, generator=generator) for _ in range(2))
    cos, sin = torch.ones(rows, 1, dim), torch.zeros(rows, 1, dim)  # no rotation
    pair = torch.randn(2, rows, kv_heads, length, dim, generator=generator)
    before = pair.clone()
    seen = torch.ones(rows, 1, 1, length, dtype=torch.bool)
    seen[0, ..., :5] = False
    out = _step(query, key, value, cos, sin, pair, length, seen)
    assert torch.equal(pair, before)
    longer = torch.cat([pair, torch.stack([key, value])], dim=3)
    mask = torch.cat([seen, torch.ones(rows, 1, 1, 1, dtype=torch.bool)], dim=-1)
    torch.testing.assert_close(out, _reference(query, longer[0], longer[1], mask, 0.3), rtol=0, atol=2e-5)


def test_steps_that_do_not_fit_are_refused(interpreted):
    query, key, pair = torch.randn(2, 3, 3, 64), torch.randn(2, 3, 64), torch.zeros(2, 2, 3, 10, 64)
    cos = torch.ones(2, 64)
    at = torch.tensor(4)
    with pytest.raises(ValueError, match="do not fit"):  # odd heads cannot be rotated in halves
        triton_attention.decode_step(
            query[..., :63], key[..., :63], key[..., :63], cos, cos, pair, at, None, 1
        )
    with pytest.raises(ValueError, match="do not fit"):  # a cache of other rows
        triton_attention.decode_step(query, key, key, cos, cos, pair[:, :1], at, None, 1)
    with pytest.raises(ValueError, match="do not fit"):
        triton_attention.decode_step(query, key, key, cos[:, :32], cos[:, :32], pair, at, None, 1)
    with pytest.raises(ValueError, match="do not fit"):
        mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
        triton_attention.decode_step(query, key, key, cos, cos, pair, at, mask, 1)
    assert not pair.any(), "nothing was written"


def test_few_programs_read_the_whole_cache_at_once_and_many_read_small_blocks():
    """Few programs (one row): one block for a short cache (rounded up to a power of two, at least 16
    positions), long caches in blocks of 16,384 key elements: 256 positions at 64 dimensions, 128 at 128 (96
    pads to 128). Many programs (64 rows of 3 key/value heads): blocks of 64 positions."""
    assert triton_attention.block_positions(9, 64, 3) == 16
    assert triton_attention.block_positions(136, 64, 3) == 256
    assert triton_attention.block_positions(256, 64, 32) == 256
    assert triton_attention.block_positions(2048, 64, 3) == 256
    assert triton_attention.block_positions(2048, 96) == triton_attention.block_positions(2048, 128) == 128
    assert triton_attention.block_positions(2048, 24) == 512
    assert (
        triton_attention.block_positions(136, 64, 33) == triton_attention.block_positions(2048, 64, 192) == 64
    )
    assert triton_attention.block_positions(9, 64, 192) == 16


def test_shapes_that_do_not_fit_are_refused(interpreted):
    query, key = torch.randn(1, 3, 3, 64), torch.randn(1, 3, 10, 64)
    with pytest.raises(ValueError, match="do not fit"):
        triton_attention.decode_attention(query, key[..., :32], key[..., :32], None, None)
    with pytest.raises(ValueError, match="do not fit"):
        triton_attention.decode_attention(query, key, key, torch.ones(1, 1, 1, 11, dtype=torch.bool), None)
    for block in (8, 48):
        with pytest.raises(ValueError, match="power of two"):
            triton_attention.decode_attention(query, key, key, None, None, block)


def test_the_model_answers_as_with_sdpa_when_registered(tokenizer, interpreted, monkeypatch):
    """``decode_attention_kernel: triton``: one name of its own, which ``reduced`` does not override; a
    prompt (Hugging Face's sdpa) and a one-token step through the kernel give sdpa's logits."""
    called = []
    launch = triton_attention._launch
    monkeypatch.setattr(triton_attention, "_launch", lambda *a: called.append(1) or launch(*a))
    assert register(kernel="triton") == register(kernel="triton", reduced=True) == f"{NAME}_triton"
    assert register(kernel="triton") not in (NAME, REDUCED)
    model = tiny_llama(tokenizer)
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.randint(0, len(tokenizer), (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row
    with torch.inference_mode():
        reference = model(input_ids=ids, attention_mask=mask, use_cache=True)
        model.config._attn_implementation = register(kernel="triton")
        try:
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            assert not called  # prompts of several tokens stay with sdpa
            longer = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
            step = model(
                input_ids=ids[:, -1:], attention_mask=longer, **{keyword: out.past_key_values}
            ).logits
            assert len(called) == model.config.num_hidden_layers
        finally:
            model.config._attn_implementation = "sdpa"
        expected = model(input_ids=ids[:, -1:], attention_mask=longer, **{keyword: reference.past_key_values})
    torch.testing.assert_close(out.logits, reference.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(step, expected.logits, rtol=0, atol=1e-5)


def test_without_a_gpu_or_the_interpreter_the_library_kernel_runs(tokenizer, monkeypatch):
    """On CPU tensors outside the interpreter, or without the kernel, Triton cannot run: the one-token case
    goes to PyTorch's attention, with the same result."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton_attention, "_launch", lambda *a: pytest.fail("the Triton kernel ran"))
    attention = tiny_llama(tokenizer).model.layers[0].self_attn
    query, key, value = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    out, _ = grouped_sdpa_attention(attention, query, key, value, None, kernel="triton")
    torch.testing.assert_close(out, _reference(query, key, value, None, None), rtol=0, atol=1e-6)
    # a Triton that did not take the kernel (its import-time setup failed): the same, in the interpreter too
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_attention, "_op", None)
    assert not triton_attention.available()
    out, _ = grouped_sdpa_attention(attention, query, key, value, None, kernel="triton")
    torch.testing.assert_close(out, _reference(query, key, value, None, None), rtol=0, atol=1e-6)
