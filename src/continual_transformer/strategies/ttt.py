"""``ttt``: test-time training of a dual MLP per decoder layer, with optional sparse, TF-IDF-gated updates.

Each chosen decoder layer's MLP is wrapped in a :class:`~continual_transformer.modules.dual_mlp.DualMLP`: the
frozen original plus a trainable copy, mixed as ``base + (1 - alpha) * (trainable - base)``. The copy starts
as the base weights, so the model is the base model bit for bit until it learns. ``alpha`` starts at
``alpha_initial`` and is multiplied by ``alpha_decay`` after every learned document, down to ``alpha_min``.

Learning a document is mini-batch gradient descent (:func:`continual_transformer.training.train`) on windows
of the document that keep their preceding context, optionally plus material the base model writes about the
document (rephrasings, question-answer pairs trained as chat exchanges: the format the model is later asked
in).

With ``sparse`` (sparse memory finetuning, Lin et al. 2025), only the ``trainable_neurons`` hidden neurons per
layer that the document uses much more than background text does are updated (TF-IDF over top-k usage rates,
see :mod:`continual_transformer.modules.neuron_stats`); the gradients of every other neuron's slices of
gate/up/down (``c_fc``/``c_proj``) are zeroed, and the optimizer is built per document with no weight decay,
so those weights stay exactly as they were. Background usage is calibrated once, lazily, on text the base
model generates itself (or a text file), and saved with the state.

Defaults come from the demo document (5 fictional facts) on SmolLM2-135M-Instruct, CPU; general-text
perplexity on 12k characters of WikiText-2 (19.21 before); ``finetune`` at its defaults: 5/5 answered,
perplexity +15.5 %.

- Dense copies of **all** layers, AdamW 1e-4: 5/5, +6.7 % in 12 steps; with ``alpha_initial`` 0.5: 5/5, +6.4 %
  in 22 steps. Under Adam, alpha only shrinks the effective step, so it defaults to 0 (and at 0 the base MLP
  is not computed at all).
- Sparse, 25 % of the neurons of all layers, 2e-4: 5/5, +11.0 % in 16 steps. Sparse in the top 25 % of layers
  (128 of 1536 neurons, 1e-3): 4/5, +72 %; 32 neurons: 5/5, +47 %. Unlike memory-layer slots, MLP neurons fire
  on every token, so concentrating the change in few weights hurts general text more than spreading it:
  ``sparse`` is off by default and kept for the ablation.
- Augmentation (1 rephrasing + model-written QA pairs) gave no gain (4/5 either way, top-25 % sparse) at 4.4x
  the learning time; SmolLM2-135M often attaches answers to the wrong question. Off by default.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from continual_transformer import training
from continual_transformer.config import ConfigError, GateArgs, OptimArgs, WindowArgs
from continual_transformer.distillation import ContextDistillConfig, check_objective
from continual_transformer.documents import Document, chunk_spans
from continual_transformer.layers import check_layer_spec, select_layers
from continual_transformer.modules.dual_mlp import DualMLP, deltas_disabled, find_mlp
from continual_transformer.modules.neuron_stats import active_units, record_usage, tfidf_scores, top_neurons
from continual_transformer.strategies import register_strategy
from continual_transformer.strategies.base import (
    LearnReport,
    StrategyStats,
    TrainingStrategy,
    check_delta_bits,
    tensor_bytes,
)

logger = logging.getLogger(__name__)

# Generic prompts whose greedy continuations are the default background corpus ("self"): half raw text to
# continue, half chat requests, so chat-template tokens and everyday prose both count as background.
BACKGROUND_RAW_PROMPTS: tuple[str, ...] = (
    "The history of the city begins",
    "In mathematics, a prime number is",
    "The weather forecast for tomorrow says",
    "Photosynthesis is the process by which",
    "The company announced on Monday that",
    "Once upon a time, in a small village,",
    "To install the software, first",
    "The football match ended with",
    "The recipe calls for two cups of flour and",
    "Scientists have discovered that",
    "The museum's new exhibition",
    "In the nineteenth century, railways",
    "The main causes of the war were",
    "Regular exercise improves",
    "The committee met to discuss",
    "A computer program is a sequence of",
)
BACKGROUND_CHAT_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Explain how a rainbow forms.",
    "Give me three tips for sleeping better.",
    "Who wrote Romeo and Juliet?",
    "What is the difference between weather and climate?",
    "Write a short poem about the sea.",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "Summarise the plot of a typical detective story.",
    "What year did the Second World War end?",
    "How does a bicycle work?",
    "Translate 'good morning' into Spanish.",
    "What are the planets of the solar system?",
    "Describe the water cycle.",
    "What does a doctor do?",
    "Name a famous painting and its painter.",
)

REPHRASE_PROMPTS: tuple[str, ...] = (
    "Rewrite the following text in other words. Keep every name, number and fact.\n\n{text}",
    "Explain the following text in your own words, sentence by sentence, keeping all names and numbers."
    "\n\n{text}",
    "List every fact in the following text as short, complete sentences.\n\n{text}",
)
# The text goes first and the format last: SmolLM2-135M follows a trailing "Q: ... / A: ..." template, but
# answers "write questions and answers about the text below" with bare numbered questions.
QA_PROMPT = (
    "{text}\n\nWrite {n} questions and their answers about the text above. Use the format:\nQ: ...\nA: ..."
)
AUGMENT_PIECE_TOKENS = 384
"""Longer documents are augmented piece by piece, so each prompt fits a small model's useful context."""


