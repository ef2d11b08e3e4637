"""Gradient-descent mechanics shared by every strategy that trains weights: examples, batches, one loop.

Documents become training sequences that keep their preceding context (a later window re-reads the end of the
previous one without being scored on it), so a fact is never cut off from its subject. Question-answer pairs
become chat exchanges scored on the answer only -- the format the model is later asked in.

:func:`train` is the one optimisation loop. What a step minimises is pluggable (``loss_fn``, default
:func:`next_token_loss`); an :class:`Example` may carry extra per-example tensors (``extras``, e.g. a
teacher's top-k token ids and log-probabilities per scored position) that :func:`collate` pads and stacks into
the batch, so an objective such as context distillation plugs in without another loop.

An :class:`Anchor` keeps the model's next-token distributions on fixed rows (background text) close to a
reference's (the base model's): its rows ride in the same forward pass as the step's examples, and the
reference's logits of those rows are computed once and kept (:class:`ReferenceLogits`), since the reference
does not change while the model trains against it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from continual_transformer.backbone import Backbone, sequence_nll, varying_shape_attention
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


def text_examples(
    backbone: Backbone, text: str, *, window: int, context: int, ids: Sequence[int] | None = None
) -> list[Example]:
    """Windows of ``window`` tokens over ``text``; each window after the first re-reads ``context`` tokens
    unscored. ``ids``: the text's :meth:`~Backbone.token_ids` when the caller has them (not tokenised
    again)."""
    ids = list(ids) if ids is not None else backbone.token_ids(text)
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


def window_examples(
    backbone: Backbone, text: str, windows: WindowArgs, ids: Sequence[int] | None = None
) -> list[Example]:
    """:func:`text_examples` with the windowing of a strategy's ``windows:`` settings."""
    return text_examples(backbone, text, window=windows.window, context=windows.context, ids=ids)


def exchange_examples(backbone: Backbone, pairs: Iterable[tuple[str, str]]) -> list[Example]:
    """Chat exchanges (prompt, answer) scored on the answer tokens only."""
    examples = []
    for prompt, answer in pairs:
        context, completion = backbone.format_exchange(prompt, answer)
        ctx_ids = backbone.tokenizer(context, add_special_tokens=False)["input_ids"]
        out_ids = backbone.tokenizer(completion, add_special_tokens=False)["input_ids"]
        examples.append(Example(tuple(ctx_ids + out_ids), tuple([IGNORE] * len(ctx_ids) + out_ids)))
    return examples


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU ``tensor`` on ``device``. To a GPU through pinned memory, without waiting: a copy from pageable
    memory makes the host wait until the GPU has run everything queued, and a model this small is bound by
    the host launching kernels, so each such wait leaves the GPU idle while the next step is launched."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def right_aligned(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` as one (B, T) tensor on ``device``, each row at the right end after ``pad_id`` padding, and
    the rows' lengths (B,) there (:func:`padded`: one flat list, one transfer; a step of a few hundred rows
    would otherwise make and send a tensor per row)."""
    ids, mask = padded(rows, pad_id, device)
    return ids, mask.sum(1)


def padded(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device, *, side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` padded with ``pad_id`` on ``side`` (``left`` or ``right``) to the longest, and the attention
    mask (1 on tokens), each (B, T) on ``device``: made from one flat list and sent in one transfer."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', not {side!r}")
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    width = int(lengths.max()) if len(rows) else 0
    columns = torch.arange(width)[None, :]
    filled = columns >= (width - lengths)[:, None] if side == "left" else columns < lengths[:, None]
    packed = torch.full((2, len(rows), width), pad_id, dtype=torch.long)
    packed[0][filled] = torch.tensor([t for row in rows for t in row], dtype=torch.long)  # row-major
    packed[1] = filled
    packed = to_device(packed, device)
    return packed[0], packed[1]


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device, *, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids, attention mask and position ids (each (B, T), on ``device``); positions count real
    tokens from ``offset``."""
    ids, mask = padded(rows, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0) + offset
    return ids, mask, positions


COMPILE_WIDTH_MULTIPLE = 64
"""With ``optim.compile``, batches are padded to a multiple of this many positions: one compiled graph then
serves every batch of the same rows whose longest example falls in the same 64-token bucket."""


