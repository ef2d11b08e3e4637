"""Generative classification: score every candidate label's tokens after the prompt, pick the most likely.

The score of a label is its length-normalised log-likelihood (mean log-probability of its answer tokens, the
end-of-turn token included, so a label that is a prefix of another is not favoured). The prompt is run once
with a key/value cache; the cache rows are then repeated for each candidate and all candidates of all prompts
continue in one forward pass: ``B`` prompt passes plus ``sum_b K_b`` short continuations, instead of
``sum_b K_b`` full sequences. No Python loop over labels or examples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F

from continual_transformer.backbone import Backbone
from continual_transformer.tasks.prompts import (
    cache_kwarg,
    common_prefix,
    output_cache,
    prefixed_forward,
    to_device,
)

Select = Callable[[torch.Tensor], AbstractContextManager]
"""``select(rows)`` attaches the adapters for a forward pass whose rows belong to prompts ``rows`` (CPU,
(N,))."""


@torch.no_grad()
def score_candidates(
    backbone: Backbone,
    prompts: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[Sequence[int]]],
    select: Select,
    *,
    share_prefix: bool = False,
) -> list[torch.Tensor]:
    """Mean log-likelihood (float32, CPU) of each candidate continuation of each prompt.

    ``candidates[b]`` are the token sequences scored after ``prompts[b]``; returns one (K_b,) tensor per
    prompt.
    ``share_prefix=True`` says every prompt runs with the same adapter, so their common prefix (system prompt,
    instruction, label list) is computed once.
    """
    model, device = backbone.model, backbone.device
    pad = int(backbone.tokenizer.pad_token_id)
    batch = len(prompts)
    shared = common_prefix(prompts) if share_prefix else 0
    with select(torch.arange(batch)):
        last, output, mask = prefixed_forward(
            model, prompts, pad, device, keep=1, shared=shared, use_cache=True
        )
    first_logp = F.log_softmax(last[:, -1].float(), dim=-1)  # (B, V), fp32 softmax

    counts = torch.tensor([len(c) for c in candidates])
    owner = torch.repeat_interleave(torch.arange(batch), counts)  # (N,) prompt of each candidate row
    flat = [list(tokens) for group in candidates for tokens in group]
    width = max(len(t) for t in flat)
    cand = torch.full((len(flat), width), pad, dtype=torch.long)
    cand_mask = torch.zeros((len(flat), width), dtype=torch.bool)
    for row, tokens in enumerate(flat):
        cand[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        cand_mask[row, : len(tokens)] = True
    cand, cand_mask, owner_dev = (
        to_device(cand, device),
        to_device(cand_mask, device),
        to_device(owner, device),
    )

    total = first_logp[owner_dev, cand[:, 0]]  # (N,)
    if width > 1:
        cache = output_cache(output)
        cache.batch_select_indices(owner_dev)  # repeat each prompt's cache rows for its candidates
        cont_ids = cand[:, :-1]  # (N, C-1): inputs whose next tokens are cand[:, 1:]
        cont_mask = torch.cat([mask[owner_dev], cand_mask[:, :-1].long()], dim=1)  # (N, P + C - 1)
        cont_pos = mask.sum(-1)[owner_dev, None] + torch.arange(width - 1, device=device)  # (N, C-1)
        with select(owner):
            logits = model(
                input_ids=cont_ids,
                attention_mask=cont_mask,
                position_ids=cont_pos,
                use_cache=False,
                **{cache_kwarg(model): cache},
            ).logits  # (N, C-1, V)
        logp = token_logprobs(logits, cand[:, 1:])  # (N, C-1)
        total = total + torch.where(cand_mask[:, 1:], logp, 0.0).sum(-1)
    scores = (total / cand_mask.sum(-1)).float().cpu()  # sync: results leave the device
    return list(torch.split(scores, counts.tolist()))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """log p(target) per position (N, T) in float32, ``rows`` rows at a time so the fp32 copy of the logits
    stays small (N can be prompts x labels, each with a 50k-entry vocabulary)."""
    out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], rows):
        chunk = logits[start : start + rows].float()  # (n, T, V)
        picked = chunk.gather(-1, targets[start : start + rows, :, None]).squeeze(-1)
        out[start : start + rows] = picked - torch.logsumexp(chunk, dim=-1)
    return out