@dataclass(frozen=True, kw_only=True)
class TTTConfig:
    layers: str = "all"
    """Decoder layers whose MLP gets a trainable copy: finetune's spec (``all``, ``-8:``, ``4:12``, one index)
    or a share of the top layers (``25%``: the last quarter, at least one). All layers measured best (module
    docstring)."""
    alpha_initial: float = 0.0
    """Weight of the base MLP at the start: the output is ``base + (1 - alpha) * (trainable - base)``. With
    Adam, alpha > 0 only shrinks the effective step (same result, more steps: measured), so it starts at 0."""
    alpha_decay: float = 1.0
    """``alpha`` is multiplied by this after every learned document."""
    alpha_min: float = 0.0
    """Floor of ``alpha``."""
    optim: OptimArgs = field(default_factory=OptimArgs)
    """Optimiser settings (learning rate 1e-4, 30 epochs, early stop below loss 0.1); a new optimizer is built
    for every document. ``weight_decay`` must be 0 with ``sparse`` (it would move unselected neurons)."""
    windows: WindowArgs = field(default_factory=lambda: WindowArgs(window=256))
    """Training windows: 256 tokens, each re-reading 64 tokens of preceding text."""
    max_tokens_per_document: int = 8192
    """Scored document tokens learned at most (later windows are dropped); 0: no limit."""
    objective: str = "next_token"
    """What a document trains: ``next_token`` (the document's own next-token loss) or ``context_distill``
    (match the base model that reads the document in its prompt, on queries about it; ``distill``)."""
    distill: ContextDistillConfig = field(default_factory=ContextDistillConfig)
    """Queries and teacher settings of the ``context_distill`` objective."""
    gate: GateArgs = field(default_factory=GateArgs)
    """Apply what was learned only to prompts about learned documents (off by default; ``GateArgs``)."""
    trainable_dtype: str = "float32"
    """dtype of the trainable copies: ``float32`` keeps them in full precision under a bfloat16/float16 model
    (small updates are not rounded away; the copy's output is cast back), ``model``: the model's dtype."""
    anchor_weight: float = 5.0
    """Weight of a KL term, added to every step, that keeps the next-token distributions on background text
    (the ``background`` corpus) close to the base model's; 0 disables it. Its ``anchor_batch`` rows ride in
    each step's forward pass; the base model's logits of the background are computed once and kept
    (``training.Anchor``). On the demo document (CPU, WikiText perplexity 19.21 before): 0 -> 5/5 answered,
    +6.7 %; 1 -> 5/5, +3.6 %; 5 -> 5/5, +1.9 %; 20 -> 4/5, +0.8 %."""
    anchor_batch: int = 4
    """Background chunks per step for the anchor term."""
    sparse: bool = False
    """Update only the document's top TF-IDF neurons per layer (False: every neuron of the copies). Off by
    default: on SmolLM2 it raised general perplexity more than dense updates for the same facts learned
    (measured)."""
    trainable_neurons: int | float = 0.25
    """Neurons updated per layer and document: a count (>= 1) or a fraction of the layer's neurons (< 1)."""
    active_fraction: float = 0.02
    """A neuron is *used* by a token when its |activation| is in the token's top ``active_fraction`` of units.
    """
    background: str = "self"
    """Background corpus for the neuron usage statistics: ``self`` (text the base model generates from generic
    prompts) or the path of a UTF-8 text file."""
    background_prompts: int = 32
    """``self``: how many of the built-in generic prompts to generate from (at most 32)."""
    background_new_tokens: int = 64
    """``self``: tokens generated per prompt."""
    background_chunk_tokens: int = 64
    """Background text is split into chunks of this many tokens (the "documents" of the IDF)."""
    background_max_tokens: int = 65536
    """Tokens of a background file used at most (calibration time grows with it)."""
    augment: bool = False
    """Also train on rephrasings and question-answer pairs the base model writes about the document. Off by
    default: it does not win on the full benchmark. SmolLM2-135M, 50 novel-facts documents (H100): acquisition
    0.220 vs 0.210, general perplexity +39.0 % vs +35.8 %, known-fact forgetting 0.372 vs 0.256, at 2.5x the
    tokens learned and 2.6x the learning time. On the CPU quick profile (6 documents) it did win: 0.396 vs
    0.333 at equal perplexity."""
    augment_rephrasings: int = 1
    """Rephrasings per document piece (one prompt each, at most 3)."""
    augment_questions: int = 8
    """Question-answer pairs asked for per document piece (0: none)."""
    augment_new_tokens: int = 256
    """Tokens generated per augmentation answer."""
    sentence_exchanges: bool = False
    """Also train each sentence of the document as a chat exchange (``Tell me a fact: "<first words> ..."``).
    """
    delta_bits: int = 8
    """Bits per value of what learning changed in the copies, as checkpoints store it and as the model then
    uses it: after each learning run the change from the base MLP is rounded to this many bits with one
    scale per row (8: 4x smaller than float32; 4: 8x; 0: kept exactly, stored whole)."""

    def __post_init__(self) -> None:
        key = "strategies.ttt."
        check_layer_spec(self.layers, f"{key}layers")
        check_objective(self.objective, f"{key}objective")
        check_delta_bits(self.delta_bits, f"{key}delta_bits")
        if not 0 <= self.alpha_min <= self.alpha_initial < 1:
            raise ConfigError(
                f"{key}alpha_initial/alpha_min: need 0 <= alpha_min <= alpha_initial < 1, "
                f"got {self.alpha_min}, {self.alpha_initial}"
            )
        if not 0 < self.alpha_decay <= 1:
            raise ConfigError(f"{key}alpha_decay: must be in (0, 1], got {self.alpha_decay}")
        if self.sparse and self.optim.weight_decay > 0:
            raise ConfigError(
                f"{key}optim.weight_decay: must be 0 with sparse updates "
                "(decay would move unselected neurons)"
            )
        if self.trainable_dtype not in ("float32", "model"):
            raise ConfigError(f"{key}trainable_dtype: must be float32 or model, got {self.trainable_dtype!r}")
        if self.anchor_weight < 0 or self.anchor_batch < 1:
            raise ConfigError(f"{key}anchor_weight must be >= 0 and anchor_batch >= 1")
        if self.max_tokens_per_document < 0:
            raise ConfigError(f"{key}max_tokens_per_document: must be >= 0 (0: no limit)")
        neurons = self.trainable_neurons
        is_number = isinstance(neurons, (int, float)) and not isinstance(neurons, bool)
        if not is_number or neurons <= 0 or (neurons >= 1 and neurons != int(neurons)):
            raise ConfigError(
                f"{key}trainable_neurons: must be a count >= 1 or a fraction in (0, 1), got {neurons!r}"
            )
        if not 0 < self.active_fraction <= 1:
            raise ConfigError(f"{key}active_fraction: must be in (0, 1]")
        if not self.background.strip():
            raise ConfigError(f"{key}background: 'self' or the path of a text file")
        if not 1 <= self.background_prompts <= len(BACKGROUND_RAW_PROMPTS) + len(BACKGROUND_CHAT_PROMPTS):
            raise ConfigError(f"{key}background_prompts: must be in [1, 32]")
        if (
            self.background_new_tokens < 1
            or self.background_chunk_tokens < 2
            or self.background_max_tokens < 2
        ):
            raise ConfigError(
                f"{key}background_new_tokens, background_chunk_tokens, background_max_tokens: too small"
            )
        if not 0 <= self.augment_rephrasings <= len(REPHRASE_PROMPTS):
            raise ConfigError(f"{key}augment_rephrasings: must be in [0, {len(REPHRASE_PROMPTS)}]")
        if self.augment_questions < 0 or self.augment_new_tokens < 1:
            raise ConfigError(f"{key}augment_questions must be >= 0 and augment_new_tokens >= 1")


