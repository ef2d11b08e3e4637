"""Layer specs, hidden size and LoRA target discovery (continual_transformer.layers)."""

from __future__ import annotations

import pytest
from conftest import tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from continual_transformer.backbone import find_decoder_layers
from continual_transformer.errors import ConfigError
from continual_transformer.layers import (
    check_layer_spec,
    hidden_size,
    is_transposed,
    layer_index,
    projection_targets,
    select_layers,
)


@pytest.mark.parametrize(
    ("spec", "n", "expected"),
    [
        ("all", 4, [0, 1, 2, 3]),
        ("-2:", 4, [2, 3]),
        ("1:3", 4, [1, 2]),
        (":1", 4, [0]),
        ("-1", 4, [3]),
        ("0", 4, [0]),
        (" 2 ", 4, [2]),
        ("25%", 30, list(range(22, 30))),  # round(7.5) = 8
        ("25%", 4, [3]),
        ("1%", 4, [3]),  # at least one layer
        ("100%", 3, [0, 1, 2]),
    ],
)
def test_select_layers(spec, n, expected):
    assert select_layers(spec, n) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("5", "out of range"),
        ("-5", "out of range"),
        ("top", "is not"),
        ("3:1", "selects no layer"),
        ("", "is not"),
    ],
)
def test_select_layers_refuses_bad_specs_naming_the_key(spec, message):
    with pytest.raises(ConfigError, match=f"strategies.x.layers: .*{message}"):
        select_layers(spec, 4, "strategies.x.layers")


@pytest.mark.parametrize("spec", ["0%", "101%", "1e3", "a:b"])
def test_check_layer_spec_without_a_model(spec):
    with pytest.raises(ConfigError, match="k.layers"):
        check_layer_spec(spec, "k.layers")
    check_layer_spec("-8:", "k.layers")


def test_layer_index():
    assert layer_index(-1, 4) == 3 and layer_index(2, 4) == 2
    with pytest.raises(ConfigError, match="key_layer: 4 out of range for 4 layers"):
        layer_index(4, 4, "key_layer")


def test_hidden_size_of_both_architectures(tokenizer):
    assert hidden_size(tiny_llama(tokenizer)) == 64  # config.hidden_size
    assert hidden_size(tiny_gpt2(tokenizer)) == 64  # config.n_embd

    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 12)

        def get_input_embeddings(self):
            return self.embed

    assert hidden_size(Bare()) == 12


def test_projection_targets_on_linear_and_conv1d_models(tokenizer):
    llama = tiny_llama(tokenizer)
    targets = projection_targets(llama, find_decoder_layers(llama), [3])
    suffixes = {t.rsplit(".", 1)[1] for t in targets}
    assert suffixes == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(t.startswith("model.layers.3.") for t in targets) and not is_transposed(llama, targets)

    gpt2 = tiny_gpt2(tokenizer)
    targets = projection_targets(gpt2, find_decoder_layers(gpt2), [0, 2])
    assert len(targets) == 8 and all(isinstance(gpt2.get_submodule(t), Conv1D) for t in targets)
    assert {t.split(".")[2] for t in targets} == {"0", "2"}
    assert is_transposed(gpt2, targets)
    assert projection_targets(gpt2, find_decoder_layers(gpt2), []) == []
