"""Context distillation: the model without a document learns to answer like the model with it in its prompt.

Next-token loss on a document's own text lowers its loss without making its facts answerable (LESSONS.md).
Context distillation (Doc-to-LoRA, Sakana 2025; deep context distillation for knowledge modules, 2025) instead
trains the *student* (the model being changed, which never sees the document) to match the next-token
distributions of the *teacher* (the frozen base model with the document in its prompt) on queries about the
document. This module turns one document into such training examples and gives the loss; a training loop
forwards the student on :func:`collate_distill` batches and calls :func:`distill_loss` on its logits.

Queries come in three kinds (each switchable and capped in :class:`ContextDistillConfig`):

* ``prefix``: the start of one of the document's sentences, as raw text; the teacher reads the document, then
  the same start, and continues it (for cloze-style recall).
* ``question``: questions the base model writes about the document through its chat template; the teacher
  answers each with the document in the user turn, the student is asked the question alone.
* ``entity``: "Tell me about X." for the names and numbers found by :func:`extract_entities`.

For each query the teacher greedily generates a continuation; one batched forward pass over prompt plus
continuation then gives its top-k log-probabilities at every continuation position. The student's example is
its own prompt (without the document) followed by the same continuation tokens, scored at those positions.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from continual_transformer.errors import ConfigError

if TYPE_CHECKING:
    from continual_transformer.backbone import Backbone

logger = logging.getLogger(__name__)

QUERY_KINDS = ("prefix", "question", "entity")


# ------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, kw_only=True)
class ContextDistillConfig:
    """How a document becomes context-distillation examples."""

    prefix_queries: bool = True
    """Use prefixes of the document's sentences as queries (raw text, no chat template)."""
    max_prefix_queries: int = 16
    """At most this many prefix queries per document (spread evenly over the sentences when more)."""
    prefix_fractions: tuple[float, ...] = (0.25, 0.5)
    """Where each sentence is cut, as fractions of its words; one query per cut (identical prefixes once)."""
    question_queries: bool = True
    """Have the base model write questions about the document and use them as queries."""
    max_question_queries: int = 8
    """At most this many generated questions per document."""
    question_max_new_tokens: int = 128
    """Tokens generated per question-writing prompt."""
    entity_queries: bool = True
    """Use "Tell me about X." for the names and numbers found in the document as queries."""
    max_entity_queries: int = 8
    """At most this many entity queries per document (in order of first mention)."""
    entity_template: str = "Tell me about {entity}."
    """Wording of an entity query; ``{entity}`` is replaced by the name or number."""
    teacher_template: str = "{document}\n\n{query}"
    """The teacher's user turn for question and entity queries (``{document}``, ``{query}`` are replaced)."""
    teacher_max_new_tokens: int = 48
    """Tokens of teacher continuation per query (the scored span); generation stops earlier at end of text."""
    top_k: int = 32
    """Teacher log-probabilities kept per scored position; the rest of the vocabulary is one "other" bucket.
    """
    temperature: float = 1.0
    """Softens (> 1) or sharpens (< 1) the teacher's distributions before the top-k; the student is scored at
    temperature 1. Generation is greedy whatever this is."""
    teacher_batch_size: int = 8
    """Queries generated and scored together (left padding for generation, right padding for scoring)."""

    def __post_init__(self) -> None:
        key = "context_distill"
        for name in ("max_prefix_queries", "max_question_queries", "max_entity_queries"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name}: must be >= 0, got {getattr(self, name)}")
        fractions = tuple(float(f) for f in self.prefix_fractions)
        if not fractions or not all(0.0 < f < 1.0 for f in fractions):
            raise ConfigError(f"{key}.prefix_fractions: need one or more values in (0, 1), got {fractions}")
        object.__setattr__(self, "prefix_fractions", fractions)
        for name in ("question_max_new_tokens", "teacher_max_new_tokens", "top_k", "teacher_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}: must be >= 1, got {getattr(self, name)}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"{key}.temperature: must be a positive number, got {self.temperature}")
        if "{entity}" not in self.entity_template:
            raise ConfigError(f"{key}.entity_template: must contain {{entity}}, got {self.entity_template!r}")
        for field_name in ("{document}", "{query}"):
            if field_name not in self.teacher_template:
                raise ConfigError(f"{key}.teacher_template: must contain {field_name}")
        if not (self.prefix_queries or self.question_queries or self.entity_queries):
            raise ConfigError(f"{key}: at least one query kind must be switched on")


# ------------------------------------------------------------------------------------------------------------
# Text analysis (deterministic, model-free)

_ABBREVIATIONS = frozenset(
    "dr mr mrs ms prof st sr jr mt vs etc inc ltd co corp no fig approx gen col lt sgt capt".split()
)
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: a break after ``.``, ``!`` or ``?`` followed by white space and a capital, digit
    or quote, except after a known abbreviation ("Dr.") or a single-letter initial ("J.")."""
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
        following = text[end : end + 1]
        if not following or not (following.isupper() or following.isdigit() or following in "\"'("):
            continue
        word = re.search(r"(\w+)[.!?][\"')\]]*\s+$", text[start:end])
        if (
            word
            and text[match.start()] == "."
            and (
                word.group(1).lower() in _ABBREVIATIONS
                or (len(word.group(1)) == 1 and word.group(1).isupper())
            )
        ):
            continue
        sentences.append(text[start:end].strip())
        start = end
    sentences.append(text[start:].strip())
    return [s for s in (" ".join(s.split()) for s in sentences) if s]


# Capitalised words that open sentences without naming anything; stripped from the front of a name.
_FUNCTION_WORDS = frozenset(
    """the a an in on at for by of to from with as after before during since when while this that these those
    it its he she his her they their we our i my you your there here some many most each every all both one
    and but or so if then thus also however today later""".split()
)
# Joining words allowed inside a multi-word name ("Bank of Veloria", "Charles de Gaulle").
_NAME_JOINERS = frozenset({"of", "de", "van", "von", "der", "la", "le", "du", "da", "di", "y"})
_WORD = re.compile(r"[A-Za-z\u00c0-\u024f][\w'\u00c0-\u024f-]*|\d[\d,.]*\d|\d")


def extract_entities(text: str) -> list[str]:
    """Names and numbers mentioned in ``text``, in order of first mention, each once.

    A name is a run of capitalised words (joined by "of", "de", ... inside the run); a run of one word counts
    only when the word does not open its sentence (a capitalised word mid-sentence is a proper noun). Leading
    function words ("The Orvalis river" gives "Orvalis") are dropped. A number is a run of digits (with inner
    ``,`` or ``.``), e.g. a year.
    """
    found: list[str] = []
    seen: set[str] = set()

    def add(entity: str) -> None:
        if entity.lower() not in seen:
            seen.add(entity.lower())
            found.append(entity)

    for sentence in split_sentences(text):
        words = [(m.group(0), m.start()) for m in _WORD.finditer(sentence)]
        i = 0
        while i < len(words):
            word = words[i][0]
            if word[0].isdigit():
                add(word.rstrip(".,"))
                i += 1
                continue
            if not word[0].isupper():
                i += 1
                continue
            run = [i]
            j = i + 1
            while j < len(words):
                if words[j][0][0].isupper():
                    run.append(j)
                elif words[j][0] in _NAME_JOINERS and j + 1 < len(words) and words[j + 1][0][0].isupper():
                    run.extend((j, j + 1))
                    j += 1
                else:
                    break
                j += 1
            while run and words[run[0]][0].lower() in _FUNCTION_WORDS:
                run.pop(0)
            # a single word opening its sentence is usually just a capitalised word, not a name
            if run and not (len(run) == 1 and run[0] == 0):
                first, last = words[run[0]], words[run[-1]]
                add(sentence[first[1] : last[1] + len(last[0])])
            i = j
    return found


_QUESTION_LEAD = re.compile(
    r"^\s*(?:[-*\u2022]+|\d+[.):]|q\d*[.:)]|question\s*\d*\s*[.:)])\s*", re.IGNORECASE
)


def parse_questions(text: str) -> list[str]:
    """Questions in a model's free-form output, each once.

    One per line, list markers ("1.", "-", "Q:") removed, cut after the first ``?``; lines without a question
    mark or of fewer than three words are dropped.
    """
    questions: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        line = _QUESTION_LEAD.sub("", line.strip(" *\"'\t")).strip(" *\"'")
        if "?" not in line:
            continue
        question = " ".join(line[: line.index("?") + 1].split())
        if len(question.split()) >= 3 and question.lower() not in seen:
            seen.add(question.lower())
            questions.append(question)
    return questions


def sentence_prefixes(sentences: Sequence[str], fractions: Sequence[float]) -> list[str]:
    """For each sentence of four words or more, its first ``round(f * words)`` words for each fraction ``f``.

    A prefix keeps at least two words and leaves at least one to continue; each distinct prefix comes once, in
    sentence order. (Shorter sentences give prefixes like "It" that say nothing about the document.)
    """
    prefixes: list[str] = []
    seen: set[str] = set()
    for sentence in sentences:
        words = sentence.split()
        if len(words) < 4:
            continue
        for fraction in fractions:
            cut = min(max(2, round(fraction * len(words))), len(words) - 1)
            prefix = " ".join(words[:cut])
            if prefix not in seen:
                seen.add(prefix)
                prefixes.append(prefix)
    return prefixes


def _spread(items: Sequence[str], limit: int) -> list[str]:
    """``limit`` items spread evenly over ``items`` (all of them when there are no more)."""
    if len(items) <= limit:
        return list(items)
    if limit == 0:
        return []
    return [items[(i * len(items)) // limit] for i in range(limit)]


# ------------------------------------------------------------------------------------------------------------
# Queries

QUESTION_INSTRUCTIONS = (
    "Write {n} different questions that the text below answers. Write one question per line.\n\n"
    "Text: {document}",
    "Read the text below and ask {n} questions about the names, places, dates and numbers in it, "
    "one per line.\n\nText: {document}",
)
"""Prompts that make the base model write questions about a document (generated as one batch)."""


@dataclass(frozen=True)
class DistillQuery:
    """One query about a document: what the student sees and what the teacher sees (both exact model text)."""

    kind: str
    """``"prefix"``, ``"question"`` or ``"entity"``."""
    text: str
    """The query itself (a sentence start, a question, "Tell me about X.")."""
    student_prompt: str
    """Model input without the document (chat template applied for questions and entities)."""
    teacher_prompt: str
    """Model input with the document before the query."""


def make_queries(
    backbone: Backbone,
    document_text: str,
    config: ContextDistillConfig,
    *,
    questions: Sequence[str] | None = None,
) -> list[DistillQuery]:
    """Every query of the switched-on kinds, capped; generating questions runs the model (call it in the
    teacher's context) unless ``questions`` gives those the model wrote already (:func:`write_questions`)."""
    queries: list[DistillQuery] = []
    if config.prefix_queries and config.max_prefix_queries:
        prefixes = sentence_prefixes(split_sentences(document_text), config.prefix_fractions)
        for prefix in _spread(prefixes, config.max_prefix_queries):
            queries.append(DistillQuery("prefix", prefix, prefix, f"{document_text}\n\n{prefix}"))
    chat_texts: list[tuple[str, str]] = []
    if config.question_queries and config.max_question_queries:
        if questions is None:
            questions = generate_questions(backbone, document_text, config)
        chat_texts.extend(("question", q) for q in questions)
    if config.entity_queries and config.max_entity_queries:
        entities = extract_entities(document_text)[: config.max_entity_queries]
        chat_texts.extend(("entity", config.entity_template.format(entity=e)) for e in entities)
    for kind, text in chat_texts:
        teacher_user = config.teacher_template.format(document=document_text, query=text)
        queries.append(
            DistillQuery(
                kind,
                text,
                backbone.format_prompt(text, chat=True),
                backbone.format_prompt(teacher_user, chat=True),
            )
        )
    return queries


def generate_questions(backbone: Backbone, document_text: str, config: ContextDistillConfig) -> list[str]:
    """Questions the model writes about the document (every instruction of :data:`QUESTION_INSTRUCTIONS` in
    one greedy batch), parsed, each once, at most ``config.max_question_queries``."""
    return write_questions(backbone, [document_text], config)[0]


def write_questions(
    backbone: Backbone, document_texts: Sequence[str], config: ContextDistillConfig
) -> list[list[str]]:
    """:func:`generate_questions` for several documents, their instructions decoded together in greedy
    batches of ``config.teacher_batch_size`` rows (at least one document's instructions per batch)."""
    n = config.max_question_queries
    rows = [
        _prompt_ids(
            backbone, backbone.format_prompt(instruction.format(n=n, document=text), chat=True), raw=False
        )
        for text in document_texts
        for instruction in QUESTION_INSTRUCTIONS
    ]
    size = max(config.teacher_batch_size, len(QUESTION_INSTRUCTIONS))
    outputs = [
        output
        for start in range(0, len(rows), size)
        for output in _greedy(backbone, rows[start : start + size], config.question_max_new_tokens)
    ]
    per_document = []
    for d in range(len(document_texts)):
        questions: list[str] = []
        for output in outputs[d * len(QUESTION_INSTRUCTIONS) : (d + 1) * len(QUESTION_INSTRUCTIONS)]:
            for question in parse_questions(backbone.tokenizer.decode(output, skip_special_tokens=True)):
                if question.lower() not in {q.lower() for q in questions}:
                    questions.append(question)
        per_document.append(questions[:n])
    return per_document


# ------------------------------------------------------------------------------------------------------------
# Examples and teacher signals


@dataclass(frozen=True, eq=False)
class DistillExample:
    """One student sequence with the teacher's distributions at its scored positions.

    ``positions[i]`` is the student position whose next-token distribution must match the teacher's
    ``teacher_ids[i]`` / ``teacher_logprobs[i]`` (the logits at that position predict continuation token i).
    """

    input_ids: tuple[int, ...]
    """Student prompt (no document) followed by the teacher's continuation."""
    positions: tuple[int, ...]
    """Scored positions in ``input_ids`` (one per continuation token)."""
    teacher_ids: torch.Tensor
    """(P, k) int64 on CPU: the teacher's top-k token ids at each scored position, most likely first."""
    teacher_logprobs: torch.Tensor
    """(P, k) float32 on CPU: the teacher's log-probabilities of those ids (over the full vocabulary, at
    ``config.temperature``; ``1 - exp(...).sum()`` is the mass of every other token)."""
    kind: str
    """Query kind: ``"prefix"``, ``"question"`` or ``"entity"``."""
    query: str
    """The query text."""
    continuation: str
    """The teacher's continuation, decoded (for reports)."""

    @property
    def scored_tokens(self) -> int:
        return len(self.positions)


def build_distill_examples(
    backbone: Backbone,
    document_text: str,
    config: ContextDistillConfig,
    *,
    teacher_context: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
) -> list[DistillExample]:
    """Queries about ``document_text`` and the teacher's signals for each, computed once, batched.

    Everything that runs the model (question writing, teacher generation, teacher scoring) runs inside
    ``teacher_context()``, which must make the backbone the frozen base model (a strategy passes the context
    that switches its learned changes off).
    """
    if not document_text.strip():
        raise ValueError("cannot distil an empty document")
    started = time.perf_counter()
    with teacher_context():
        queries = make_queries(backbone, document_text, config)
        examples = teacher_signals(backbone, queries, config)
    counts = {kind: sum(1 for e in examples if e.kind == kind) for kind in QUERY_KINDS}
    logger.info(
        "context distillation: %d examples (%s), %d scored tokens in %.1fs",
        len(examples),
        ", ".join(f"{k}={v}" for k, v in counts.items()),
        sum(e.scored_tokens for e in examples),
        time.perf_counter() - started,
    )
    return examples


def teacher_signals(
    backbone: Backbone, queries: Sequence[DistillQuery], config: ContextDistillConfig
) -> list[DistillExample]:
    """The teacher's greedy continuation of every query and its top-k at each continuation token.

    Batched by ``config.teacher_batch_size``: one left-padded greedy generation, then one right-padded forward
    pass over prompt + continuation. Runs the backbone as it is: call it inside the teacher's context.
    """
    examples: list[DistillExample] = []
    size = config.teacher_batch_size
    for start in range(0, len(queries), size):
        chunk = queries[start : start + size]
        teacher_rows = [_prompt_ids(backbone, q.teacher_prompt, raw=q.kind == "prefix") for q in chunk]
        longest = max(len(r) for r in teacher_rows) + config.teacher_max_new_tokens
        if longest > backbone.max_length:
            raise ValueError(
                f"document plus query plus {config.teacher_max_new_tokens} new tokens is {longest} tokens, "
                f"over the model's context of {backbone.max_length}; split the document into shorter chunks"
            )
        continuations = _greedy(backbone, teacher_rows, config.teacher_max_new_tokens)
        ids, logprobs = _top_k(backbone, teacher_rows, continuations, config)
        for query, cont, top_ids, top_logprobs in zip(chunk, continuations, ids, logprobs):
            student = _prompt_ids(backbone, query.student_prompt, raw=query.kind == "prefix")
            examples.append(
                DistillExample(
                    input_ids=tuple(student + cont),
                    positions=tuple(range(len(student) - 1, len(student) - 1 + len(cont))),
                    teacher_ids=top_ids,
                    teacher_logprobs=top_logprobs,
                    kind=query.kind,
                    query=query.text,
                    continuation=backbone.tokenizer.decode(cont, skip_special_tokens=True).strip(),
                )
            )
    return examples


def _prompt_ids(backbone: Backbone, text: str, *, raw: bool) -> list[int]:
    """Token ids of model text; raw text starts with BOS as in pretraining when the model has no chat template
    (the rule of :func:`continual_transformer.training.text_examples`)."""
    tokenizer = backbone.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if raw and bos is not None and tokenizer.chat_template is None:
        ids = [bos, *ids]
    return ids


def _greedy(backbone: Backbone, rows: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of token-id prompts, one left-padded batch on the backbone's decoding path
    (:meth:`Backbone.generate_ids`).

    Each is cut after its first end-of-sequence token, which is kept: the student learns where answers end.
    """
    eos = backbone.tokenizer.eos_token_id
    continuations = []
    for row in backbone.generate_ids(rows, max_new_tokens):
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        continuations.append(row)
    return continuations


@torch.inference_mode()
def _top_k(
    backbone: Backbone,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    config: ContextDistillConfig,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The teacher's top-k (ids, log-probs) at each continuation token of each row, from one forward pass."""
    rows = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    width = max(len(r) for r in rows)
    pad = backbone.tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    span = max(len(c) for c in continuations)
    positions = torch.zeros((len(rows), span), dtype=torch.long)
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, : len(row)] = 1
        n = len(row) - len(prompt)
        # the logits at position len(prompt) - 1 + j predict continuation token j
        positions[i, :n] = torch.arange(len(prompt) - 1, len(row) - 1)
    device = backbone.device
    logits = backbone.model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits  # (B, T, V)
    picked = logits.gather(1, positions.to(device)[..., None].expand(-1, -1, logits.shape[-1]))  # (B, S, V)
    logprobs = torch.log_softmax(picked.float() / config.temperature, dim=-1)
    k = min(config.top_k, logprobs.shape[-1])
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)  # (B, S, k), most likely first
    top_logprobs, top_ids = top_logprobs.cpu(), top_ids.cpu()  # sync: once per batch
    lengths = [len(c) for c in continuations]
    return (
        [top_ids[i, :n].clone() for i, n in enumerate(lengths)],
        [top_logprobs[i, :n].clone() for i, n in enumerate(lengths)],
    )


# ------------------------------------------------------------------------------------------------------------
# Batches and the loss


def collate_distill(
    examples: Sequence[DistillExample], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """A right-padded batch of student sequences and teacher targets.

    ``input_ids`` / ``attention_mask`` (B, T) feed the student's forward pass; ``positions`` /
    ``position_mask`` (B, P) and ``teacher_ids`` / ``teacher_logprobs`` (B, P, k) feed :func:`distill_loss`.
    """
    if not examples:
        raise ValueError("collate_distill needs at least one example")
    width = max(len(e.input_ids) for e in examples)
    span = max(len(e.positions) for e in examples)
    k = examples[0].teacher_ids.shape[1]
    if any(e.teacher_ids.shape[1] != k for e in examples):
        raise ValueError("collate_distill: every example must keep the same number of teacher top-k entries")
    n = len(examples)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    positions = torch.zeros((n, span), dtype=torch.long)
    position_mask = torch.zeros((n, span), dtype=torch.bool)
    teacher_ids = torch.zeros((n, span, k), dtype=torch.long)
    # padded positions are masked out of the loss; -inf gives them no teacher mass at all
    teacher_logprobs = torch.full((n, span, k), -math.inf, dtype=torch.float32)
    for row, example in enumerate(examples):
        length, scored = len(example.input_ids), len(example.positions)
        ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        attention[row, :length] = 1
        positions[row, :scored] = torch.tensor(example.positions, dtype=torch.long)
        position_mask[row, :scored] = True
        teacher_ids[row, :scored] = example.teacher_ids
        teacher_logprobs[row, :scored] = example.teacher_logprobs
    return {
        "input_ids": ids.to(device),
        "attention_mask": attention.to(device),
        "positions": positions.to(device),
        "position_mask": position_mask.to(device),
        "teacher_ids": teacher_ids.to(device),
        "teacher_logprobs": teacher_logprobs.to(device),
    }


def distill_loss(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], *, per_row: bool = False
) -> torch.Tensor:
    """Mean over scored positions of KL(teacher || student) on the top-k plus one "other" bucket (float32);
    ``per_row``: each row's mean over its own positions, (B,).

    The teacher's k stored log-probabilities (over the full vocabulary) and the mass of every other token
    make a distribution over k + 1 outcomes; the student's is its full-vocabulary log-softmax gathered at the
    same ids plus the log-sum-exp of every other id. This is the exact KL between the two distributions
    coarsened to those k + 1 outcomes (a lower bound on the full KL, zero when the student matches the
    teacher): unlike renormalising the top-k alone, it also charges the student for mass it puts on tokens the
    teacher deems unlikely, and it needs no renormalisation. ``logits`` (B, T, V) are the student's on
    ``batch["input_ids"]``.
    """
    positions = batch["positions"]  # (B, P)
    mask = batch["position_mask"]  # (B, P)
    top_ids = batch["teacher_ids"]  # (B, P, k)
    teacher = batch["teacher_logprobs"].float()  # (B, P, k), -inf at padded positions
    picked = logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))  # (B, P, V)
    student_all = torch.log_softmax(picked.float(), dim=-1)  # (B, P, V)
    student = student_all.gather(-1, top_ids)  # (B, P, k)
    # "other": every id outside the teacher's top-k
    student_other = student_all.scatter(-1, top_ids, -math.inf).logsumexp(-1)  # (B, P)
    teacher_p = teacher.exp()  # (B, P, k)
    teacher_other = (1.0 - teacher_p.sum(-1)).clamp(min=0.0)  # (B, P)
    # xlogy and where: an outcome with no teacher mass adds 0 (not 0 * -inf = nan), e.g. "other" when k = V
    top_term = torch.xlogy(teacher_p, teacher_p) - teacher_p * torch.where(teacher_p > 0, student, 0.0)
    other_term = torch.xlogy(teacher_other, teacher_other) - teacher_other * torch.where(
        teacher_other > 0, student_other, 0.0
    )
    kl = top_term.sum(-1) + other_term  # (B, P)
    # where, not a product: a padded position may hold a non-finite value, and nan * 0 is nan.
    kl = torch.where(mask, kl, 0.0)
    if per_row:
        return kl.sum(-1) / mask.sum(-1).clamp(min=1)
    return kl.sum() / mask.sum().clamp(min=1)