select_ttt_layers = select_layers  # the layer spec, shares such as ``25%`` included, is layers.select_layers


# ------------------------------------------------------------------------------------------------------------
# Augmentation text handling (pure functions, tested on strings)

_Q_MARK = re.compile(
    r"^(?:[-*•>#\s]|\d+[.)]\s*)*\**\s*(?:Q|Question)\s*\d*\s*\**\s*[:.)\-]\s*\**\s*", re.IGNORECASE
)
_A_MARK = re.compile(
    r"^(?:[-*•>#\s]|\d+[.)]\s*)*\**\s*(?:A|Answer)\s*\d*\s*\**\s*[:.)\-]\s*\**\s*", re.IGNORECASE
)
_INLINE_A = re.compile(r"\s\**\s*(?:A|Answer)\s*\d*\s*\**\s*:\s*\**\s*", re.IGNORECASE)
_NUMBERED = re.compile(r"^\s*(?:[-*•]\s*)?\d+[.)]\s+")


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("**", "")).strip(" \t-*\"'")


def parse_qa_pairs(text: str) -> list[tuple[str, str]]:
    """Question-answer pairs from messy model output.

    Accepts ``Q: ... A: ...`` on one line, ``Q1:``/``Question:`` and ``A1:``/``Answer:`` on consecutive lines,
    numbering, bullets and markdown bold, and numbered questions ending in ``?`` without a ``Q:`` marker.
    Answers may continue on following lines until the next question or a blank line. A question without an
    answer (e.g. cut off by the token limit) is dropped, and a question asked again keeps its first answer
    (small models loop).
    """
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    question: str | None = None
    answer: list[str] | None = None

    def flush() -> None:
        nonlocal question, answer
        if question and answer and _clean(" ".join(answer)):
            pair = (_clean(question), _clean(" ".join(answer)))
            if pair[0] and pair[0].lower() not in seen:  # a repeated question keeps its first answer
                seen.add(pair[0].lower())
                pairs.append(pair)
        question, answer = None, None

    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            if answer:
                flush()
            continue
        q_match = _Q_MARK.match(line)
        a_match = _A_MARK.match(line)
        if q_match and not (a_match and a_match.end() >= q_match.end()):
            flush()
            rest = line[q_match.end() :]
            inline = _INLINE_A.search(rest)
            if inline:
                question, answer = rest[: inline.start()], [rest[inline.end() :]]
            else:
                question, answer = rest, None
        elif a_match and question is not None:
            answer = [line[a_match.end() :]]
        elif _NUMBERED.match(line) and line.rstrip("*").endswith("?"):
            flush()
            question, answer = _NUMBERED.sub("", line), None
        elif question is not None and answer is None and not _NUMBERED.match(line):
            answer = [line]  # "1. What ...?\n   Tarnhelm." — the next line answers
        elif answer is not None:
            answer.append(line)
    flush()
    return pairs


