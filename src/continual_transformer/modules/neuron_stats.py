"""How often each MLP hidden neuron is among a token's most active units, and TF-IDF over those rates.

Sparse memory finetuning (Lin et al. 2025, "Continual Learning via Sparse Memory Finetuning", sec. 3) updates
only the memory slots a batch uses much more than background data does, ranked by TF-IDF: TF counts a slot's
accesses in the batch, IDF is computed from how many background batches access it. Here the slots are the
hidden neurons of an MLP (the input units of ``down_proj`` / ``c_proj``) and a neuron is *used* by a token
when its ``|activation|`` is among that token's top ``k``.

An MLP is dense (every neuron fires a little on every token), so "used at least once in a chunk" saturates for
chunks of more than a few tokens. We therefore count usage as a **rate**:

- ``rate_i(c)`` = fraction of the tokens of chunk ``c`` for which neuron ``i`` is in the top ``k``;
- document frequency ``df_i = sum_c rate_i(c)`` over ``N`` background chunks (a soft count, in ``[0, N]``;
  with one-token chunks it is exactly the classic "chunks that use ``i``");
- ``IDF_i = log((N + 1) / (df_i + 1))``, ``TF_i`` = the document's top-``k`` rate, score = ``TF_i * IDF_i``.

Everything is batched: one forward pre-hook per layer turns a ``(B, T, I)`` activation tensor into per-row
counts with ``topk`` + ``scatter_add``; there is no Python loop over tokens or neurons.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Self

import torch
from torch import nn


def topk_counts(activations: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, how many (unmasked) tokens have each unit among their top ``k`` by ``|activation|``.

    ``activations`` (B, T, I); ``mask`` (B, T), 1 for real tokens. Returns float32 (B, I).
    """
    b, _, units = activations.shape
    index = activations.detach().abs().topk(min(k, units), dim=-1).indices  # (B, T, k)
    weight = torch.ones(index.shape, dtype=torch.float32, device=activations.device)
    if mask is not None:
        weight = weight * mask[:, :, None].to(torch.float32)  # padding counts for nothing
    counts = torch.zeros(b, units, dtype=torch.float32, device=activations.device)
    return counts.scatter_add_(1, index.reshape(b, -1), weight.reshape(b, -1))  # (B, I)


class UsageAccumulator:
    """Running top-``k`` usage of one layer's neurons over rows (chunks) of tokens."""

    def __init__(self, units: int, k: int, device: torch.device) -> None:
        self.k = k
        self.hits = torch.zeros(units, dtype=torch.float32, device=device)
        """Tokens for which each unit was in the top k (summed over all rows)."""
        self.rate_sum = torch.zeros(units, dtype=torch.float32, device=device)
        """Sum over rows of each unit's top-k rate in the row: the soft document frequency."""
        self.rows = 0
        self.tokens = torch.zeros((), dtype=torch.float32, device=device)

    def add(self, activations: torch.Tensor, mask: torch.Tensor | None) -> None:
        counts = topk_counts(activations, self.k, mask)  # (B, I)
        if mask is not None:
            lengths = mask.sum(1).to(torch.float32)  # (B,)
        else:
            lengths = torch.full((counts.shape[0],), float(activations.shape[1]), device=counts.device)
        self.hits += counts.sum(0)
        self.rate_sum += (counts / lengths.clamp(min=1)[:, None]).sum(0)  # empty rows have zero counts
        self.rows += counts.shape[0]  # padding rows never occur: callers batch real chunks only
        self.tokens += lengths.sum()

    @property
    def rate(self) -> torch.Tensor:
        """Each unit's top-k rate over all tokens seen (the TF of a document)."""
        return self.hits / self.tokens.clamp(min=1)


class UsageRecorder:
    """Forward pre-hooks on output projections that accumulate their input's top-``k`` usage.

    Set :attr:`mask` to the batch's attention mask before each forward so padding is ignored.
    """

    def __init__(self, projections: Sequence[nn.Module], units: Sequence[int], k: Sequence[int]) -> None:
        self.projections = list(projections)
        self.accumulators = [
            UsageAccumulator(n, kk, next(p.parameters()).device)
            for p, n, kk in zip(self.projections, units, k)
        ]
        self.mask: torch.Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> Self:
        for projection, accumulator in zip(self.projections, self.accumulators):
            self._handles.append(projection.register_forward_pre_hook(self._hook(accumulator)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, accumulator: UsageAccumulator):
        def hook(module: nn.Module, args: tuple) -> None:
            accumulator.add(args[0], self.mask)

        return hook


@torch.no_grad()
def record_usage(
    model: nn.Module,
    rows: Sequence[Sequence[int]],
    projections: Sequence[nn.Module],
    units: Sequence[int],
    k: Sequence[int],
    *,
    pad_id: int,
    batch_size: int = 16,
) -> list[UsageAccumulator]:
    """Run ``model`` over token-id rows (right-padded batches) and return each projection's usage."""
    device = next(model.parameters()).device
    recorder = UsageRecorder(projections, units, k)
    with recorder:
        for start in range(0, len(rows), batch_size):
            batch = [list(r) for r in rows[start : start + batch_size] if len(r) > 0]
            if not batch:
                continue
            width = max(len(r) for r in batch)
            ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in batch], device=device)  # (B, T)
            mask = torch.tensor(
                [[1] * len(r) + [0] * (width - len(r)) for r in batch], device=device
            )  # (B, T)
            recorder.mask = mask
            model(input_ids=ids, attention_mask=mask)
    return recorder.accumulators


def inverse_document_frequency(df: torch.Tensor, chunks: float) -> torch.Tensor:
    """``log((N + 1) / (df + 1))``: 0 when every chunk uses a neuron fully, ``log(N + 1)`` when none does."""
    return torch.log(
        torch.as_tensor(chunks + 1.0, dtype=torch.float32, device=df.device) / (df.float() + 1.0)
    )


def tfidf_scores(tf: torch.Tensor, df: torch.Tensor, chunks: float) -> torch.Tensor:
    return tf.float() * inverse_document_frequency(df, chunks)


def top_neurons(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask (I,) of the ``count`` highest scores; ties go to the lower index (a stable sort)."""
    order = torch.sort(scores, descending=True, stable=True).indices[: max(0, min(count, scores.numel()))]
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[order] = True
    return mask


def active_units(units: int, fraction: float) -> int:
    """Top-k size for a fraction of a layer's neurons (at least one)."""
    return max(1, min(units, math.ceil(fraction * units)))
