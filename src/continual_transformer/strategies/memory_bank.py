"""``memory_bank``: one trained vector per learned sentence, retrieved by similarity and added to the residual
stream.

The GPT-2 memory-bank design, on our backbone, with the backbone frozen:

* **Examples.** A document is split into sentences (``unit: sentence``) or token chunks (``unit: chunk``).
* **Key.** A sentence embedding of the example from ``key_encoder`` (the packaged MiniLM by default), or with
  ``key_encoder: backbone`` the mean of its hidden states at ``key_layer``, each position normalised first (a
  middle layer by default; position 0, an attention sink alike in every text, is left out), minus the mean of
  a few generic sentences, normalised. Without the per-position normalisation a few tokens with massive
  activations dominated the mean: every BoolQ question matched one sentence about chickpeas at cosine 0.997.
  The backbone's pooled states carry genre as much as content: after learning Wikipedia-like passages (BoolQ),
  every 512-token WikiText window retrieved a memory and general perplexity rose 43-fold; MiniLM keys keep the
  two apart.
* **Value.** A vector ``v`` in the model's hidden space, trained by a few Adam steps on the example's own
  next-token loss while ``h' = h + g · v`` is added at ``fuse_layer`` — gradients flow only into ``v`` and the
  gate ``g = sigmoid(gate_logit)`` (``gate: null``; a number fixes ``g``). All examples of a document are
  trained together in one batch. ``v`` is parametrised in units of the layer's hidden-state RMS, so one
  learning rate fits models of any scale.
* **Context distillation** (``objective: context_distill``). The values are instead trained so that the
  model *without* the document but *with* the memories fused matches the teacher, the base model with the
  document in its prompt (:mod:`continual_transformer.distillation`: sentence prefixes, questions the base
  model writes, "Tell me about X"; the teacher runs with the bank off). Memories stay keyed on the
  document's sentences; each query retrieves by its *own* key from the stored memories plus the new ones,
  exactly as at answer time (top ``top_k``, ``min_similarity``, softmax weights), and only the values it
  retrieves receive its gradient. A query that retrieves no new memory trains nothing (the bank would not
  answer it either); a sentence no query retrieves is not kept. All queries train together, batched
  (``distill_batch_size``), for ``distill_steps`` Adam steps at ``distill_learning_rate``.
* **Keep or reject.** The memory is kept only if it lowers the example's loss by more than ``min_gain``
  (relative); its importance starts at that gain. With ``context_distill`` the gain is that of the
  distillation KL of the queries that retrieve the memory, weighted by its retrieval weight.
* **Duplicates.** An example whose key has cosine > ``duplicate_threshold`` with a stored key is skipped (the
  stored memory is reinforced) or replaces it (``on_duplicate``).
* **Retrieval and fusion.** A prompt's key retrieves the ``top_k`` memories by similarity × importance among
  those with similarity >= ``min_similarity`` (none pass: the base model, bit for bit); their gated values,
  weighted by a softmax of similarity / ``retrieval_temperature``, are added to the hidden states at
  ``fuse_layer`` of the last ``fuse_tokens`` prompt tokens and every generated token (``fuse_tokens: 0``:
  every position). Each use raises a memory's importance by ``use_bonus``; a full bank evicts its least
  important memory.

What it can and cannot do, honestly: a value is one vector added to every fused position — a steering
direction. It lowers the loss of the sentence it was trained on (it shifts the model toward that sentence's
tokens), and retrieval keeps it away from unrelated prompts; but one pooled vector has to encode a whole
sentence at once, so it cannot reliably make a small model *spell* a new name or number in answer to a
differently worded question (the earlier system's hidden-state bias scored 0.006 on such probes). Token-level
memory (``knowledge_store``) or retrieval into the prompt (``retrieval``) are the strategies for new names;
measure before relying on this one.

Context distillation, measured (SmolLM2-135M-Instruct, CPU quick profile, 6 novel-facts documents, 48
probes; ``benchmarks/results/knowledge/cpu-quick-memory_bank/``): acquisition 0.042 (0.10x the oracle's
0.438) against 0.021 for next-token, both at +0.0 % perplexity and no known fact lost; the two extra answers
are one fact (a year) asked two ways. On the first document the queries that retrieve a new memory fell from
a mean KL of 0.46 to 0.07 nats (all queries), yet 6 of its 17 queries retrieve any memory (MiniLM similarity
of a sentence prefix or a generated question to the sentence below 0.6), and the answers it changes often
degenerate ("a glass that is a glass that is ..."): one vector added at every position steers the whole
continuation. Why it carries so little (``benchmarks/memory_bank_distill.py``): 94 % of the held-out probes
retrieve a memory of their own document, and values fitted to the probes themselves lower their KL to the
teacher from 0.77 to 0.17 nats, so neither retrieval nor one vector's capacity is the limit; but the values
trained on the distillation queries (their KL 0.35 -> 0.07) *raise* the probes' KL (0.81 -> 1.04): a
steering vector fitted to a few phrasings does not transfer to other phrasings of the same fact. Learning
took 14x the wall time of next-token (1,663 s against 120 s for the 6 documents; the
teacher writes questions and continuations). Next-token stays the default: one fact more is no measurable
gain.

Measured once on SmolLM2-135M-Instruct (CPU, 3 short fictional documents, 6 questions, 3 general questions):
each sentence's own loss fell from ~6.0 to 0.9-2.1 nats; 2 of 6 answers contained the new name ("Tarnhelm",
"Plimbe") against 0 for the base model, but answers to the related questions degenerated ("Tarnhelm. Tarnhelm.
...", digit strings), because the value is added to every generated token; the 3 unrelated questions were
answered exactly as by the base model (nothing retrieved). Learning costs ``steps`` forward+backward passes
per document (about a minute per 3-sentence document on 2 busy CPU cores).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from continual_transformer import distillation
from continual_transformer.backbone import ScoringBatch, ScoringHooks, sequence_nll
from continual_transformer.config import ConfigError
from continual_transformer.distillation import ContextDistillConfig, DistillExample, check_objective
from continual_transformer.documents import Document, chunk_spans
from continual_transformer.layers import hidden_size, layer_index
from continual_transformer.modules.embedder import SentenceEmbedder
from continual_transformer.modules.hooks import LayerCapture, ResidualAdder, layer_output
from continual_transformer.modules.memory_store import MemoryStore
from continual_transformer.strategies import register_strategy
from continual_transformer.strategies.base import LearnReport, Strategy, StrategyStats, tensor_bytes

logger = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
# Generic sentences whose mean pooled state is subtracted from every key (the model's common direction).
_BACKGROUND = (
    "The weather was pleasant and the streets were quiet in the morning.",
    "She opened the book and started reading the first chapter.",
    "Prices rose slightly during the last quarter of the year.",
    "The committee will meet again next week to discuss the proposal.",
    "He asked a simple question and waited for an answer.",
    "Water, food and shelter are basic needs of every person.",
    "The team scored twice in the second half and won the match.",
    "Please write a short summary of the text below.",
)


# Default ``min_similarity`` per key encoder (see the field's documentation for the measurements).
_MIN_SIMILARITY = {"backbone": 0.65, "embedder": 0.6}


@dataclass(frozen=True, kw_only=True)
class MemoryBankConfig:
    key_encoder: str = "minilm-l6"
    """What turns a text into a key: ``backbone`` (pooled hidden states at ``key_layer``) or a sentence
    embedder (a packaged name such as ``minilm-l6``, a local directory or a hub id)."""
    key_layer: int | None = None
    """Decoder layer whose mean-pooled output is a memory's key (``key_encoder: backbone``) and, by default,
    where values are fused; ``None``: the middle layer."""
    fuse_layer: int | None = None
    """Decoder layer whose output receives the retrieved values; ``None``: the key layer."""
    unit: str = "sentence"
    """What one memory holds: a ``sentence`` or a ``chunk`` of ``chunk_tokens`` tokens."""
    chunk_tokens: int = 96
    """Tokens per chunk (``unit: chunk``), and the most tokens of one sentence that are learned."""
    min_tokens: int = 4
    """Sentences shorter than this are joined to the next one."""
    steps: int = 12
    """Adam steps that train the values of a document's examples (together); each is a forward and backward
    pass."""
    learning_rate: float = 0.2
    """Adam learning rate of the values, in units of the fused layer's hidden-state RMS (``next_token``)."""
    distill_steps: int = 20
    """Adam steps of ``context_distill`` (each a forward and backward pass over every query that retrieves a
    new memory)."""
    distill_learning_rate: float = 0.02
    """The same for ``context_distill``: the student starts close to the teacher (KL ~0.3-0.5 nats on
    SmolLM2-135M), and 0.2 (each of 576 coordinates moving 0.2 RMS per step) overshoots: the KL of the fused
    queries rose from 0.46 to 0.81 in 12 steps."""
    gate: float | None = None
    """``None``: a learned sigmoid gate per memory (starts at 0.5); a number in [0, 1]: a fixed gate."""
    min_gain: float = 0.05
    """A memory is kept only if it lowers its example's mean loss by more than this fraction."""
    top_k: int = 2
    """Memories fused per prompt at most."""
    min_similarity: float | None = None
    """Cosine similarity between prompt and memory keys below which a memory is never used; ``None``: 0.6 with
    a sentence embedder, 0.65 with ``backbone`` keys. Best match over the sentences of 50 documents, 10th /
    50th percentile and maximum (``benchmarks/relevance_gates.py``, SmolLM2-135M): MiniLM keys, novel-facts
    probes 0.64 / 0.77, BoolQ questions 0.51 / 0.60; general questions at most 0.55, 512-token WikiText
    windows at most 0.48. Backbone keys separate less: novel-facts probes 0.63 / 0.78 but general questions up
    to 0.71; after BoolQ passages the WikiText windows (0.71-0.80) sit above the BoolQ questions (0.44 /
    0.53)."""
    retrieval_temperature: float = 0.05
    """Softmax temperature over the similarities of the retrieved memories (their fusion weights)."""
    duplicate_threshold: float = 0.97
    """Key cosine above which a new example counts as a duplicate of a stored memory."""
    on_duplicate: str = "skip"
    """``skip`` (keep the stored memory, reinforce it) or ``replace`` (train the new one in its slot)."""
    capacity: int = 1024
    """Most memories; when full, the least important is evicted."""
    use_bonus: float = 0.02
    """Importance added to a memory each time it is retrieved."""
    fuse_tokens: int = 0
    """Fuse into the last N prompt tokens and every generated token; 0: every position."""
    objective: str = "next_token"
    """What trains the values: ``next_token`` (each example's own next-token loss, its value fused into it) or
    ``context_distill`` (queries about the document, each fused with the memories its own key retrieves, match
    the base model that reads the document in its prompt; ``distill``)."""
    distill: ContextDistillConfig = field(default_factory=ContextDistillConfig)
    """Queries and teacher settings of the ``context_distill`` objective."""
    distill_batch_size: int = 8
    """Distillation queries per forward pass (``context_distill``); each step accumulates over all of them."""

    def __post_init__(self) -> None:
        key = "strategies.memory_bank"
        if self.unit not in ("sentence", "chunk"):
            raise ConfigError(f"{key}.unit: must be sentence or chunk, got {self.unit!r}")
        if self.chunk_tokens < 4:
            raise ConfigError(f"{key}.chunk_tokens: must be >= 4, got {self.chunk_tokens}")
        if self.min_tokens < 1:
            raise ConfigError(f"{key}.min_tokens: must be >= 1, got {self.min_tokens}")
        if self.steps < 1 or self.distill_steps < 1:
            raise ConfigError(f"{key}.steps and distill_steps must be >= 1")
        if not self.learning_rate > 0 or not self.distill_learning_rate > 0:
            raise ConfigError(f"{key}.learning_rate and distill_learning_rate must be > 0")
        if self.gate is not None and not 0.0 <= self.gate <= 1.0:
            raise ConfigError(f"{key}.gate: must be null (learned) or in [0, 1], got {self.gate}")
        if not -1.0 <= self.min_gain < 1.0:
            raise ConfigError(f"{key}.min_gain: must be in [-1, 1), got {self.min_gain}")
        if self.top_k < 1:
            raise ConfigError(f"{key}.top_k: must be >= 1, got {self.top_k}")
        if not self.key_encoder:
            raise ConfigError(f"{key}.key_encoder: must be backbone or a sentence embedder's name or path")
        if self.min_similarity is not None and not -1.0 <= self.min_similarity <= 1.0:
            raise ConfigError(f"{key}.min_similarity: must be in [-1, 1], got {self.min_similarity}")
        if not self.retrieval_temperature > 0:
            raise ConfigError(f"{key}.retrieval_temperature: must be > 0, got {self.retrieval_temperature}")
        if not -1.0 <= self.duplicate_threshold <= 1.0:
            raise ConfigError(
                f"{key}.duplicate_threshold: must be in [-1, 1], got {self.duplicate_threshold}"
            )
        if self.on_duplicate not in ("skip", "replace"):
            raise ConfigError(f"{key}.on_duplicate: must be skip or replace, got {self.on_duplicate!r}")
        if self.capacity < 1:
            raise ConfigError(f"{key}.capacity: must be >= 1, got {self.capacity}")
        if self.use_bonus < 0:
            raise ConfigError(f"{key}.use_bonus: must be >= 0, got {self.use_bonus}")
        if self.fuse_tokens < 0:
            raise ConfigError(f"{key}.fuse_tokens: must be >= 0, got {self.fuse_tokens}")
        check_objective(self.objective, f"{key}.objective")
        if self.distill_batch_size < 1:
            raise ConfigError(f"{key}.distill_batch_size: must be >= 1, got {self.distill_batch_size}")