def clean_rephrasing(text: str) -> str:
    """Model output without a leading announcement line such as ``Here is the rewritten text:``."""
    lines = text.strip().splitlines()
    while lines and (
        not lines[0].strip() or (lines[0].rstrip().endswith(":") and len(lines[0].split()) <= 12)
    ):
        lines.pop(0)
    return "\n".join(lines).strip()


_TERM = re.compile(r"\b(?:[A-Z][\w'-]+|\d[\d,.]*)\b")
_WORD = re.compile(r"[A-Za-z0-9]+")
_STOP = frozenset(
    {
        "a",
        "an",
        "the",
        "of",
        "in",
        "on",
        "at",
        "to",
        "for",
        "and",
        "or",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "with",
        "by",
        "from",
        "as",
        "what",
        "which",
        "who",
        "whom",
        "whose",
        "where",
        "when",
        "why",
        "how",
        "does",
        "do",
        "did",
        "has",
        "have",
        "had",
        "not",
        "no",
        "yes",
    }
)


def key_terms(text: str) -> set[str]:
    """Names and numbers of a text (capitalised words and digits), lower-cased."""
    return {t.lower().rstrip(".,") for t in _TERM.findall(text)}


def grounded(candidate: str, document: str, *, min_share: float) -> bool:
    """True when the candidate's names and numbers mostly come from the document (no invented facts)."""
    terms = key_terms(candidate) - _STOP
    if not terms:
        return False
    return len(terms & key_terms(document)) / len(terms) >= min_share


