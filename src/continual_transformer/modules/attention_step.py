"""A Llama attention layer's one-token decoding step as one kernel: rotary embedding, cache write, attention.

Hugging Face's attention layer rotates the new token's queries and key, writes the key and value into the
cache, then calls the attention function. Compiled for one token per row, that is three kernels besides the
products: the queries' rotation (with the mask), the key's rotation with the cache write, and the
attention. :class:`AttentionSteps` stands in a forward of its own for each Llama attention layer while the
compiled decoding steps run: for one new token per row over a paired cache
(:class:`~continual_transformer.modules.paired_cache.PairedLayer`) it computes the products as the layer
does and hands everything between them to :func:`~continual_transformer.modules.triton_attention.decode_step`,
one Triton kernel; every other call (prompts, other caches, training) runs the layer's own forward.

Only layers whose forward is Hugging Face's ``LlamaAttention.forward`` are stood in for: the step repeats
what that forward computes and nothing else (no query/key norms, sliding windows or sinks), so a strategy
that replaced or subclassed the layer keeps its own.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from continual_transformer.modules import triton_attention
from continual_transformer.modules.paired_cache import PairedLayer


def _llama_forward() -> Any:
    try:
        from transformers.models.llama.modeling_llama import LlamaAttention
    except ImportError:  # pragma: no cover - a transformers without Llama
        return None
    return LlamaAttention.forward


def eligible(module: nn.Module) -> bool:
    """Whether ``module`` is an attention layer whose forward is Hugging Face's Llama one, with even heads."""
    forward = _llama_forward()
    return (
        forward is not None
        and getattr(type(module), "forward", None) is forward
        and int(getattr(module, "head_dim", 1)) % 2 == 0
        and all(
            isinstance(getattr(module, n, None), nn.Module) for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        )
    )


def step_forward(module: nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """``module``'s forward, called as a Llama attention layer is (hidden states, position embeddings, mask
    and cache, the cache named ``cache`` or ``past_key_values`` by the transformers version): one new token
    per row over a written paired cache layer as one kernel between the products; anything else goes to the
    layer's own forward as it came."""
    named = dict(zip(("hidden_states", "position_embeddings", "attention_mask", "cache"), args))
    hidden_states = named.get("hidden_states", kwargs.get("hidden_states"))
    position_embeddings = named.get("position_embeddings", kwargs.get("position_embeddings"))
    attention_mask = named.get("attention_mask", kwargs.get("attention_mask"))
    cache = named.get("cache", kwargs.get("cache", kwargs.get("past_key_values")))
    layers = getattr(cache, "layers", None)
    layer = layers[module.layer_idx] if layers is not None and module.layer_idx < len(layers) else None
    if (
        hidden_states is None
        or hidden_states.dim() != 3
        or hidden_states.shape[1] != 1
        or not isinstance(layer, PairedLayer)
        or not layer.is_initialized
        or position_embeddings is None
        or position_embeddings[0].dim() != 3
        or position_embeddings[0].shape[-1] != module.head_dim  # a partial rotary embedding
        or (module.training and module.attention_dropout)
        or kwargs.get("output_attentions")
        or (attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1:3] != (1, 1)))
        or not triton_attention.step_runs(hidden_states)
    ):
        return type(module).forward(module, *args, **kwargs)
    rows, dim, groups = hidden_states.shape[0], module.head_dim, module.num_key_value_groups
    query = module.q_proj(hidden_states).view(rows, -1, groups, dim)  # (B, KV, G, D)
    key = module.k_proj(hidden_states).view(rows, -1, dim)  # (B, KV, D)
    value = module.v_proj(hidden_states).view(rows, -1, dim)
    cos, sin = position_embeddings  # (B or 1, 1, D)
    out = triton_attention.decode_step(
        query,
        key,
        value,
        cos[:, -1],
        sin[:, -1],
        layer.pair,
        layer.cumulative_length,
        attention_mask,
        module.scaling,
    )
    if layer.advances:  # after every layer of the pass read the counter
        layer.cumulative_length.add_(1)
    return module.o_proj(out.reshape(rows, 1, -1)), None


class AttentionSteps:
    """Stands :func:`step_forward` in for each eligible attention layer (an instance attribute, the same
    object at every install, so a compiled step's guards hold) and takes it out again."""

    def __init__(self) -> None:
        self._walk: tuple[nn.Module, ...] | None = None
        self._forwards: dict[int, tuple[nn.Module, partial]] = {}  # by id: each eligible module's forward
        self.installed: list[nn.Module] = []

    def install(self, modules: tuple[nn.Module, ...]) -> int:
        """Stand in for every eligible module of ``modules`` (a model's walk: the eligible ones are looked
        for again only when it is another tuple); returns how many."""
        self.remove()
        if modules is not self._walk:
            kept = self._forwards
            self._forwards = {}
            for module in modules:
                known = kept.get(id(module))
                if known is not None and known[0] is module:
                    self._forwards[id(module)] = known
                elif eligible(module):
                    self._forwards[id(module)] = (module, partial(step_forward, module))
            self._walk = modules
        for module, forward in self._forwards.values():
            module.__dict__["forward"] = forward
            self.installed.append(module)
        return len(self.installed)

    def remove(self) -> None:
        """Put each layer's own forward back."""
        for module in self.installed:
            module.__dict__.pop("forward", None)
        self.installed = []