def collate(examples: Sequence[Example], pad_id: int, device: torch.device, *, width: int = 0) -> Batch:
    """Right-padded ``input_ids``, ``labels`` (-100 on padding) and ``attention_mask``, plus the extras; at
    least ``width`` positions wide (``position_ids``, token-aligned, padded to the same width with zeros)."""
    width = max(width, *(len(e.input_ids) for e in examples))
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention[row, :n] = 1
    batch = {
        "input_ids": to_device(ids, device),
        "labels": to_device(labels, device),
        "attention_mask": to_device(attention, device),
    }
    keys = set(examples[0].extras)
    if any(set(e.extras) != keys for e in examples):
        raise ValueError("every example of a batch must carry the same extras")
    for key in sorted(keys):
        tensors = [e.extras[key] for e in examples]
        longest = width if key == "position_ids" else max(t.shape[0] for t in tensors)
        stacked = tensors[0].new_zeros((len(tensors), longest, *tensors[0].shape[1:]))
        for row, tensor in enumerate(tensors):
            stacked[row, : tensor.shape[0]] = tensor
        batch[key] = to_device(stacked, device)
    return batch


def empty_like(example: Example, pad_id: int) -> Example:
    """A row that scores nothing (one padding token), with ``example``'s extras emptied: it fills a batch to a
    fixed number of rows and changes no loss (losses are means over scored tokens)."""
    return Example((pad_id,), (IGNORE,), {key: value[:0] for key, value in example.extras.items()})


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


def model_logits(backbone: Backbone, batch: Batch) -> torch.Tensor:
    """The model's logits (B, T, V) of a collated batch."""
    if "position_ids" in batch:  # packed rows (pack_examples): restarting positions, no attention mask
        return backbone.model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
    return backbone.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits


def mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the scored tokens of ``labels`` (B, T) (a scalar, float32)."""
    nll = sequence_nll(logits, labels)  # (B, T-1)
    scored = (labels[:, 1:] != IGNORE).sum().clamp(min=1)
    return nll.sum() / scored


def next_token_loss(backbone: Backbone, batch: Batch) -> torch.Tensor:
    """Mean next-token loss over the scored tokens of a batch (a scalar with grad): the default loss."""
    return mean_nll(model_logits(backbone, batch), batch["labels"])


batch_loss = next_token_loss  # the earlier name, used by benchmarks/ttt_throughput.py


def kl_to_reference(reference_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where ``mask`` is set of KL(reference || model) of next-token distributions."""
    ref = torch.log_softmax(reference_logits.float(), dim=-1)
    own = torch.log_softmax(logits.float(), dim=-1)
    kl = (ref.exp() * (ref - own)).sum(-1)  # (B, T)
    mask = mask.bool()
    # where, not a product: a padded position may hold a non-finite value, and nan * 0 is nan.
    return torch.where(mask, kl, 0.0).sum() / mask.sum().clamp(min=1)


REFERENCE_CACHE_BYTES = 1 << 30
"""Reference logits of anchor rows are kept when they fit in this many bytes (SmolLM2-135M's ~60 background
rows of 64 tokens: 0.4 GB in bfloat16, 0.8 GB in float32); beyond it each step computes the rows it draws."""


