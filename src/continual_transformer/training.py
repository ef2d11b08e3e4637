"""Gradient-descent mechanics shared by every strategy that trains weights: examples, batches, one loop.

Documents become training sequences that keep their preceding context (a later window re-reads the end of the
previous one without being scored on it), so a fact is never cut off from its subject. Question-answer pairs
become chat exchanges scored on the answer only -- the format the model is later asked in.

:func:`train` is the one optimisation loop. What a step minimises is pluggable (``loss_fn``, default
:func:`next_token_loss`); an :class:`Example` may carry extra per-example tensors (``extras``, e.g. a
teacher's top-k token ids and log-probabilities per scored position) that :func:`collate` pads and stacks into
the batch, so an objective such as context distillation plugs in without another loop.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from continual_transformer.backbone import Backbone, sequence_nll
from continual_transformer.config import OptimArgs, WindowArgs
from continual_transformer.documents import chunk_spans

logger = logging.getLogger(__name__)

IGNORE = -100

Batch = dict[str, torch.Tensor]
"""A collated batch: ``input_ids``, ``labels``, ``attention_mask`` (B, T) and each example extra (B, N, ...).
"""
LossFn = Callable[[Backbone, Batch], torch.Tensor]
"""Maps the backbone and a batch to a scalar loss with grad (what one step minimises)."""


@dataclass(frozen=True)
class Example:
    """One training sequence; ``labels`` is ``input_ids`` with unscored positions set to -100."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict, compare=False)
    """Extra per-example tensors for a custom loss; :func:`collate` pads each along its first dimension (with
    zeros) to the longest in the batch and stacks them. Every example of a batch must carry the same keys."""

    @property
    def scored_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def text_examples(backbone: Backbone, text: str, *, window: int, context: int) -> list[Example]:
    """Windows of ``window`` tokens over ``text``; each window after the first re-reads ``context`` tokens
    unscored."""
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


def window_examples(backbone: Backbone, text: str, windows: WindowArgs) -> list[Example]:
    """:func:`text_examples` with the windowing of a strategy's ``windows:`` settings."""
    return text_examples(backbone, text, window=windows.window, context=windows.context)


def exchange_examples(backbone: Backbone, pairs: Iterable[tuple[str, str]]) -> list[Example]:
    """Chat exchanges (prompt, answer) scored on the answer tokens only."""
    examples = []
    for prompt, answer in pairs:
        context, completion = backbone.format_exchange(prompt, answer)
        ctx_ids = backbone.tokenizer(context, add_special_tokens=False)["input_ids"]
        out_ids = backbone.tokenizer(completion, add_special_tokens=False)["input_ids"]
        examples.append(Example(tuple(ctx_ids + out_ids), tuple([IGNORE] * len(ctx_ids) + out_ids)))
    return examples


def collate(examples: Sequence[Example], pad_id: int, device: torch.device) -> Batch:
    """Right-padded ``input_ids``, ``labels`` (-100 on padding) and ``attention_mask``, plus the extras."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention[row, :n] = 1
    batch = {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": attention.to(device)}
    keys = set(examples[0].extras)
    if any(set(e.extras) != keys for e in examples):
        raise ValueError("every example of a batch must carry the same extras")
    for key in sorted(keys):
        tensors = [e.extras[key] for e in examples]
        longest = max(t.shape[0] for t in tensors)
        stacked = tensors[0].new_zeros((len(tensors), longest, *tensors[0].shape[1:]))
        for row, tensor in enumerate(tensors):
            stacked[row, : tensor.shape[0]] = tensor
        batch[key] = stacked.to(device)
    return batch


def pack_examples(examples: Sequence[Example], length: int) -> list[Example]:
    """Examples packed into rows of at most ``length`` tokens (first fit, longest first; longer ones alone).

    Each row carries ``extras["position_ids"]``: positions restart at 0 for every example, so the model's
    attention keeps each example to itself (Hugging Face reads restarting positions without an attention mask
    as packed sequences), and the first token of every example is unscored (its predecessor belongs to
    another example). Examples with extras of their own are not packed.
    """
    if any(e.extras for e in examples):
        raise ValueError("examples with extras (e.g. a teacher's distributions) cannot be packed")
    rows: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        n = len(example.input_ids)
        slot = next((i for i, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([example])
            room.append(length - n)
        else:
            rows[slot].append(example)
            room[slot] -= n
    packed = []
    for row in rows:
        ids = [t for e in row for t in e.input_ids]
        labels = [label for e in row for label in (IGNORE, *e.labels[1:])]
        positions = torch.tensor([p for e in row for p in range(len(e.input_ids))])
        packed.append(Example(tuple(ids), tuple(labels), {"position_ids": positions}))
    return packed


def make_optimizer(
    params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "adamw":
        # The fused CUDA kernel updates every tensor in one launch (several times faster for many small
        # tensors).
        fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use adamw or sgd")


def next_token_loss(backbone: Backbone, batch: Batch) -> torch.Tensor:
    """Mean next-token loss over the scored tokens of a batch (a scalar with grad): the default loss."""
    if "position_ids" in batch:  # packed rows (pack_examples): restarting positions, no attention mask
        logits = backbone.model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
    else:
        logits = backbone.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
    nll = sequence_nll(logits, batch["labels"])  # (B, T-1)
    scored = (batch["labels"][:, 1:] != IGNORE).sum().clamp(min=1)
    return nll.sum() / scored


batch_loss = next_token_loss  # the earlier name, used by benchmarks/ttt_throughput.py


def kl_to_reference(reference_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where ``mask`` is set of KL(reference || model) of next-token distributions."""
    ref = torch.log_softmax(reference_logits.float(), dim=-1)
    own = torch.log_softmax(logits.float(), dim=-1)
    kl = (ref.exp() * (ref - own)).sum(-1)  # (B, T)
    mask = mask.bool()
    # where, not a product: a padded position may hold a non-finite value, and nan * 0 is nan.
    return torch.where(mask, kl, 0.0).sum() / mask.sum().clamp(min=1)


