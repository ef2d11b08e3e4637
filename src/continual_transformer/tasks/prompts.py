"""Prompts in token space, and the left-padded batches that train and score label continuations.

A classification example is ``prompt + answer``: the prompt is the task's template (chat template applied)
around the input text, the answer the label's tokens followed by the end-of-turn token. Both are assembled
from separately tokenised pieces (``pre + text + post``), so a stored example is just its text's token ids:
the fixed-size replay buffer holds ids, and training, distillation and scoring all build the same sequence.

Batches are left-padded, so every row's answer ends at the last position: the language-model head then runs on
the last ``A + 1`` positions only (``logits_to_keep``), not on the whole prompt.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from continual_transformer.backbone import Backbone
from continual_transformer.tasks.config import TaskConfig
from continual_transformer.training import left_pad, right_aligned, to_device

_SENTINEL = "\u2063TEXT\u2063"  # invisible separators: never produced by a template or a label list


@dataclass(frozen=True)
class Encoded:
    """One example as the learner stores it: the input's token ids, its task index and its label index."""

    text_ids: tuple[int, ...]
    task: int
    label: int


@dataclass(frozen=True)
class TrainRow:
    """One training sequence: ``prompt + answer`` with the loss on the answer; ``teacher`` is a pool slot."""

    prompt: tuple[int, ...]
    answer: tuple[int, ...]
    task: int
    teacher: int = -1


@dataclass(frozen=True)
class TaskPrompt:
    """Token pieces of one task's prompt and the answer tokens of each of its labels."""

    pre: tuple[int, ...]
    post: tuple[int, ...]
    answers: tuple[tuple[int, ...], ...]

    def prompt(self, text_ids: Sequence[int]) -> tuple[int, ...]:
        return (*self.pre, *text_ids, *self.post)


class PromptBuilder:
    """Builds (and caches) each label set's :class:`TaskPrompt` and tokenises input texts."""

    def __init__(self, backbone: Backbone, config: TaskConfig) -> None:
        self.backbone = backbone
        self.config = config
        self.chat = backbone.uses_chat(config.chat)
        self._cache: dict[tuple[str, ...], TaskPrompt] = {}

    def encode_texts(self, texts: Sequence[str]) -> list[tuple[int, ...]]:
        """Token ids of each text (no special tokens), cut to ``max_text_tokens`` keeping the start."""
        ids = self.backbone.token_ids_many(list(texts))
        limit = self.config.max_text_tokens
        return [tuple(row[:limit]) if row else (self.pad_id,) for row in ids]

    @property
    def pad_id(self) -> int:
        return int(self.backbone.tokenizer.pad_token_id)

    def display_labels(self, labels: Sequence[str]) -> list[str]:
        """Labels as the model reads them; raw names when humanising would make two of them equal."""
        if not self.config.humanize_labels:
            return list(labels)
        shown = [label.replace("_", " ").strip() or label for label in labels]
        return shown if len(set(shown)) == len(shown) else list(labels)

    def task_prompt(self, labels: Sequence[str]) -> TaskPrompt:
        key = tuple(labels)
        if key not in self._cache:
            self._cache[key] = self._build(key)
        return self._cache[key]

    def _build(self, labels: tuple[str, ...]) -> TaskPrompt:
        tokenizer = self.backbone.tokenizer
        shown = self.display_labels(labels)
        user = self.config.prompt_template.replace("{labels}", ", ".join(shown)).replace("{text}", _SENTINEL)
        full = self.backbone.format_prompt(user, chat=self.chat)
        pre_text, post_text = full.split(_SENTINEL)
        pre = tokenizer(pre_text, add_special_tokens=False)["input_ids"] if pre_text else []
        post = tokenizer(post_text, add_special_tokens=False)["input_ids"] if post_text else []
        bos = tokenizer.bos_token_id
        if not self.chat and bos is not None and (not pre or pre[0] != bos):
            pre = [bos, *pre]  # a plain LM reads from a start token, as in pretraining
        eos = tokenizer.eos_token_id
        end = [eos] if eos is not None else []
        # A chat answer starts a fresh assistant turn; a plain continuation follows "Category:" after a space.
        answers = tuple(
            tuple(tokenizer(text if self.chat else " " + text, add_special_tokens=False)["input_ids"] + end)
            for text in shown
        )
        return TaskPrompt(tuple(pre), tuple(post), answers)


# ------------------------------------------------------------------------------------------------------------
# Model calls that work across architectures and transformers versions


