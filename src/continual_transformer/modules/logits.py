"""Next-token distributions changed at decoding time: a token bias, and the kNN-LM mixture.

Both are ``transformers`` logits processors, passed through ``Backbone.generate(...,
logits_processor=[...])``. They receive the raw next-token logits ``(B, V)`` of the current step and return
scores of the same shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import LogitsProcessor

from continual_transformer.modules.hooks import LayerCapture


def token_bias(
    rows: Sequence[Sequence[int]], vocab_size: int, strength: float, *, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(B, V) float32: ``strength`` on the tokens of ``rows[b]``, 0 elsewhere (ids >= V are ignored)."""
    bias = torch.zeros(len(rows), vocab_size, dtype=torch.float32, device=device)
    for b, ids in enumerate(rows):
        index = torch.tensor(sorted({i for i in ids if 0 <= i < vocab_size}), dtype=torch.long, device=device)
        if index.numel():
            bias[b, index] = strength
    return bias


class TokenBiasProcessor(LogitsProcessor):
    """Adds a fixed per-row bias to the logits of every step (row ``b`` of the batch gets ``bias[b]``)."""

    def __init__(self, bias: torch.Tensor) -> None:
        self.bias = bias  # (B, V') with V' <= V

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        width = min(self.bias.shape[1], scores.shape[1])
        out = scores.clone()
        out[:, :width] += self.bias[:, :width].to(device=scores.device, dtype=scores.dtype)
        return out


def knn_distribution(
    distances: torch.Tensor, values: torch.Tensor, vocab_size: int, temperature: float
) -> torch.Tensor:
    """p_kNN (M, V) float32: softmax of ``-distance / temperature`` over the k neighbours, summed per token.

    ``distances`` and ``values`` are (M, k); neighbours with the same token add up (``scatter_add``).
    """
    weights = torch.softmax(-distances.float() / temperature, dim=-1)
    probs = torch.zeros(distances.shape[0], vocab_size, dtype=torch.float32, device=distances.device)
    return probs.scatter_add_(1, values.long(), weights)


def mix_log_probs(logits: torch.Tensor, p_knn: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """``log((1 - λ) softmax(logits) + λ p_kNN)`` in float32, computed in log space (``logaddexp``).

    ``lam`` is a scalar or (M,) per row; λ = 0 gives ``log_softmax(logits)``.
    """
    lam_t = torch.as_tensor(lam, dtype=torch.float32, device=logits.device)
    if lam_t.ndim == 1:
        lam_t = lam_t[:, None]
    log_lm = torch.log_softmax(logits.float(), dim=-1)
    return torch.logaddexp(torch.log1p(-lam_t) + log_lm, torch.log(lam_t) + torch.log(p_knn))


class KNNMixtureProcessor(LogitsProcessor):
    """Applies ``mix(hidden, logits)`` at each step, with ``hidden`` the last position of a captured layer.

    ``mix`` maps (B, H) hidden states and (B, V) logits to (B, V) scores (log-probabilities of the mixture
    where the kNN part applies, the unchanged logits elsewhere).
    """

    def __init__(
        self, capture: LayerCapture, mix: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> None:
        self.capture = capture
        self.mix = mix

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.capture.hidden is None:
            return scores
        hidden = self.capture.hidden[:, -1, :]
        return self.mix(hidden, scores).to(scores.dtype)
