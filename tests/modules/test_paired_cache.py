"""The paired static KV cache (modules.paired_cache) against Hugging Face's static cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_backbone, tiny_llama
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from continual_transformer.modules.paired_cache import PairedLayer, counters, pair_layers


def _passes(model, cache, ids):
    """A prompt pass of all but the last two tokens, then one step per token; the logits of each."""
    out = [model(input_ids=ids[:, :-2], cache=cache, use_cache=True).logits]
    width = ids.shape[1] - 2
    for i in range(2):
        position = torch.full((ids.shape[0], 1), width + i)
        out.append(
            model(input_ids=ids[:, width + i : width + i + 1], position_ids=position, cache=cache).logits
        )
    return out


def test_a_paired_cache_holds_and_answers_what_the_static_cache_does(tokenizer):
    model = tiny_llama(tokenizer)
    ids = torch.randint(5, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    plain = StaticCache(config=model.config, max_cache_len=16)
    paired = StaticCache(config=model.config, max_cache_len=16)
    assert pair_layers(paired, model.config)
    layers = paired.layers
    assert all(type(layer) is PairedLayer for layer in layers)
    assert len(counters(paired)) == 1 and len(counters(plain)) == len(plain.layers)
    assert [layer.advances for layer in layers] == [False] * (len(layers) - 1) + [True]
    with torch.no_grad():
        expected, got = _passes(model, plain, ids), _passes(model, paired, ids)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(plain.layers, layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=0)
        torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)
        assert b.keys.data_ptr() == b.pair.data_ptr()  # the halves of one tensor
        assert b.values.data_ptr() == b.pair[1].data_ptr()
        assert b.cumulative_length is layers[0].cumulative_length
    assert int(layers[0].cumulative_length) == 9 == int(plain.layers[0].cumulative_length)
    assert paired.get_seq_length() == 9

    layers[-1].crop(-3)  # a rewind moves the shared counter once
    assert int(layers[0].cumulative_length) == 6
    paired.reset()
    assert int(layers[0].cumulative_length) == 0
    assert all(not layer.pair.any() for layer in layers)


def test_only_plain_unwritten_static_layers_of_one_width_are_paired(tokenizer):
    model = tiny_llama(tokenizer)
    written = StaticCache(config=model.config, max_cache_len=8)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6]]), cache=written, use_cache=True)
    assert not pair_layers(written, model.config)
    assert all(type(layer) is StaticLayer for layer in written.layers)

    config = model.config.__class__.from_dict({**model.config.to_dict(), "v_head_dim": 8})
    assert not pair_layers(StaticCache(config=model.config, max_cache_len=8), config)


def test_keys_and_values_of_different_shapes_are_refused(tokenizer):
    model = tiny_llama(tokenizer)
    cache = StaticCache(config=model.config, max_cache_len=8)
    assert pair_layers(cache, model.config)
    with pytest.raises(ValueError, match="differ"):
        cache.layers[0].update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 8))


@pytest.mark.parametrize("backend", ["static", "compiled"])
def test_the_lean_loop_answers_alike_with_and_without_pairs(tokenizer, backend):
    backbone = make_backbone(tokenizer, max_new_tokens=6)
    prompts = ["the river is", "a b c d e f"]
    answers = {}
    for pair in (False, True):
        backbone.generation = dataclasses.replace(backbone.generation, backend=backend, paired_cache=pair)
        answers[pair] = backbone.generate(prompts, chat=False), backbone.generate(prompts[:1], chat=False)
        cache, _ = next(iter(backbone._lean_caches.values()))
        assert all(type(layer) is (PairedLayer if pair else StaticLayer) for layer in cache.layers)
    assert answers[True] == answers[False]