@functools.cache
def _forward_params(model_cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_cls.forward).parameters)


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the key/value-cache argument of ``model.forward`` (``cache`` in transformers 5)."""
    return "cache" if "cache" in _forward_params(type(model)) else "past_key_values"


def output_cache(output) -> object:
    return output["cache"] if "cache" in output else output["past_key_values"]


def forward_last(model: torch.nn.Module, keep: int, **inputs) -> tuple[torch.Tensor, object]:
    """Logits of the last ``keep`` positions (B, keep, V) and the model output (for its cache)."""
    if "logits_to_keep" in _forward_params(type(model)):
        output = model(**inputs, logits_to_keep=keep)
    else:
        output = model(**inputs)
    return output.logits[:, -keep:], output


MIN_SHARED_PREFIX = 8
"""Shorter common prefixes are not worth a separate forward pass."""


def common_prefix(rows: Sequence[Sequence[int]], *, keep: int = 1) -> int:
    """Length of the token prefix all rows share, leaving at least ``keep`` tokens of every row after it."""
    if len(rows) < 2:
        return 0
    first, limit = rows[0], min(len(r) for r in rows) - keep
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


def prefixed_forward(
    model: torch.nn.Module,
    rows: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device,
    *,
    keep: int,
    shared: int,
    use_cache: bool = False,
) -> tuple[torch.Tensor, object, torch.Tensor]:
    """Forward left-padded ``rows``; logits of the last ``keep`` positions (B, keep, V), the output, and the
    full attention mask (B, T).

    With ``shared > 0`` the first ``shared`` tokens (identical in every row: system prompt, instruction, label
    list) run once as a batch of one; their key/value cache is repeated for every row and the rest of each row
    continues from it. Rows then look like ``[prefix][pad...][suffix]``; positions skip the padding. Only
    valid when every row is computed with the same weights (the same adapter).
    """
    if shared <= 0:
        ids, mask, positions = left_pad(rows, pad_id, device)
        logits, output = forward_last(
            model, keep, input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=use_cache
        )
        return logits, output, mask
    prefix = to_device(torch.tensor([list(rows[0][:shared])]), device)  # (1, P0)
    _, head = forward_last(
        model, 1, input_ids=prefix, position_ids=torch.arange(shared, device=device)[None], use_cache=True
    )
    cache = output_cache(head)
    cache.batch_select_indices(torch.zeros(len(rows), dtype=torch.long, device=device))  # (B, ..., P0, ...)
    ids, suffix_mask, positions = left_pad(
        [r[shared:] for r in rows], pad_id, device, offset=shared
    )  # (B, S)
    mask = torch.cat([torch.ones(len(rows), shared, dtype=torch.long, device=device), suffix_mask], dim=1)
    logits, output = forward_last(
        model,
        keep,
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=use_cache,
        **{cache_kwarg(model): cache},
    )
    return logits, output, mask


@dataclass
class AnswerBatch:
    """A batch of ``prompt + answer`` rows, right-aligned; targets cover the last ``A`` tokens of every
    row."""

    rows: list[tuple[int, ...]]  # prompt + answer of each row
    shared: int  # tokens of common prefix computed once (0: none)
    targets: torch.Tensor  # (B, A) answer tokens, right-aligned; pad where the answer is shorter
    target_mask: torch.Tensor  # (B, A) True on real answer tokens
    tasks: torch.Tensor  # (B,) task index of each row, on CPU
    pad_id: int

    @property
    def answer_width(self) -> int:
        return self.targets.shape[1]

    @property
    def size(self) -> int:
        return len(self.rows)


def answer_batch(
    rows: Sequence[TrainRow], pad_id: int, device: torch.device, *, share_prefix: bool = True
) -> AnswerBatch:
    """``share_prefix=False`` when rows will run with different adapters (per-row teachers)."""
    sequences = [(*r.prompt, *r.answer) for r in rows]
    targets, lengths = right_aligned([r.answer for r in rows], pad_id, device)
    width = targets.shape[1]
    target_mask = torch.arange(width, device=targets.device)[None, :] >= (width - lengths)[:, None]  # (B, A)
    shared = common_prefix(sequences, keep=width + 1) if share_prefix else 0
    tasks = torch.tensor([r.task for r in rows], dtype=torch.long)
    return AnswerBatch(sequences, shared, targets, target_mask, tasks, pad_id)


def answer_logits(model: torch.nn.Module, batch: AnswerBatch) -> torch.Tensor:
    """Logits predicting each answer token (B, A, V): the A positions before the last of each row."""
    width = batch.answer_width
    device = batch.targets.device
    logits, _, _ = prefixed_forward(
        model, batch.rows, batch.pad_id, device, keep=width + 1, shared=batch.shared
    )
    return logits[:, :width]