class _FusedMemories(ScoringHooks):
    """Scoring with memories: each batch retrieves by its rows' queries and fuses the values while it runs.

    Retrieval runs per batch (as the batch is scored), so a call's memory use stays bounded; scoring is
    measurement and never counts as a use of a memory.
    """

    def __init__(self, strategy: MemoryBankStrategy, queries: Sequence[str]) -> None:
        self.strategy = strategy
        self.queries = queries

    def forward(self, batch: ScoringBatch) -> AbstractContextManager[Any]:
        delta = self.strategy.deltas([self.queries[i] for i in batch.rows])
        if delta is None:
            return nullcontext()
        mask = self.strategy._scoring_mask(batch.context_lengths, batch.input_ids.shape[1])
        return self.strategy._fusion(delta, mask)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted layer has run."""


@register_strategy("memory_bank", config_cls=MemoryBankConfig)
class MemoryBankStrategy(Strategy):
    modifies_backbone = False
    trains_through_backbone = True

    cannot_forget = (
        "memories are shared between documents: near-duplicates reinforce or overwrite another document's "
        "slot and a full bank evicts, so no memory belongs to one document alone"
    )

    def __init__(self, backbone, config: MemoryBankConfig, *, settings) -> None:
        super().__init__(backbone, config, settings=settings)
        n_layers = backbone.num_layers
        self.key_layer = self._layer_index(config.key_layer, n_layers // 2, "key_layer")
        self.fuse_layer = self._layer_index(config.fuse_layer, self.key_layer, "fuse_layer")
        hidden = hidden_size(backbone.model)
        self.embedder: SentenceEmbedder | None = None
        if config.key_encoder != "backbone":
            self.embedder = SentenceEmbedder.load(config.key_encoder, device=backbone.device)
        key_dim = hidden if self.embedder is None else self.embedder.dim
        self.min_similarity = (
            config.min_similarity
            if config.min_similarity is not None
            else _MIN_SIMILARITY["backbone" if self.embedder is None else "embedder"]
        )
        self.store = MemoryStore(key_dim, hidden, capacity=config.capacity, device=backbone.device)
        self._center: torch.Tensor | None = None

    def _layer_index(self, value: int | None, default: int, name: str) -> int:
        if value is None:
            return default
        return layer_index(value, self.backbone.num_layers, f"strategies.memory_bank.{name}")

    # -- keys -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _pooled(self, texts: Sequence[str]) -> torch.Tensor:
        """Mean hidden state (N, H) float32 at ``key_layer`` over each text's positions after the first."""
        out = []
        for start in range(0, len(texts), 16):
            batch = self.backbone.encode(list(texts[start : start + 16]))
            captured: dict[str, torch.Tensor] = {}

            def stop(module, args, output, captured=captured):
                captured["h"] = layer_output(output)
                raise _StopForward

            handle = self.backbone.layers[self.key_layer].register_forward_hook(stop)
            try:
                self.backbone.model(**batch, use_cache=False)
            except _StopForward:
                pass
            finally:
                handle.remove()
            # each position normalised first: a few tokens carry massive activations that would otherwise
            # dominate
            hidden = torch.nn.functional.normalize(captured["h"].float(), dim=-1)
            mask = batch["attention_mask"].clone()
            lengths = mask.sum(1)
            mask[lengths > 1, 0] = 0  # leave out the attention sink when there is anything else
            mask = mask.unsqueeze(-1).float()
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
        return torch.cat(out) if out else torch.zeros(0, self.store.key_dim, device=self.backbone.device)

    def keys(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit keys (N, K) of ``texts``: sentence embeddings, or pooled hidden states less a generic mean."""
        if self.embedder is not None:
            return self.embedder.encode(list(texts)).to(self.backbone.device)
        if self._center is None:
            self._center = self._pooled(_BACKGROUND).mean(0)
        return torch.nn.functional.normalize(self._pooled(texts) - self._center, dim=-1)

    # -- examples -------------------------------------------------------------------------------------------
    def examples(self, text: str) -> list[str]:
        """The texts that become memories: sentences (short ones joined) or token chunks."""
        tok, cfg = self.backbone.tokenizer, self.config
        if cfg.unit == "chunk":
            ids = tok(text, add_special_tokens=False)["input_ids"]
            spans = chunk_spans(len(ids), cfg.chunk_tokens, cfg.chunk_tokens // 8)
            return [tok.decode(ids[a:b]) for a, b in spans if b - a >= 2]
        pieces, pending = [], ""
        for sentence in (s.strip() for s in _SENTENCE_END.split(text)):
            if not sentence:
                continue
            pending = f"{pending} {sentence}".strip()
            if len(tok(pending, add_special_tokens=False)["input_ids"]) >= cfg.min_tokens:
                pieces.append(pending)
                pending = ""
        if pending:
            if pieces:
                pieces[-1] = f"{pieces[-1]} {pending}"
            elif len(tok(pending, add_special_tokens=False)["input_ids"]) >= 2:
                pieces.append(pending)
        out = []
        for piece in pieces:  # over-long sentences are cut (their start carries the subject)
            ids = tok(piece, add_special_tokens=False)["input_ids"]
            out.append(piece if len(ids) <= cfg.chunk_tokens else tok.decode(ids[: cfg.chunk_tokens]))
        return out

    # -- training values ------------------------------------------------------------------------------------
    @staticmethod
    def _example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        nll = sequence_nll(logits, labels)
        counts = (labels[:, 1:] != -100).sum(1).clamp(min=1)
        return nll.sum(1) / counts

    def train_values(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Train one value (and gate) per text, all in one batch; the backbone stays frozen.

        Returns ``values`` (N, H) in hidden units, ``gate_logits`` (N,), and the mean losses ``before`` and
        ``after`` (N,) of each text without and with its own value fused.
        """
        cfg = self.config
        batch = self.backbone.labelled_batch(list(texts))
        ids, labels, attention = batch.input_ids, batch.labels, batch.attention_mask
        module = self.backbone.layers[self.fuse_layer]
        with torch.no_grad(), LayerCapture(module) as cap:
            before = self._example_losses(
                self.backbone.model(input_ids=ids, attention_mask=attention).logits, labels
            )
        assert cap.hidden is not None
        mask = attention.unsqueeze(-1).float()
        rms = (
            (cap.hidden.float().pow(2).mean(-1, keepdim=True) * mask).sum(1) / mask.sum(1)
        ).sqrt()  # (N, 1)
        units = torch.zeros(len(texts), self.store.value_dim, device=ids.device, requires_grad=True)
        gate_logits = torch.zeros(len(texts), device=ids.device, requires_grad=cfg.gate is None)
        params = [units] + ([gate_logits] if cfg.gate is None else [])
        optimizer = torch.optim.Adam(params, lr=cfg.learning_rate)

        def delta() -> torch.Tensor:
            gate = torch.sigmoid(gate_logits) if cfg.gate is None else torch.full_like(gate_logits, cfg.gate)
            return gate[:, None] * rms.to(units.dtype) * units

        with torch.enable_grad():
            for _ in range(cfg.steps):
                with ResidualAdder(module, delta(), skip_zero_rows=False):
                    logits = self.backbone.model(input_ids=ids, attention_mask=attention).logits
                loss = self._example_losses(logits, labels).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad(), ResidualAdder(module, delta().detach(), skip_zero_rows=False):
            after = self._example_losses(
                self.backbone.model(input_ids=ids, attention_mask=attention).logits, labels
            )
        return {
            "values": (rms * units).detach().float(),
            "gate_logits": gate_logits.detach().float(),
            "before": before.detach().float(),
            "after": after.detach().float(),
        }

    def _retrieval_weights(
        self, query_keys: torch.Tensor, new_keys: torch.Tensor, exclude: Sequence[int] = ()
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Retrieval over the stored memories plus ``new_keys`` (N, K), as :meth:`deltas` retrieves from the
        store: top ``top_k`` by similarity × importance among similarities >= ``min_similarity``, weights a
        softmax of similarity / ``retrieval_temperature``. New memories rank with importance 1 (their
        importance is only known after training). Stored slots in ``exclude`` (about to be replaced) take no
        part. Returns candidate indices (Q, k) (``i < store.size``: a stored slot, else new memory ``i -
        store.size``), weights (Q, k) (0 where nothing valid) and validity (Q, k)."""
        cfg, size = self.config, self.store.size
        keys = torch.cat([self.store.keys[:size], torch.nn.functional.normalize(new_keys.float(), dim=-1)])
        importance = torch.cat([self.store.importance[:size], torch.ones(len(new_keys), device=keys.device)])
        if exclude:
            importance[list(exclude)] = float("-inf")
        sims = query_keys.float().to(keys.device) @ keys.T  # (Q, S + N)
        score = torch.where(
            (sims >= self.min_similarity) & (importance > float("-inf")),
            sims * importance.clamp(min=0.0),
            torch.full_like(sims, float("-inf")),
        )
        top, slots = torch.topk(score, min(cfg.top_k, keys.shape[0]), dim=-1)
        valid = torch.isfinite(top)
        weights = torch.softmax(
            sims.gather(1, slots).masked_fill(~valid, float("-inf")) / cfg.retrieval_temperature, -1
        )
        return slots, torch.nan_to_num(weights, nan=0.0), valid

    @torch.no_grad()
    def query_kl(self, examples: Sequence[DistillExample], *, fused: bool = True) -> torch.Tensor:
        """KL(teacher || student) (Q,) of each distillation example, the student being the strategy as it
        answers (each query fused with the memories its own key retrieves; ``fused=False``: the base
        model)."""
        cfg, device = self.config, self.backbone.device
        out = torch.zeros(len(examples), device=device)
        pad = self.backbone.tokenizer.pad_token_id
        for start in range(0, len(examples), cfg.distill_batch_size):
            part = list(examples[start : start + cfg.distill_batch_size])
            batch = distillation.collate_distill(part, pad, device)
            delta = self.deltas([e.query for e in part]) if fused else None
            fusion: AbstractContextManager[Any] = nullcontext()
            if delta is not None:
                lengths = (batch["positions"][:, 0] + 1).tolist()
                fusion = self._fusion(delta, self._scoring_mask(lengths, batch["input_ids"].shape[1]))
            with fusion:
                logits = self.backbone.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            out[start : start + len(part)] = distillation.distill_loss(logits, batch, per_row=True)
        return out

    def distill_values(
        self, new_keys: torch.Tensor, examples: Sequence[DistillExample], exclude: Sequence[int] = ()
    ) -> dict[str, torch.Tensor]:
        """Train the values (and gates) of new memories keyed ``new_keys`` (N, K) by context distillation.

        Each query retrieves by its own key from the stored memories and the new ones together, exactly as
        it would be answered (:meth:`_retrieval_weights`); the fused student (no document in its prompt)
        learns to match the teacher's top-k on the teacher's continuation. Only the new values and gates
        train; stored memories a query retrieves are fused as they are. Queries that retrieve no new memory
        give no gradient and are not run. Returns ``values`` (N, H), ``gate_logits`` (N,), per query
        ``kl_before`` (the strategy as it was) and ``kl_after`` (Q,) (0 where not fused) and ``fused`` (Q,)
        bool (a new memory retrieved), and per memory ``gains`` (N,): the relative KL drop of the queries that
        retrieve it, weighted by its retrieval weight (0 for a memory no query retrieves).
        """
        cfg, device = self.config, self.backbone.device
        n, q = new_keys.shape[0], len(examples)
        hidden = self.store.value_dim
        empty = {
            "values": torch.zeros(n, hidden, device=device),
            "gate_logits": torch.zeros(n, device=device),
            "kl_before": torch.zeros(q, device=device),
            "kl_after": torch.zeros(q, device=device),
            "fused": torch.zeros(q, dtype=torch.bool, device=device),
            "gains": torch.zeros(n, device=device),
        }
        if not q or not n:
            return empty
        size = self.store.size
        slots, weights, valid = self._retrieval_weights(
            self.keys([e.query for e in examples]), new_keys, exclude
        )
        new = valid & (slots >= size)  # (Q, k)
        fused = new.any(-1)
        rows = torch.nonzero(fused).squeeze(1).tolist()  # sync: once per document
        empty["fused"] = fused
        if not rows:
            return empty
        pad = self.backbone.tokenizer.pad_token_id
        module = self.backbone.layers[self.fuse_layer]
        step = cfg.distill_batch_size
        batches = []
        for start in range(0, len(rows), step):
            part = rows[start : start + step]
            batch = distillation.collate_distill([examples[i] for i in part], pad, device)
            lengths = (batch["positions"][:, 0] + 1).tolist()
            batches.append((part, batch, self._scoring_mask(lengths, batch["input_ids"].shape[1])))
        # the strategy as it was (stored memories only) and the hidden-state scale at the fuse layer
        before = torch.zeros(q, device=device)
        sq, count = torch.zeros((), device=device), torch.zeros((), device=device)
        with torch.no_grad():
            for part, batch, mask in batches:
                old = self.deltas([examples[i].query for i in part])
                fusion = self._fusion(old, mask) if old is not None else nullcontext()
                with fusion, LayerCapture(module) as cap:
                    logits = self.backbone.model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                    ).logits
                before[part] = distillation.distill_loss(logits, batch, per_row=True)
                assert cap.hidden is not None
                real = batch["attention_mask"].bool()
                sq += cap.hidden.float()[real].pow(2).mean(-1).sum()
                count += real.sum()
        rms = (sq / count).sqrt()
        stored = (
            self.store.values[:size]
            * (
                torch.sigmoid(self.store.gate_logits[:size])
                if cfg.gate is None
                else torch.full((size,), cfg.gate, device=device)
            )[:, None]
        )
        units = torch.zeros(n, hidden, device=device, requires_grad=True)
        gate_logits = torch.zeros(n, device=device, requires_grad=cfg.gate is None)
        optimizer = torch.optim.Adam(
            [units] + ([gate_logits] if cfg.gate is None else []), lr=cfg.distill_learning_rate
        )

        def deltas(part: list[int]) -> torch.Tensor:
            gate = torch.sigmoid(gate_logits) if cfg.gate is None else torch.full_like(gate_logits, cfg.gate)
            table = torch.cat([stored, gate[:, None] * rms * units])  # (S + N, H)
            return (weights[part][..., None] * table[slots[part]]).sum(1)  # (B, H)

        with torch.enable_grad():
            for _ in range(cfg.distill_steps):
                optimizer.zero_grad(set_to_none=True)
                for part, batch, mask in batches:
                    adder = ResidualAdder(
                        module, deltas(part).to(self.backbone.dtype), mask, skip_zero_rows=False
                    )
                    with adder:
                        logits = self.backbone.model(
                            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                        ).logits
                    (distillation.distill_loss(logits, batch, per_row=True).sum() / len(rows)).backward()
                optimizer.step()
        after = before.clone()
        with torch.no_grad():
            for part, batch, mask in batches:
                with self._fusion(deltas(part), mask):
                    logits = self.backbone.model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                    ).logits
                after[part] = distillation.distill_loss(logits, batch, per_row=True)
        # each new memory's share of each query: its retrieval weight (0 when not retrieved)
        share = torch.zeros(q, n, device=device)
        share.scatter_add_(1, (slots - size).clamp(min=0), torch.where(new, weights, 0.0))
        gains = (share * (before - after)[:, None]).sum(0) / (share * before[:, None]).sum(0).clamp(min=1e-6)
        return {
            "values": (rms * units).detach().float(),
            "gate_logits": gate_logits.detach().float(),
            "kl_before": before,
            "kl_after": after,
            "fused": fused,
            "gains": gains,
        }

    # -- learning -------------------------------------------------------------------------------------------
    def learn(self, document: Document) -> LearnReport:
        start = time.perf_counter()
        cfg = self.config
        texts = self.examples(document.text)
        # Memories are retrieved per example, so the document's loss is measured per example (each its own
        # query).
        loss_before = self._examples_nll(texts)
        keys = self.keys(texts) if texts else torch.zeros(0, self.store.key_dim, device=self.backbone.device)
        best, slot = self.store.duplicates(keys, cfg.duplicate_threshold)
        # Duplicates inside the document count too: a later example close to an earlier kept one.
        within = keys @ keys.T if texts else torch.zeros(0, 0)
        duplicate_of: list[int | None] = []
        for i in range(len(texts)):
            if float(best[i]) > cfg.duplicate_threshold:
                duplicate_of.append(int(slot[i]))
            elif i and bool((within[i, :i] > cfg.duplicate_threshold).any()):
                duplicate_of.append(-1)  # a near-copy of an earlier example of this document
            else:
                duplicate_of.append(None)
        counts = {"examples": len(texts), "kept": 0, "rejected": 0, "duplicates": 0, "evicted": 0}
        train = [
            i for i, d in enumerate(duplicate_of) if d is None or (cfg.on_duplicate == "replace" and d >= 0)
        ]
        for i, d in enumerate(duplicate_of):
            if d is not None and i not in train:
                counts["duplicates"] += 1
                if d >= 0:
                    self.store.reinforce(torch.tensor([d]), cfg.use_bonus)
        tokens = sum(len(self.backbone.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        figures: dict[str, Any] = {}
        if train and cfg.objective == "context_distill":
            examples = distillation.document_distill_examples(
                self.backbone, document.text, cfg.distill, teacher_context=self.disabled
            )
            tokens = sum(e.scored_tokens for e in examples)
            replaced = [d for i in train if (d := duplicate_of[i]) is not None and d >= 0]
            trained = self.distill_values(keys[train], examples, replaced)
            gains, fused = trained["gains"], trained["fused"]
            figures = {
                "distill_queries": len(examples),
                "distill_queries_fused": int(trained["fused"].sum()),
                # over the queries that retrieve a new memory (the others are not run)
                "distill_kl_before": float(trained["kl_before"][fused].mean()) if fused.any() else None,
                "distill_kl_after": float(trained["kl_after"][fused].mean()) if fused.any() else None,
            }
        elif train:
            trained = self.train_values([texts[i] for i in train])
            gains = (trained["before"] - trained["after"]) / trained["before"].clamp(min=1e-6)
        if train:
            for row, i in enumerate(train):
                gain = float(gains[row])
                if gain <= cfg.min_gain:
                    counts["rejected"] += 1
                    continue
                kwargs = {"gate_logit": float(trained["gate_logits"][row]), "importance": max(gain, 1e-6)}
                if duplicate_of[i] is not None and duplicate_of[i] >= 0:
                    counts["duplicates"] += 1
                    self.store.write(duplicate_of[i], keys[i], trained["values"][row], **kwargs)
                else:
                    _, evicted = self.store.add(keys[i], trained["values"][row], **kwargs)
                    counts["evicted"] += evicted is not None
                counts["kept"] += 1
        self.documents_learned += 1
        loss_after = self._examples_nll(texts)
        logger.info("memory_bank %s: %s", document.id, counts)
        return LearnReport(
            doc_id=document.id,
            tokens=tokens,
            loss_before=loss_before,
            loss_after=loss_after,
            seconds=time.perf_counter() - start,
            extra={**counts, "memories": self.store.size, **figures},
        )

    def _examples_nll(self, texts: Sequence[str]) -> float | None:
        """Token-weighted mean NLL of the examples, each scored with the memories it retrieves itself."""
        return self.mean_nll(texts) if texts else None

    # -- fusion ---------------------------------------------------------------------------------------------
    def deltas(self, queries: Sequence[str], *, reinforce: bool = False) -> torch.Tensor | None:
        """The vector (B, H) added at ``fuse_layer`` for each query, or ``None`` when no query retrieves a
        memory.

        ``reinforce`` counts the retrieval as a use (generation does; scoring is measurement and does not).
        """
        if self.store.size == 0 or not queries:
            return None
        cfg = self.config
        slots, sims, valid = self.store.retrieve(self.keys(queries), cfg.top_k, self.min_similarity)
        if slots.numel() == 0 or not bool(valid.any()):
            return None
        weights = torch.softmax(sims.masked_fill(~valid, float("-inf")) / cfg.retrieval_temperature, dim=-1)
        weights = torch.nan_to_num(weights, nan=0.0)  # rows with no valid memory
        gates = (
            torch.sigmoid(self.store.gate_logits[slots])
            if cfg.gate is None
            else torch.full_like(weights, cfg.gate)
        )
        delta = ((weights * gates)[..., None] * self.store.values[slots]).sum(1)  # (B, H)
        if reinforce:
            self.store.reinforce(slots[valid], cfg.use_bonus)
        return delta

    def _fusion(self, delta: torch.Tensor, mask: torch.Tensor | None) -> ResidualAdder:
        return ResidualAdder(self.backbone.layers[self.fuse_layer], delta.to(self.backbone.dtype), mask)

    def _scoring_mask(self, context_lengths: Sequence[int], width: int) -> torch.Tensor | None:
        """(B, T) positions fused when scoring: the context's last ``fuse_tokens`` and everything after."""
        n = self.config.fuse_tokens
        if n == 0:
            return None
        mask = torch.zeros(len(context_lengths), width, dtype=torch.bool, device=self.backbone.device)
        for row, length in enumerate(context_lengths):
            mask[row, max(0, length - n) :] = True
        return mask

    # -- answering ------------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str],
        *,
        chat: bool | None = None,
        max_new_tokens: int | None = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        prompts = list(prompts)
        answers: list[str] = []
        step = self.backbone.generation.batch_size
        for start in range(0, len(prompts), step):
            batch = prompts[start : start + step]
            delta = self.deltas(batch, reinforce=True)
            if delta is None:
                answers.extend(
                    self.backbone.generate(batch, chat=chat, max_new_tokens=max_new_tokens, **generate_kwargs)
                )
                continue
            mask = None
            if self.config.fuse_tokens:
                texts = [self.backbone.format_prompt(p, chat=chat) for p in batch]
                width = self.backbone.encode(texts, padding_side="left")["input_ids"].shape[1]
                mask = torch.zeros(len(batch), width, dtype=torch.bool, device=self.backbone.device)
                mask[:, -self.config.fuse_tokens :] = (
                    True  # left padding: every prompt ends in the last column
                )
            with self._fusion(delta, mask):
                answers.extend(
                    self.backbone.generate(batch, chat=chat, max_new_tokens=max_new_tokens, **generate_kwargs)
                )
        return answers

    def scoring_hooks(self, queries: Sequence[str]) -> ScoringHooks | None:
        """Memories retrieved by each row's query, fused while the batch runs (none retrieved: the base
        model)."""
        return _FusedMemories(self, queries) if self.store.size else None

    # -- state ----------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.store.state_dict("memory.")

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.store.state_dict("memory."))
        if set(state) != expected:
            raise ValueError(f"memory_bank state must hold {sorted(expected)}, got {sorted(state)}")
        width = state["memory.keys"].shape[-1]
        if width != self.store.key_dim:
            raise ValueError(
                f"memory_bank keys are {width}-dimensional but key_encoder {self.config.key_encoder!r} "
                f"makes {self.store.key_dim}-dimensional keys: the state was saved with another key encoder"
            )
        self.store.load_state_dict(state, "memory.")

    def extra_state(self) -> dict[str, Any]:
        return {
            **super().extra_state(),
            "memories": self.store.size,
            "key_encoder": self.config.key_encoder,
            "key_layer": self.key_layer,
            "fuse_layer": self.fuse_layer,
        }

    def reset(self) -> None:
        self.store.clear()
        self.documents_learned = 0

    def stats(self) -> StrategyStats:
        trained = self.store.size * (self.store.value_dim + 1)  # values and gates are optimised
        return StrategyStats(
            params_added=trained,
            params_trainable=trained,
            state_bytes=tensor_bytes(self.trainable_state()),
            documents=self.documents_learned,
        )