def _stems(text: str) -> set[str]:
    """Content words cut to 5 characters (``Velorian`` meets ``Veloria``), stop words dropped."""
    return {w.lower()[:5] for w in _WORD.findall(text) if w.lower() not in _STOP}


def answer_grounded(question: str, answer: str, document: str) -> bool:
    """A plausible pair: the answer shares a word with the document, and a sentence-long answer (4 words or
    more) also restates part of its question (small models attach answers to the wrong question)."""
    words = _stems(answer)
    if not words & _stems(document):
        return False
    return len(answer.split()) < 4 or bool(words & _stems(question))


def split_sentences(text: str) -> list[str]:
    """Sentences of prose: paragraphs split on blank lines, line wraps joined, split after ``.!?``."""
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = re.sub(r"\s+", " ", paragraph).strip()
        sentences.extend(s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[\"'A-Z0-9])", flat) if s.strip())
    return sentences


def sentence_exchanges(text: str) -> list[tuple[str, str]]:
    """Each sentence of four words or more as (prompt naming its first words, the sentence)."""
    pairs = []
    for sentence in split_sentences(text):
        words = sentence.split()
        if len(words) >= 4:
            start = " ".join(words[: min(4, len(words) // 2)])
            pairs.append((f'Tell me a fact: "{start} ..."', sentence))
    return pairs


# ------------------------------------------------------------------------------------------------------------


@register_strategy("ttt", config_cls=TTTConfig)
class TTTStrategy(TrainingStrategy):
    modifies_backbone = True

    def __init__(self, backbone, config: TTTConfig, *, settings) -> None:
        super().__init__(backbone, config, settings=settings)
        self.layer_ids = select_layers(config.layers, backbone.num_layers, "strategies.ttt.layers")
        self._wrapped: list[tuple[torch.nn.Module, str, DualMLP]] = []
        for i in self.layer_ids:
            layer = backbone.layers[i]
            attr, mlp = find_mlp(layer)
            dual = DualMLP(
                mlp,
                alpha=config.alpha_initial,
                trainable_dtype=torch.float32 if config.trainable_dtype == "float32" else None,
            )
            setattr(layer, attr, dual)
            self._wrapped.append((layer, attr, dual))
        device = backbone.device
        # Background usage statistics: fixed shapes from the start, so every checkpoint has the same tensors.
        self._df = [torch.zeros(d.neurons, dtype=torch.float32, device=device) for d in self.duals]
        self._chunks = torch.zeros((), dtype=torch.float32, device=device)
        self.calibration_seconds: float | None = None
        self._background: list[list[int]] | None = None  # token rows of the background corpus, made once
        self._reference: training.ReferenceLogits | None = None  # the base model's logits of the background
        self._grad_masks: dict[int, torch.Tensor] = {}  # id(param) -> 0/1 mask, set per document

    @property
    def duals(self) -> list[DualMLP]:
        return [dual for _, _, dual in self._wrapped]

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trainable copies' parameters, by state name (``layers.<i>.<name inside the MLP>``)."""
        return {
            f"layers.{i}.{name}": p
            for i, dual in zip(self.layer_ids, self.duals)
            for name, p in dual.trainable.named_parameters()
        }

    # -- calibration -----------------------------------------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        return float(self._chunks) > 0  # sync: once per document

    def _k(self, dual: DualMLP) -> int:
        return active_units(dual.neurons, self.config.active_fraction)

    def background_rows(self) -> list[list[int]]:
        """Token chunks of the background corpus (made once, with the base model, and kept)."""
        if self._background is None:
            with deltas_disabled(self.duals):
                self._background = self._make_background_rows()
            if not self._background:
                raise ValueError("strategies.ttt.background: the background text has no tokens")
        return self._background

    def _make_background_rows(self) -> list[list[int]]:
        cfg, bb = self.config, self.backbone
        if cfg.background == "self":
            new_tokens = max(1, min(cfg.background_new_tokens, bb.max_length - 64))
            n_raw = min(len(BACKGROUND_RAW_PROMPTS), (cfg.background_prompts + 1) // 2)
            raw = list(BACKGROUND_RAW_PROMPTS[:n_raw])
            chat = list(BACKGROUND_CHAT_PROMPTS[: cfg.background_prompts - n_raw])
            texts = [f"{p} {c}" for p, c in zip(raw, bb.generate(raw, chat=False, max_new_tokens=new_tokens))]
            if chat:
                answers = bb.generate(chat, chat=True, max_new_tokens=new_tokens)
                texts += ["".join(bb.format_exchange(p, a)) for p, a in zip(chat, answers)]
            budget = None
        else:
            path = Path(cfg.background).expanduser()
            if not path.is_file():
                raise ConfigError(
                    f"strategies.ttt.background: {cfg.background!r} is neither 'self' nor a text file"
                )
            texts = [path.read_text(encoding="utf-8")]
            budget = cfg.background_max_tokens
        rows: list[list[int]] = []
        for text in texts:
            ids = bb.tokenizer(text, add_special_tokens=False)["input_ids"]
            if budget is not None:
                ids = ids[: budget - sum(len(r) for r in rows)]
            size = cfg.background_chunk_tokens
            rows.extend(ids[a:b] for a, b in chunk_spans(len(ids), size, 0) if b - a >= max(2, size // 4))
        return rows

    @torch.no_grad()
    def calibrate(self) -> float:
        """Measure background neuron usage with the base model (deltas off); returns the seconds it took."""
        start = time.perf_counter()
        rows = self.background_rows()
        with deltas_disabled(self.duals):
            usage = record_usage(
                self.backbone.model,
                rows,
                [d.base_output_projection for d in self.duals],
                [d.neurons for d in self.duals],
                [self._k(d) for d in self.duals],
                pad_id=self.backbone.tokenizer.pad_token_id,
                batch_size=self.backbone.generation.batch_size,
            )
        for df, acc in zip(self._df, usage):
            df.copy_(acc.rate_sum)
        self._chunks.fill_(float(len(rows)))
        self.calibration_seconds = time.perf_counter() - start
        logger.info(
            "ttt: calibrated neuron usage on %d background chunks (%s) in %.1fs",
            len(rows),
            self.config.background,
            self.calibration_seconds,
        )
        return self.calibration_seconds

    @torch.no_grad()
    def neuron_scores(self, examples: Sequence[training.Example]) -> list[torch.Tensor]:
        """TF-IDF score (I,) per wrapped layer of the neurons the examples use (base model, deltas off)."""
        with deltas_disabled(self.duals):
            usage = record_usage(
                self.backbone.model,
                [e.input_ids for e in examples],
                [d.base_output_projection for d in self.duals],
                [d.neurons for d in self.duals],
                [self._k(d) for d in self.duals],
                pad_id=self.backbone.tokenizer.pad_token_id,
                batch_size=self.config.optim.batch_size,
            )
        chunks = float(self._chunks)
        return [tfidf_scores(acc.rate, df, chunks) for acc, df in zip(usage, self._df)]

    def _neurons_per_layer(self, dual: DualMLP) -> int:
        n = self.config.trainable_neurons
        return min(dual.neurons, int(n) if n >= 1 else max(1, math.ceil(n * dual.neurons)))

    # -- augmentation ----------------------------------------------------------------------------------------
    def augmentation(self, text: str) -> tuple[list[str], list[tuple[str, str]]]:
        """(rephrasings, question-answer pairs) the base model writes about ``text``.

        Generated with the deltas switched off: the material then depends only on the document and the base
        model, not on what was learned before (no drift from compounding earlier learning). Rephrasings whose
        names and numbers are mostly not in the document, and implausible pairs (:func:`answer_grounded`), are
        dropped.
        """
        cfg, bb = self.config, self.backbone
        ids = bb.tokenizer(text, add_special_tokens=False)["input_ids"]
        if cfg.max_tokens_per_document:
            ids = ids[: cfg.max_tokens_per_document]
        pieces = [bb.tokenizer.decode(ids[a:b]) for a, b in chunk_spans(len(ids), AUGMENT_PIECE_TOKENS, 0)]
        prompts: list[str] = []
        for piece in pieces:
            prompts += [
                template.format(text=piece) for template in REPHRASE_PROMPTS[: cfg.augment_rephrasings]
            ]
            if cfg.augment_questions:
                prompts.append(QA_PROMPT.format(n=cfg.augment_questions, text=piece))
        longest = max(
            (
                len(bb.tokenizer(bb.format_prompt(p, chat=True), add_special_tokens=False)["input_ids"])
                for p in prompts
            ),
            default=0,
        )
        new_tokens = min(cfg.augment_new_tokens, bb.max_length - longest)
        if (
            new_tokens < 16
        ):  # a model with a short context (or no prompt at all): nothing sensible to generate
            logger.info(
                "ttt: no augmentation (prompt of %d tokens, model context %d)", longest, bb.max_length
            )
            return [], []
        start = time.perf_counter()
        with deltas_disabled(self.duals):
            outputs = bb.generate(prompts, chat=True, max_new_tokens=new_tokens)
        per_piece = cfg.augment_rephrasings + (1 if cfg.augment_questions else 0)
        rephrasings, pairs = [], []
        for p, piece in enumerate(pieces):
            block = outputs[p * per_piece : (p + 1) * per_piece]
            for out in block[: cfg.augment_rephrasings]:
                candidate = clean_rephrasing(out)
                if grounded(candidate, piece, min_share=0.6):
                    rephrasings.append(candidate)
            if cfg.augment_questions:
                pairs += [(q, a) for q, a in parse_qa_pairs(block[-1]) if answer_grounded(q, a, piece)]
        logger.info(
            "ttt: augmentation from %d prompts in %.1fs: %d rephrasings, %d question-answer pairs kept",
            len(prompts),
            time.perf_counter() - start,
            len(rephrasings),
            len(pairs),
        )
        return rephrasings, pairs

    def training_examples(
        self, document: Document, ids: Sequence[int] | None = None
    ) -> tuple[list[training.Example], dict[str, Any]]:
        """The document's windows (up to ``max_tokens_per_document`` scored tokens), then any augmentation."""
        cfg, bb, text = self.config, self.backbone, document.text
        examples = training.window_examples(bb, text, cfg.windows, ids)
        if cfg.max_tokens_per_document:
            kept, scored = [], 0
            for example in examples:
                if scored >= cfg.max_tokens_per_document:
                    break
                kept.append(example)
                scored += example.scored_tokens
            examples = kept
        counts = {"windows": len(examples), "rephrasings": 0, "qa_pairs": 0, "sentences": 0}
        if cfg.augment:
            rephrasings, pairs = self.augmentation(text)
            for r in rephrasings:
                examples += training.window_examples(bb, r, cfg.windows)
            examples += training.exchange_examples(bb, pairs)
            counts.update(rephrasings=len(rephrasings), qa_pairs=len(pairs))
        if cfg.sentence_exchanges:
            sentences = sentence_exchanges(text)
            examples += training.exchange_examples(bb, sentences)
            counts["sentences"] = len(sentences)
        return examples, counts

    # -- learning --------------------------------------------------------------------------------------------
    def _anchor(self, seed: int) -> training.Anchor:
        """KL(base || trained) on ``anchor_batch`` random background chunks per step."""
        if self._reference is None:
            # the base model's logits of the background: fixed while the copies train (kept until close)
            self._reference = training.ReferenceLogits(
                self.background_rows(),
                self._base_model,
                batch_size=self.backbone.generation.batch_size,
            )
        return training.Anchor(
            self._reference, weight=self.config.anchor_weight, batch=self.config.anchor_batch, seed=seed
        )

    def _mask_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Zero the gradient slices of unselected neurons (runs after each backward, before clipping)."""
        for p in params:
            if p.grad is not None:
                p.grad.mul_(self._grad_masks[id(p)])

    def learn(self, document: Document) -> LearnReport:
        calibration = 0.0
        if self.config.sparse and not self.calibrated:
            calibration = self.calibrate()  # once, before the first document; not counted as learning time
        report = super().learn(document)
        return dataclasses.replace(report, extra={**report.extra, "calibration_seconds": calibration})

    def learn_documents(self, documents: Sequence[Document]) -> list[LearnReport]:
        if self.config.sparse and not self.calibrated and len(documents) > 1:
            self.calibrate()  # once, before the first document; not counted as learning time
        return super().learn_documents(documents)

    def training_options(self, examples: Sequence[training.Example]) -> dict[str, Any]:
        cfg = self.config
        options: dict[str, Any] = {}
        if cfg.sparse:
            self._grad_masks = {}
            for dual, scores in zip(self.duals, self.neuron_scores(examples)):
                chosen = top_neurons(scores, self._neurons_per_layer(dual))
                masks = dual.layout.masks(chosen, dict(dual.trainable.named_parameters()))
                self._grad_masks.update({id(p): masks[n] for n, p in dual.trainable.named_parameters()})
            options["grad_hook"] = self._mask_gradients
        if cfg.anchor_weight > 0:
            options["anchor"] = self._anchor(self.settings.seed + self.documents_learned)
        for dual in self.duals:
            dual.mark_changed()
        return options

    def after_training(self, document: Document, losses: list[float]) -> dict[str, Any]:
        cfg = self.config
        self._grad_masks = {}
        logger.info(
            "ttt: %s: %d steps, loss %.3f -> %.3f",
            document.id,
            len(losses),
            losses[0] if losses else float("nan"),
            losses[-1] if losses else float("nan"),
        )
        alpha = self.alpha
        decayed = max(cfg.alpha_min, alpha * cfg.alpha_decay)
        if decayed != alpha:  # (learn_documents calls this once per document: no writes when nothing changes)
            for dual in self.duals:
                dual.set_alpha(decayed)
        neurons = [self._neurons_per_layer(d) if cfg.sparse else d.neurons for d in self.duals]
        return {
            "alpha": alpha,
            "neurons_per_layer": neurons,
            "layers": f"{self.layer_ids[0]}..{self.layer_ids[-1]}",
        }

    def _base_model(self) -> AbstractContextManager[Any]:
        """The trainable copies bypassed: every wrapped layer computes its base MLP."""
        return deltas_disabled(self.duals)

    @property
    def alpha(self) -> float:
        """The current ``alpha`` (the same in every wrapped layer)."""
        return self.duals[0].current_alpha if self.duals else self.config.alpha_initial

    # -- state -----------------------------------------------------------------------------------------------
    def trained_backbone_parameters(self) -> set[str]:
        owned = {id(p) for p in self.trainable_parameters().values()}
        return {name for name, p in self.backbone.model.named_parameters() if id(p) in owned}

    def delta_base(self) -> dict[str, torch.Tensor]:
        return self._base_weights()

    def weights_changed(self) -> None:
        for dual in self.duals:
            dual.mark_changed()

    def _base_weights(self) -> dict[str, torch.Tensor]:
        """The frozen MLP weights the trainable copies started from, by state name."""
        return {
            f"layers.{i}.{name}": p.detach()
            for i, dual in zip(self.layer_ids, self.duals)
            for name, p in dual.base.named_parameters()
        }

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable copies as what learning changed in them (:func:`delta_state` against the base MLPs:
        the neurons a document updated, or ``delta_bits`` codes), the alphas and the calibration
        statistics."""
        state = dict(self.stored_delta())
        for i, dual, df in zip(self.layer_ids, self.duals, self._df):
            state[f"layers.{i}.alpha"] = dual.alpha.detach()
            state[f"calibration.{i}.df"] = df
        state["calibration.chunks"] = self._chunks
        return state

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a :meth:`trainable_state` (full copies, as older checkpoints hold them, are read too);
        everything is checked before anything changes."""
        what = f"ttt state does not match layers {self.config.layers!r}"
        params = self.trainable_parameters()
        extra = {
            k: t
            for k, t in (
                *[(f"layers.{i}.alpha", d.alpha) for i, d in zip(self.layer_ids, self.duals)],
                *[(f"calibration.{i}.df", df) for i, df in zip(self.layer_ids, self._df)],
                ("calibration.chunks", self._chunks),
            )
        }
        missing = sorted(k for k in extra if k not in state)
        if missing:
            raise ValueError(f"{what}: missing {missing[:3]}")
        copies = self.load_stored_delta({k: v for k, v in state.items() if k not in extra}, what)
        current = {**params, **extra}
        full = {**copies, **{k: state[k] for k in extra}}
        for key, target in current.items():  # check everything before changing anything
            if full[key].shape != target.shape:
                raise ValueError(f"{key}: shape {tuple(full[key].shape)} != {tuple(target.shape)}")
        for key, target in current.items():
            target.copy_(full[key])
        for dual in self.duals:
            dual.sync_alpha()
            dual.mark_changed()

    @torch.no_grad()
    def reset(self) -> None:
        """Forget learned weights and the alpha schedule; the background statistics (base model's) stay."""
        for dual in self.duals:
            dual.reset_trainable()
            dual.set_alpha(self.config.alpha_initial)
        self._rounded = None
        self.documents_learned = 0
        self.forget_all()

    def close(self) -> None:
        """Put the original MLP modules back into their layers."""
        for layer, attr, dual in self._wrapped:
            setattr(layer, attr, dual.base)
        self._wrapped = []
        self._df = []
        self._reference = None

    def stats(self) -> StrategyStats:
        n = sum(d.trainable_parameter_count() for d in self.duals)
        return StrategyStats(
            params_added=n,
            params_trainable=n,
            state_bytes=tensor_bytes(self.trainable_state()),
            documents=self.documents_learned,
        )