@contextmanager
def gradients_on(params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """``requires_grad`` on for ``params`` while inside, off afterwards whatever happens."""
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(False)


def train(
    backbone: Backbone,
    examples: Sequence[Example],
    params: list[torch.nn.Parameter],
    optim: OptimArgs,
    *,
    seed: int = 0,
    loss_fn: LossFn = next_token_loss,
    regularizer: Callable[[], torch.Tensor] | None = None,
    grad_hook: Callable[[list[torch.nn.Parameter]], None] | None = None,
    description: str = "learning",
) -> list[float]:
    """Optimise ``params`` on ``examples`` as ``optim`` says; return every step's loss (``loss_fn`` alone).

    ``seed`` fixes the order the examples are shuffled in each epoch (its own ``random.Random``: no global
    state is read or changed). ``optim.stop_loss`` ends training after the first epoch whose mean loss falls
    below it. ``regularizer()`` is added to every step's loss (e.g. a KL term that anchors the model to its
    base on other text); ``grad_hook(params)`` runs after each backward pass and before clipping (e.g. to mask
    gradients). ``requires_grad`` is switched on for ``params`` during training and off afterwards.
    """
    if not examples:
        return []
    if optim.pack_tokens:
        if any(e.extras for e in examples):
            logger.info("examples with extras are trained unpacked")
        else:
            examples = pack_examples(examples, optim.pack_tokens)
    opt = make_optimizer(params, optim.optimizer, optim.learning_rate, optim.weight_decay)
    rng = random.Random(seed)
    order = list(range(len(examples)))
    batch_size = optim.batch_size
    steps_per_epoch = (len(examples) + batch_size - 1) // batch_size
    losses: list[float] = []
    pad = backbone.tokenizer.pad_token_id
    step_loss = torch.compile(loss_fn, dynamic=False) if optim.compile else loss_fn
    autocast = torch.autocast(backbone.device.type, dtype=torch.bfloat16, enabled=optim.autocast)
    with (
        gradients_on(params),
        backbone.training(),
        tqdm(total=optim.epochs * steps_per_epoch, desc=description, leave=False, disable=None) as bar,
    ):
        for _ in range(optim.epochs):
            rng.shuffle(order)
            epoch_losses: list = []
            for start in range(0, len(order), batch_size):
                batch = collate(
                    [examples[i] for i in order[start : start + batch_size]], pad, backbone.device
                )
                with autocast:
                    loss = step_loss(backbone, batch)
                    total = loss + regularizer() if regularizer is not None else loss
                total.backward()
                if grad_hook is not None:
                    grad_hook(params)
                if optim.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                bar.update(1)
                if optim.fast_steps:
                    epoch_losses.append(loss.detach())  # read once per epoch: no sync per step
                    continue
                epoch_losses.append(loss.item())  # sync: one per step, for the report and the stop rule
                bar.set_postfix(loss=f"{epoch_losses[-1]:.3f}")
            if optim.fast_steps:
                epoch_losses = torch.stack(epoch_losses).float().tolist()  # sync: once per epoch
            losses.extend(epoch_losses)
            if optim.stop_loss and sum(epoch_losses) / len(epoch_losses) < optim.stop_loss:
                break
    return losses
