"""Decoding attention that reads each key/value head once for its group of query heads.

With grouped-query attention (SmolLM2: 9 query heads, 3 key/value heads) Hugging Face's ``sdpa`` attention,
when compiled, repeats the cached keys and values to one copy per query head before the product: two copies
of the whole cache per layer and step (at 64 rows and 136 positions, ~20 MB per layer), two more kernels per
layer. For one new token per row the repeat is not needed: a key/value head's query heads are its queries
(B, KV, G, D), which is what Hugging Face does uncompiled (``pack_gqa``). :func:`grouped_sdpa_attention`
does that for one-token queries whose mask is shared by the heads and hands everything else to Hugging Face's
``sdpa`` attention; :func:`register` makes it a named attention implementation. The one-token case runs a
library kernel (PyTorch's choice or one of :data:`KERNELS`), generated reductions (:func:`reduced_attention`)
or one Triton kernel (:data:`TRITON`, :mod:`~continual_transformer.modules.triton_attention`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

NAME = "ctt_grouped_sdpa"
"""The attention implementation's name (``config._attn_implementation``) once :func:`register` ran."""

REDUCED = "ctt_grouped_reduced"
"""The name of the same attention with the one-token case computed by :func:`reduced_attention`."""

KERNELS = {
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
"""Library kernels the one-token case may be held to (:func:`register`'s ``kernel``; ``auto`` or
``library``: PyTorch picks)."""

TRITON = "triton"
"""The kernel name of :func:`~continual_transformer.modules.triton_attention.decode_attention` (one Triton
kernel for the one-token case, on a GPU; elsewhere PyTorch's choice)."""


def names() -> tuple[str, ...]:
    """Every name :func:`register` may return."""
    return (NAME, REDUCED, *(f"{NAME}_{kernel}" for kernel in (*KERNELS, TRITON)))


def grouped_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Hugging Face's attention-function signature: query (B, H, T, D), key and value (B, KV, L, D), mask
    (B, 1, T, L) or ``None``; returns (B, T, H, D) and no weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    reduced = kwargs.pop("reduced", False)  # (:data:`REDUCED`) one-token queries by reduced_attention
    kernel = kwargs.pop("kernel", "auto")  # the library kernel of one-token queries (:data:`KERNELS`)
    groups = int(getattr(module, "num_key_value_groups", 1))
    rows, heads, length, dim = query.shape
    if (
        length != 1
        or groups == 1
        or dropout
        or kwargs.get("position_bias") is not None
        or (attention_mask is not None and attention_mask.shape[1] != 1)
    ):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    grouped = query.reshape(rows, heads // groups, groups, dim)  # (B, KV, G, D): one row per query head
    if kernel == TRITON and _triton_runs(query):
        from continual_transformer.modules.triton_attention import decode_attention

        return decode_attention(grouped, key, value, attention_mask, scaling), None
    if reduced and torch.compiler.is_compiling():  # generated reductions; uncompiled, the library kernel
        out = reduced_attention(grouped, key, value, attention_mask, scaling)
    elif kernel in KERNELS:
        with sdpa_kernel([KERNELS[kernel]]):
            out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    else:
        out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(rows, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None  # (B, 1, H, D)


def reduced_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """Attention of query rows (B, KV, G, D) over keys and values (B, KV, L, D) written as multiplies, sums
    and a softmax, in float32: compiled for one new token per row, a few generated reduction kernels in
    place of a library attention kernel (and its workspace) that is mostly launch at this size. ``mask``:
    (B, 1, 1, L) additive or boolean (True: attend)."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (query.float().unsqueeze(-2) * key.float().unsqueeze(2)).sum(-1) * scale  # (B, KV, G, L)
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else scores + mask
    weights = scores.softmax(-1)
    return (weights.unsqueeze(-1) * value.float().unsqueeze(2)).sum(-2).to(query.dtype)  # (B, KV, G, D)


def _triton_runs(query: torch.Tensor) -> bool:
    """Whether the Triton kernel can run on ``query``'s device: a CUDA device with Triton installed, or
    Triton's interpreter (CPU tensors)."""
    from continual_transformer.modules import triton_attention

    return triton_attention.available() and (query.is_cuda or triton_attention.interpreting())


def register(*, reduced: bool = False, kernel: str = "auto") -> str:
    """Register :func:`grouped_sdpa_attention` (and ``sdpa``'s mask) under :data:`NAME`, or with ``reduced``
    the same with :func:`reduced_attention` for one-token queries under :data:`REDUCED`, or with a
    ``kernel`` of :data:`KERNELS` the one-token case held to that library kernel under ``NAME_<kernel>``, or
    with ``kernel`` :data:`TRITON` (which ``reduced`` does not override) the one Triton kernel under
    ``NAME_triton``; returns the name (each its own, so a compiled step traced with one is not reused for
    another)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if kernel == TRITON:
        name, function = f"{NAME}_{TRITON}", partial(grouped_sdpa_attention, kernel=TRITON)
    elif reduced:
        name, function = REDUCED, partial(grouped_sdpa_attention, reduced=True)
    elif kernel in KERNELS:
        name, function = f"{NAME}_{kernel}", partial(grouped_sdpa_attention, kernel=kernel)
    else:
        name, function = NAME, grouped_sdpa_attention
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
