"""A static KV cache whose layers keep their keys and values in one tensor and share one length counter.

Hugging Face's ``StaticLayer`` writes a step's new keys and its new values into two tensors and advances its
own length counter, where a decoding step of a small model on a GPU is bound by how many kernels it
launches. A :class:`PairedLayer` keeps keys and values as the two halves of one (2, B, KV, L, D) tensor,
written with one ``index_copy_``, and the layers of one cache share one counter that only the last layer
advances, after every layer has read it: one counter update per step instead of one per layer. ``keys``,
``values`` and ``cumulative_length`` stay (views of the halves, the shared counter), so whatever reads or
fills a static layer (prompt reuse, ``reset``) works unchanged; only a rewind must move the shared counter
once (:func:`counters`). :func:`pair_layers` swaps them into a ``StaticCache``.
"""

from __future__ import annotations

from typing import Any

import torch

try:  # transformers >= 4.56 builds caches from layers
    from transformers.cache_utils import StaticLayer
except ImportError:  # pragma: no cover - an older transformers: no layers to pair
    StaticLayer = None  # type: ignore[assignment,misc]


class _Counter:
    """The length counter the layers of one cache share, moved to their device once."""

    def __init__(self) -> None:
        self.tensor = torch.tensor(0, dtype=torch.long)

    def on(self, device: torch.device) -> torch.Tensor:
        if self.tensor.device != device:
            self.tensor = self.tensor.to(device)
        return self.tensor


class PairedLayer(StaticLayer if StaticLayer is not None else object):  # type: ignore[misc]
    """A ``StaticLayer`` whose keys and values are the halves of one tensor (:attr:`pair`) and whose length
    counter is shared with the other layers of its cache; only the layer built with ``advances`` (the last
    one a forward pass updates) moves it on. Only for keys and values of one shape and dtype
    (:func:`pair_layers` checks the model's configuration)."""

    def __init__(self, max_cache_len: int, counter: _Counter, *, advances: bool) -> None:
        super().__init__(max_cache_len=max_cache_len)
        self.counter, self.advances = counter, advances
        self.cumulative_length = counter.tensor
        self.pair: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape != value_states.shape or key_states.dtype != value_states.dtype:
            raise ValueError(
                f"paired cache layer: keys {tuple(key_states.shape)} {key_states.dtype} and values "
                f"{tuple(value_states.shape)} {value_states.dtype} differ"
            )
        self.device = key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim = self.v_head_dim = key_states.shape[-1]
        self.pair = torch.zeros(
            (2, self.batch_size, self.num_heads, self.max_cache_len, self.k_head_dim),
            dtype=key_states.dtype,
            device=self.device,
        )
        self.keys, self.values = self.pair[0], self.pair[1]
        self.cumulative_length = self.counter.on(self.device)
        if not torch.compiler.is_compiling():  # fixed addresses: the compiled steps may be recorded
            for tensor in (self.pair, self.keys, self.values, self.cumulative_length):
                torch._dynamo.mark_static_address(tensor)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pair = self.pair
        length = key_states.shape[-2]
        position = torch.arange(length, device=self.device) + self.cumulative_length
        pair.index_copy_(3, position, torch.stack([key_states, value_states]))
        if self.advances:  # the other layers of this pass have read the counter
            self.cumulative_length.add_(length)
        return pair[0], pair[1]

    def reset(self) -> None:
        if self.is_initialized:
            self.pair.zero_()  # one kernel for keys and values
        if self.advances:
            self.cumulative_length.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise RuntimeError("static layers are cropped by a negative count of tokens to remove")
        if self.advances:
            self.cumulative_length.sub_(abs(tokens_to_remove))


def pair_layers(cache: Any, config: Any) -> bool:
    """Replace the layers of ``cache`` (a ``StaticCache`` not yet written) by :class:`PairedLayer` s of the
    same length sharing one counter, where every layer is a plain static one and ``config`` (the model's)
    gives keys and values one width; returns whether it did."""
    layers = getattr(cache, "layers", None)
    if StaticLayer is None or not layers:
        return False
    if any(type(layer) is not StaticLayer or layer.is_initialized for layer in layers):
        return False  # sliding windows, other layer kinds, or already written
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    value_head = getattr(config, "v_head_dim", None) or head
    if value_head != head:
        return False
    counter = _Counter()
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        layers[i] = PairedLayer(layer.max_cache_len, counter, advances=i == last)
    return True


def counters(cache: Any) -> list[torch.Tensor]:
    """The distinct length counters of ``cache``'s layers (one for a paired cache): what a rewind moves."""
    seen: dict[int, torch.Tensor] = {}
    for layer in getattr(cache, "layers", ()):
        seen.setdefault(id(layer.cumulative_length), layer.cumulative_length)
    return list(seen.values())