class ReferenceLogits:
    """The logits (model dtype) of fixed token rows under a reference model, computed once and kept.

    ``reference()`` is a context manager inside which the backbone computes the reference (e.g. a strategy's
    learned changes switched off). The rows are computed together, in batches, at the first call (inside the
    caller's autocast and train/eval setting, which a training step then shares); they are computed again
    after :meth:`clear` or under another autocast setting. When they would take more than ``max_bytes``
    nothing is kept and every call computes the rows it asks for (one forward of those rows: the reference
    path).
    """

    def __init__(
        self,
        rows: Sequence[Sequence[int]],
        reference: Callable[[], AbstractContextManager[object]],
        *,
        max_bytes: int = REFERENCE_CACHE_BYTES,
        batch_size: int = 16,
    ) -> None:
        if not rows:
            raise ValueError("reference rows: need at least one row")
        self.rows = [tuple(r) for r in rows]
        self.lengths = [len(r) for r in self.rows]
        self.reference = reference
        self.max_bytes = max_bytes
        self.batch_size = batch_size
        self._kept: torch.Tensor | None = None  # (N, L, V) in the model's dtype, on its device
        self._kept_autocast: bool | None = None

    def clear(self) -> None:
        """Forget the kept logits (the reference changed)."""
        self._kept, self._kept_autocast = None, None

    @property
    def kept(self) -> bool:
        return self._kept is not None

    @torch.no_grad()
    def _forward(self, backbone: Backbone, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Reference logits of ``rows`` (B, L, V), right-padded to the longest of them."""
        pad = backbone.tokenizer.pad_token_id
        batch = collate([Example(tuple(r), tuple(r)) for r in rows], pad, backbone.device)
        with self.reference():
            return backbone.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).logits

    @property
    def width(self) -> int:
        """Positions of every row's logits: the longest row's length."""
        return max(self.lengths)

    def __call__(self, backbone: Backbone, indices: Sequence[int]) -> torch.Tensor:
        """Reference logits of the rows ``indices`` (k, L, V), L = :attr:`width` (zeros past a row's end)."""
        autocast = torch.is_autocast_enabled(backbone.device.type)
        if self._kept is None or self._kept_autocast != autocast:
            self._kept = None
            vocab = backbone.model.get_output_embeddings().weight.shape[0]
            itemsize = torch.empty((), dtype=backbone.dtype).element_size()
            if len(self.rows) * self.width * vocab * itemsize > self.max_bytes:
                return self._padded(self._forward(backbone, [self.rows[i] for i in indices]))
            parts = [
                self._padded(self._forward(backbone, self.rows[start : start + self.batch_size]))
                for start in range(0, len(self.rows), self.batch_size)
            ]
            self._kept, self._kept_autocast = torch.cat(parts), autocast  # (N, L, V)
        index = to_device(torch.tensor(list(indices), dtype=torch.long), self._kept.device)
        return self._kept[index]

    def _padded(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(logits, (0, 0, 0, self.width - logits.shape[1]))


class Anchor:
    """``weight`` * KL(reference || model) of next-token distributions on ``batch`` rows of ``reference``
    drawn at random (``seed``) for every step: keeps the model close to the reference on other text.

    With ``fused`` (and the default loss), :func:`train` runs the drawn rows in the same forward pass as the
    step's examples (extra rows of the batch, not scored by the loss); otherwise the term takes a forward
    pass of its own (:meth:`separate_term`: the reference path, and any custom loss).
    """

    def __init__(
        self, reference: ReferenceLogits, *, weight: float, batch: int, seed: int, fused: bool = True
    ):
        self.reference = reference
        self.weight = weight
        self.batch = min(batch, len(reference.rows))
        self.fused = fused
        self._rng = random.Random(seed)

    def draw(self) -> list[int]:
        """The rows of the next step (indices into ``reference.rows``)."""
        return self._rng.sample(range(len(self.reference.rows)), self.batch)

    def one_row(self, examples: Sequence[Example]) -> bool:
        """Whether the drawn rows go beside ``examples`` as one packed row (:meth:`examples`): for packed
        examples, when that makes the batch smaller (rows x width) than a row each."""
        if "position_ids" not in examples[0].extras:
            return False
        width, rows = max(len(e.input_ids) for e in examples), len(examples)
        own = self.reference.width
        return (rows + 1) * max(width, own * self.batch) < (rows + self.batch) * max(width, own)

    def examples(self, indices: Sequence[int], like: Example, pad_id: int, one_row: bool) -> list[Example]:
        """The drawn rows as unscored examples in ``like``'s form: a row each, or (``one_row``, beside packed
        examples) one row of the drawn rows one after another, each padded to the reference's width, positions
        restarting at each (padding continues its row's positions: it is read by nothing before it)."""
        rows = [self.reference.rows[i] for i in indices]
        if not one_row:
            extras = "position_ids" in like.extras
            return [
                Example(row, (IGNORE,) * len(row), {"position_ids": torch.arange(len(row))} if extras else {})
                for row in rows
            ]
        width = self.reference.width
        ids = tuple(t for row in rows for t in (*row, *(pad_id,) * (width - len(row))))
        positions = torch.arange(width).repeat(len(rows))
        return [Example(ids, (IGNORE,) * len(ids), {"position_ids": positions})]

    def mask(self, indices: Sequence[int], device: torch.device) -> torch.Tensor:
        """(k, L) 1 on the real tokens of the drawn rows, L the reference's width (the same every step)."""
        lengths = torch.tensor([self.reference.lengths[i] for i in indices])
        positions = torch.arange(self.reference.width)
        return to_device((positions[None, :] < lengths[:, None]).long(), device)

    def targets(self, backbone: Backbone, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference logits (k, L, V) and the mask (k, L) of the drawn rows."""
        return self.reference(backbone, indices), self.mask(indices, backbone.device)

    def separate_term(self, backbone: Backbone) -> torch.Tensor:
        """The weighted KL of the next draw, from a forward pass of its own."""
        indices = self.draw()
        rows = [self.reference.rows[i] for i in indices]
        pad = backbone.tokenizer.pad_token_id
        batch = collate([Example(r, r) for r in rows], pad, backbone.device, width=self.reference.width)
        logits = model_logits(backbone, batch)
        reference, mask = self.targets(backbone, indices)
        return self.weight * kl_to_reference(reference, logits[:, : mask.shape[1]], mask)


def anchored_loss(
    backbone: Backbone, batch: Batch, examples: int, reference: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over a batch whose first ``examples`` rows are training examples and the rest anchor
    rows (:meth:`Anchor.examples`: a row each, or all in one packed row): (the examples' mean next-token
    loss, KL(reference || model) on the anchor rows' ``mask`` (k, L))."""
    logits = model_logits(backbone, batch)  # (B, T, V)
    loss = mean_nll(logits[:examples], batch["labels"][:examples])
    k, width = mask.shape
    anchors = logits[examples:]  # (k, T, V), or (1, T, V): k rows of ``width`` one after another
    if anchors.shape[0] == k:
        anchors = anchors[:, :width]
    else:
        anchors = anchors[0, : k * width].reshape(k, width, -1)
    kl = kl_to_reference(reference, anchors, mask)
    return loss, kl


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
    anchor: Anchor | None = None,
    grad_hook: Callable[[list[torch.nn.Parameter]], None] | None = None,
    description: str = "learning",
) -> list[float]:
    """Optimise ``params`` on ``examples`` as ``optim`` says; return every step's loss (``loss_fn`` alone).

    ``seed`` fixes the order the examples are shuffled in each epoch (its own ``random.Random``: no global
    state is read or changed). ``optim.stop_loss`` ends training after the first epoch whose mean loss falls
    below it. ``regularizer()`` is added to every step's loss; ``anchor`` adds its KL term (:class:`Anchor`:
    in the same forward pass as the examples with the default loss); ``grad_hook(params)`` runs after each
    backward pass and before clipping (e.g. to mask gradients). ``requires_grad`` is switched on for
    ``params`` during training and off afterwards. Losses stay on the device and are read once per epoch.
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
    fused = anchor is not None and anchor.fused and loss_fn is next_token_loss
    step_fn = anchored_loss if fused else loss_fn
    step_loss = torch.compile(step_fn, dynamic=False, mode=optim.compile_mode) if optim.compile else step_fn
    # a replayed CUDA graph writes its outputs into the same memory every step: each step is marked, and the
    # losses kept for the epoch are copies
    graphs = optim.compile and optim.compile_mode == "reduce-overhead"
    autocast = torch.autocast(backbone.device.type, dtype=torch.bfloat16, enabled=optim.autocast)
    # compiled steps run few shapes (widths in buckets); uncompiled ones meet a new width at most batches
    attention = nullcontext() if optim.compile else varying_shape_attention(backbone.device)
    with (
        attention,
        gradients_on(params),
        backbone.training(),
        tqdm(total=optim.epochs * steps_per_epoch, desc=description, leave=False, disable=None) as bar,
    ):
        for _ in range(optim.epochs):
            rng.shuffle(order)
            epoch_losses: list[torch.Tensor] = []
            for start in range(0, len(order), batch_size):
                chosen = [examples[i] for i in order[start : start + batch_size]]
                if optim.compile:  # an epoch's last batch as full as the others: the same graph serves it
                    chosen += [empty_like(chosen[0], pad)] * (min(batch_size, len(examples)) - len(chosen))
                width = max(len(e.input_ids) for e in chosen)
                if fused:
                    assert anchor is not None
                    one_row = anchor.one_row(chosen)
                    width = max(width, anchor.reference.width * (anchor.batch if one_row else 1))
                if optim.compile:  # a bucket of widths, so few graphs serve many lengths
                    width = -(-width // COMPILE_WIDTH_MULTIPLE) * COMPILE_WIDTH_MULTIPLE
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                with autocast:
                    if fused:
                        assert anchor is not None
                        drawn = anchor.draw()
                        rows = chosen + anchor.examples(drawn, chosen[0], pad, one_row)
                        batch = collate(rows, pad, backbone.device, width=width)
                        loss, kl = step_loss(backbone, batch, len(chosen), *anchor.targets(backbone, drawn))
                        total = loss + anchor.weight * kl
                    else:
                        loss = step_loss(backbone, collate(chosen, pad, backbone.device, width=width))
                        total = loss + anchor.separate_term(backbone) if anchor is not None else loss
                    if regularizer is not None:
                        total = total + regularizer()
                total.backward()
                if grad_hook is not None:
                    grad_hook(params)
                if optim.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                bar.update(1)
                epoch_losses.append(loss.detach().clone() if graphs else loss.detach())
            read = torch.stack(epoch_losses).float().tolist()  # sync: once per epoch (the stop rule)
            bar.set_postfix(loss=f"{read[-1]:.3f}")
            losses.extend(read)
            if optim.stop_loss and sum(read) / len(read) < optim.stop_loss:
                break
    return losses