# ------------------------------------------------------------------------------------------------------------
# The objective on the shared training loop

OBJECTIVES = ("next_token", "context_distill")
"""What a weight-changing strategy trains on a document: its own next-token loss, or context distillation."""


def check_objective(objective: str, key: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``objective`` is one of :data:`OBJECTIVES`."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"{key}: must be one of {', '.join(OBJECTIVES)}, got {objective!r}")


def document_distill_examples(
    backbone: Backbone,
    document_text: str,
    config: ContextDistillConfig,
    *,
    teacher_context: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    chunk_tokens: int = 1024,
) -> list[DistillExample]:
    """:func:`build_distill_examples` over a document of any length: the teacher reads one chunk of at most
    ``chunk_tokens`` tokens at a time (cut at sentence ends), so its prompt always fits the context window."""
    return documents_distill_examples(
        backbone, [document_text], config, teacher_context=teacher_context, chunk_tokens=chunk_tokens
    )[0]


def documents_distill_examples(
    backbone: Backbone,
    document_texts: Sequence[str],
    config: ContextDistillConfig,
    *,
    teacher_context: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    chunk_tokens: int = 1024,
) -> list[list[DistillExample]]:
    """:func:`document_distill_examples` of several documents at once, each document's examples in a list of
    its own. The model runs across documents: their questions are written in shared greedy batches and the
    teacher answers their queries ``config.teacher_batch_size`` rows at a time, so documents that arrive
    together (``learn_documents``) take a few large batches instead of several small ones each."""
    if any(not text.strip() for text in document_texts):
        raise ValueError("cannot distil an empty document")
    started = time.perf_counter()
    limit = max(64, min(chunk_tokens, backbone.max_length - config.teacher_max_new_tokens - 256))
    owners: list[int] = []  # the document of each chunk
    chunks: list[str] = []
    for d, text in enumerate(document_texts):
        current: list[str] = []
        used = 0
        for sentence in split_sentences(text) or [text]:
            size = len(backbone.token_ids(sentence))
            if current and used + size > limit:
                chunks.append(" ".join(current))
                owners.append(d)
                current, used = [], 0
            current.append(sentence)
            used += size
        if current:
            chunks.append(" ".join(current))
            owners.append(d)
    asked = config.question_queries and config.max_question_queries
    with teacher_context():
        questions = write_questions(backbone, chunks, config) if asked else [[] for _ in chunks]
        queries = [make_queries(backbone, chunk, config, questions=q) for chunk, q in zip(chunks, questions)]
        examples = teacher_signals(backbone, [q for qs in queries for q in qs], config)
    per_document: list[list[DistillExample]] = [[] for _ in document_texts]
    taken = 0
    for owner, qs in zip(owners, queries):
        per_document[owner] += examples[taken : taken + len(qs)]
        taken += len(qs)
    counts = {kind: sum(1 for e in examples if e.kind == kind) for kind in QUERY_KINDS}
    logger.info(
        "context distillation: %d documents, %d examples (%s), %d scored tokens in %.1fs",
        len(document_texts),
        len(examples),
        ", ".join(f"{k}={v}" for k, v in counts.items()),
        sum(e.scored_tokens for e in examples),
        time.perf_counter() - started,
    )
    return per_document


def as_training_examples(examples: Sequence[DistillExample]) -> list:
    """Distillation examples as :class:`training.Example` rows for :func:`training.train`.

    Labels mark the continuation tokens (so ``scored_tokens`` counts them); the teacher's targets ride along
    as extras, which :func:`training.collate` pads and stacks and :func:`distill_step_loss` reads.
    """
    from continual_transformer.training import IGNORE, Example

    rows = []
    for example in examples:
        labels = [IGNORE] * len(example.input_ids)
        for position in example.positions:
            labels[position + 1] = example.input_ids[position + 1]
        extras = {
            "positions": torch.tensor(example.positions, dtype=torch.long),
            "position_mask": torch.ones(len(example.positions), dtype=torch.bool),
            "teacher_ids": example.teacher_ids,
            "teacher_logprobs": example.teacher_logprobs,
        }
        rows.append(Example(tuple(example.input_ids), tuple(labels), extras))
    return rows


def distill_step_loss(backbone: Backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss of one training step (a ``training.LossFn``): the student's forward pass, then
    :func:`distill_loss` at the scored positions."""
    logits = backbone.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    return distill_loss(logits, batch)
