"""Gradient-descent mechanics shared by every strategy that trains weights.

Documents become training sequences that keep their preceding context (a later window re-reads the end of the
previous one without being scored on it), so a fact is never cut off from its subject. Question-answer pairs
become chat exchanges scored on the answer only — the format the model is later asked in.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from continual_transformer.backbone import Backbone, sequence_nll
from continual_transformer.documents import chunk_spans

logger = logging.getLogger(__name__)

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One training sequence; ``labels`` is ``input_ids`` with unscored positions set to -100."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def scored_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def text_examples(backbone: Backbone, text: str, *, window: int, context: int) -> list[Example]:
    """Windows of ``window`` tokens over ``text``; each window after the first re-reads ``context`` tokens unscored."""
    ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = backbone.tokenizer.bos_token_id
    # A leading BOS gives the first tokens of a document a position-0 context, as in pretraining.
    prefix = [bos] if bos is not None and backbone.tokenizer.chat_template is None else []
    examples = []
    for i, (start, end) in enumerate(chunk_spans(len(ids), window, context)):
        piece = ids[start:end]
        unscored = 0 if i == 0 else context
        input_ids = (prefix if i == 0 else []) + piece
        labels = ([IGNORE] * len(prefix) if i == 0 else []) + [IGNORE] * unscored + piece[unscored:]
        examples.append(Example(tuple(input_ids), tuple(labels)))
    return examples


def exchange_examples(backbone: Backbone, pairs: Iterable[tuple[str, str]]) -> list[Example]:
    """Chat exchanges (prompt, answer) scored on the answer tokens only."""
    examples = []
    for prompt, answer in pairs:
        context, completion = backbone.format_exchange(prompt, answer)
        ctx_ids = backbone.tokenizer(context, add_special_tokens=False)["input_ids"]
        out_ids = backbone.tokenizer(completion, add_special_tokens=False)["input_ids"]
        examples.append(Example(tuple(ctx_ids + out_ids), tuple([IGNORE] * len(ctx_ids) + out_ids)))
    return examples


def collate(examples: Sequence[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention[row, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": attention.to(device)}


def make_optimizer(
    params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "adamw":
        # The fused CUDA kernel updates every tensor in one launch (several times faster for many small tensors).
        fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use adamw or sgd")


def batch_loss(backbone: Backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over the scored tokens of a batch (a scalar tensor with grad)."""
    logits = backbone.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    nll = sequence_nll(logits, batch["labels"])  # (B, T-1)
    scored = (batch["labels"][:, 1:] != IGNORE).sum().clamp(min=1)
    return nll.sum() / scored


def kl_to_reference(reference_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over positions where ``mask`` is set of KL(reference || model) between next-token distributions."""
    ref = torch.log_softmax(reference_logits.float(), dim=-1)
    own = torch.log_softmax(logits.float(), dim=-1)
    kl = (ref.exp() * (ref - own)).sum(-1)  # (B, T)
    mask = mask.bool()
    # where, not a product: a padded position may hold a non-finite value, and nan * 0 is nan.
    return torch.where(mask, kl, 0.0).sum() / mask.sum().clamp(min=1)


def train(
    backbone: Backbone,
    examples: Sequence[Example],
    params: list[torch.nn.Parameter],
    *,
    optimizer: str = "adamw",
    learning_rate: float = 1e-4,
    weight_decay: float = 0.0,
    epochs: int = 1,
    batch_size: int = 8,
    max_grad_norm: float | None = 1.0,
    stop_loss: float | None = None,
    seed: int = 0,
    grad_hook=None,
    regularizer: Callable[[], torch.Tensor] | None = None,
    description: str = "learning",
) -> list[float]:
    """Optimise ``params`` on ``examples``; return the loss of every step (the examples' loss alone).

    ``stop_loss`` ends training after the first epoch whose mean loss falls below it. ``grad_hook(params)`` runs
    after each backward pass (e.g. to mask gradients) and before clipping. ``regularizer()`` is added to every
    step's loss (e.g. a KL term that anchors the model to its base on other text).
    """
    if not examples:
        return []
    opt = make_optimizer(params, optimizer, learning_rate, weight_decay)
    rng = random.Random(seed)
    order = list(range(len(examples)))
    steps_per_epoch = (len(examples) + batch_size - 1) // batch_size
    losses: list[float] = []
    pad = backbone.tokenizer.pad_token_id
    with (
        backbone.training(),
        tqdm(total=epochs * steps_per_epoch, desc=description, leave=False, disable=None) as bar,
    ):
        for _ in range(epochs):
            rng.shuffle(order)
            epoch_losses = []
            for start in range(0, len(order), batch_size):
                batch = collate(
                    [examples[i] for i in order[start : start + batch_size]], pad, backbone.device
                )
                loss = batch_loss(backbone, batch)
                (loss + regularizer() if regularizer is not None else loss).backward()
                if grad_hook is not None:
                    grad_hook(params)
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                epoch_losses.append(loss.item())  # sync: one per step, for the report and the stop rule
                bar.update(1)
                bar.set_postfix(loss=f"{epoch_losses[-1]:.3f}")
            losses.extend(epoch_losses)
            if stop_loss is not None and sum(epoch_losses) / len(epoch_losses) < stop_loss:
                break
    return losses
