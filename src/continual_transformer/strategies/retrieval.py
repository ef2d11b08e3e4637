"""``retrieval``: index documents in chunks; answer with the relevant chunks in the prompt and a bias toward
their tokens.

Learning a document tokenises it, cuts it into overlapping token chunks and adds them to an index: dense
MiniLM embeddings (``retriever: dense``, the default), or BM25 / TF-IDF over word terms
(:class:`~continual_transformer.modules.LexicalIndex`). Nothing of the backbone changes and no gradient is
computed.

Answering a prompt retrieves its ``top_k`` chunks. A **relevance gate** decides whether they are used at all:
lexical retrievers gate on the idf-weighted fraction of the query's content words found in the chunk
(``min_relevance``), the dense retriever on cosine similarity (``min_similarity``). A prompt whose best chunk
does not pass gets no context and no bias, so it is answered exactly as the base model answers it (the lesson
of the earlier system, which prepended chunks to every query and lost 94 % of general facts). A prompt that
passes gets its chunks inside the *user message of the chat template* (``prompt_template``) — the template is
kept — and, when ``bias_strength > 0``, ``+bias_strength`` on the logits of every token that occurs in those
chunks at each decoding step (a :class:`~transformers.LogitsProcessor`); ``bias_strength = 0`` is plain
retrieval-augmented generation.

Scoring (:meth:`forward_logits`, :meth:`token_nll`, :meth:`perplexity`) does the same thing on raw text: the
context (``text_template``) is prepended to each text whose query passes the gate, only the text's own
positions are returned or scored, and the bias is added to those logits. The query is the scoring context when
one is given (e.g. the question before an answer), otherwise the text itself.

State: the chunks' token ids (tensors) and the document ids (JSON); the lexical index is rebuilt from the
chunks on load, dense embeddings are saved.

Measured once on SmolLM2-135M-Instruct (CPU, 3 short fictional documents, 6 chat questions, BM25): 4 of 6
answers right with ``bias_strength: 0`` (plain RAG), 5 of 6 with the default 1.0, 0 for the base model; the 3
unrelated general questions were gated out and answered exactly as by the base model in both cases.

Why dense by default (H100, 50 documents): on novel facts the dense retriever at ``min_similarity: 0.45``
answered 0.600 of the probes against 0.517 for BM25 at its gate, with general perplexity and known facts
unchanged. On BoolQ (Wikipedia passages) BM25 found the right passage first for 98 % of the questions, but its
word-overlap gate let only about a quarter of them through while general questions reached relevance 1.0 on
the same passages (known-fact forgetting 0.051); MiniLM similarity separates the two (questions: 10th
percentile 0.45; general questions at most 0.56, 90th percentile 0.34; known-fact forgetting 0.013).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessorList

from continual_transformer.backbone import ScoringBatch, ScoringHooks
from continual_transformer.config import ConfigError
from continual_transformer.documents import Document, chunk_spans
from continual_transformer.modules.embedder import SentenceEmbedder
from continual_transformer.modules.lexical_index import Hit, LexicalIndex
from continual_transformer.modules.logits import TokenBiasProcessor, token_bias
from continual_transformer.modules.vector_store import VectorStore
from continual_transformer.strategies import register_strategy
from continual_transformer.strategies.base import (
    DecodingInput,
    LearnReport,
    Strategy,
    StrategyStats,
    pack_ragged,
    tensor_bytes,
    unpack_ragged,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RetrievalConfig:
    retriever: str = "dense"
    """``dense`` (sentence embeddings from ``embedder``), ``bm25`` (Okapi BM25 over word terms) or ``tfidf``
    (cosine of tf-idf vectors); the lexical ones need no embedding model."""
    top_k: int = 3
    """Chunks put in the prompt at most (each must pass the relevance gate)."""
    chunk_tokens: int | None = 128
    """Tokens per chunk; ``None`` uses ``documents.chunk_tokens``. Short chunks match a question as well as
    its document does, and one chunk holds the answer: on 50 news articles (H200) 128-token chunks answered
    0.738 of the probes against 0.579 with 512-token chunks (the oracle: 0.951), the same 0.600 on novel
    facts, no known fact lost either way (``benchmarks/results/knowledge/h200-retrieval-chunks``)."""
    chunk_overlap: int | None = 32
    """Tokens shared by consecutive chunks; ``None`` uses ``documents.chunk_overlap``."""
    min_relevance: float = 0.5
    """Gate of the lexical retrievers: idf-weighted fraction of the query's content words a chunk must
    contain."""
    min_similarity: float = 0.45
    """Gate of the dense retriever: cosine similarity between query and chunk embeddings. MiniLM, best chunk
    per question over 50 documents (10th / 50th / 90th percentile): novel-facts probes 0.62 / 0.72 / 0.81,
    BoolQ questions 0.45 / 0.59 / 0.68; general questions 0.12 / 0.21 / 0.32 (at most 0.40) against the novel
    facts, 0.16 / 0.24 / 0.34 (at most 0.56) against the BoolQ passages."""
    other_documents_margin: float | None = 0.06
    """A chunk of another document than the best chunk's joins the prompt only when its relevance is within
    this much of the best chunk's (``None``: every chunk that passes the gate, up to ``top_k``); the best
    document's other chunks are kept. Other documents beside the right one confuse a small model: on 1,000
    novel-facts documents (MiniLM; 160 probes, CPU) the right document was in the prompt for 0.996 of the
    probes either way, with 2.69 documents on average without the margin and 1.11 with 0.06, and the answers
    went from 0.481 to 0.631 (the oracle: 0.619). On 50 news articles, a set the value was not chosen on:
    0.692 without, 0.683 with it (one probe of 120; the oracle 0.950)
    (``benchmarks/results/knowledge/cpu-retrieval-scale``)."""
    bias_strength: float = 1.0
    """Added to the logits of every token of the retrieved chunks at each step (0 = plain retrieval)."""
    embedder: str = "minilm-l6"
    """Embedding model of the dense retriever: a packaged name, a local directory or a hub id."""
    prompt_template: str = "Use this information if it helps:\n{context}\n\n{prompt}"
    """User message when context is used; ``{context}`` is the chunks, ``{prompt}`` the question. The chat
    template wraps it."""
    text_template: str = "{context}\n\n"
    """Text prepended before raw (non-chat) prompts and scored texts when context is used."""
    chunk_separator: str = "\n\n"
    """Between retrieved chunks in ``{context}``."""

    def __post_init__(self) -> None:
        key = "strategies.retrieval"
        if self.retriever not in ("bm25", "tfidf", "dense"):
            raise ConfigError(f"{key}.retriever: must be bm25, tfidf or dense, got {self.retriever!r}")
        if self.top_k < 1:
            raise ConfigError(f"{key}.top_k: must be >= 1, got {self.top_k}")
        if self.other_documents_margin is not None and self.other_documents_margin < 0:
            raise ConfigError(
                f"{key}.other_documents_margin: must be >= 0, got {self.other_documents_margin}"
            )
        if self.chunk_tokens is not None and self.chunk_tokens < 8:
            raise ConfigError(f"{key}.chunk_tokens: must be >= 8, got {self.chunk_tokens}")
        if self.chunk_overlap is not None and self.chunk_overlap < 0:
            raise ConfigError(f"{key}.chunk_overlap: must be >= 0, got {self.chunk_overlap}")
        if (
            self.chunk_tokens is not None
            and self.chunk_overlap is not None
            and self.chunk_overlap >= self.chunk_tokens
        ):
            raise ConfigError(f"{key}.chunk_overlap: must be < chunk_tokens ({self.chunk_tokens})")
        if not 0.0 <= self.min_relevance <= 1.0:
            raise ConfigError(f"{key}.min_relevance: must be in [0, 1], got {self.min_relevance}")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise ConfigError(f"{key}.min_similarity: must be in [-1, 1], got {self.min_similarity}")
        if not math.isfinite(self.bias_strength) or self.bias_strength < 0:
            raise ConfigError(f"{key}.bias_strength: must be a finite number >= 0, got {self.bias_strength}")
        if "{context}" not in self.prompt_template or "{prompt}" not in self.prompt_template:
            raise ConfigError(f"{key}.prompt_template: must contain {{context}} and {{prompt}}")
        if "{context}" not in self.text_template:
            raise ConfigError(f"{key}.text_template: must contain {{context}}")


@dataclass(frozen=True)
class Augmentation:
    """What retrieval adds for one query: the context text and the token ids to bias (None: nothing)."""

    hits: tuple[Hit, ...]
    context: str | None
    bias_tokens: tuple[int, ...]


class _RetrievedContext(ScoringHooks):
    """Scoring with retrieval: per row, the gated chunks in front (``text_template``) and their token bias."""

    def __init__(self, strategy: RetrievalStrategy, plans: Sequence[Augmentation]) -> None:
        self.strategy = strategy
        self.plans = plans

    def touches(self, row: int) -> bool:
        return self.plans[row].context is not None

    def prefix(self, row: int) -> str:
        context = self.plans[row].context
        return "" if context is None else self.strategy.config.text_template.format(context=context)

    def next_token_scores(
        self, logits: torch.Tensor, batch: ScoringBatch, positions: torch.Tensor
    ) -> torch.Tensor:
        logits = logits.float()
        if self.strategy.config.bias_strength <= 0:
            return logits
        bias = self.strategy._bias_rows([self.plans[i] for i in batch.rows])  # (B, V')
        width = min(bias.shape[1], logits.shape[-1])
        logits[..., :width] += bias[:, None, :width]
        return logits


@register_strategy("retrieval", config_cls=RetrievalConfig)
class RetrievalStrategy(Strategy):
    modifies_backbone = False
    reads_context = True

    def __init__(self, backbone, config: RetrievalConfig, *, settings) -> None:
        super().__init__(backbone, config, settings=settings)
        docs = settings.documents
        self.chunk_tokens = config.chunk_tokens or docs.chunk_tokens
        self.chunk_overlap = config.chunk_overlap if config.chunk_overlap is not None else docs.chunk_overlap
        if self.chunk_overlap >= self.chunk_tokens:
            raise ConfigError(
                f"strategies.retrieval.chunk_overlap: {self.chunk_overlap} must be < chunk_tokens "
                f"{self.chunk_tokens}"
            )
        self._embedder: SentenceEmbedder | None = None
        self._special = set(backbone.tokenizer.all_special_ids)
        self._clear()

    def _clear(self) -> None:
        self.chunk_ids: list[list[int]] = []
        self.chunk_texts: list[str] = []
        self.chunk_doc: list[int] = []
        self.doc_ids: list[str] = []
        self.doc_sha: list[str] = []
        self.documents_learned = 0
        self._lexical = LexicalIndex("tfidf" if self.config.retriever == "tfidf" else "bm25")
        self._dense: VectorStore | None = None

    # -- the index ------------------------------------------------------------------------------------------
    @property
    def embedder(self) -> SentenceEmbedder:
        if self._embedder is None:
            self._embedder = SentenceEmbedder.load(self.config.embedder, device=self.backbone.device)
        return self._embedder

    def _dense_store(self, dim: int) -> VectorStore:
        if self._dense is None:
            self._dense = VectorStore(dim, metric="cosine", device=self.backbone.device)
        return self._dense

    def _add_chunks(
        self, chunks: list[list[int]], docs: list[int], embeddings: torch.Tensor | None = None
    ) -> None:
        texts = [self.backbone.tokenizer.decode(ids) for ids in chunks]
        self.chunk_ids.extend(chunks)
        self.chunk_texts.extend(texts)
        self.chunk_doc.extend(docs)
        if not chunks:
            return
        if self.config.retriever == "dense":
            vectors = embeddings if embeddings is not None else self.embedder.encode(texts)
            self._dense_store(vectors.shape[1]).add(vectors, torch.arange(len(chunks)))
        else:
            self._lexical.add(texts)

    def _remove_document(self, doc_index: int) -> None:
        drop = [i for i, d in enumerate(self.chunk_doc) if d == doc_index]
        keep = [i for i, d in enumerate(self.chunk_doc) if d != doc_index]
        self.chunk_ids = [self.chunk_ids[i] for i in keep]
        self.chunk_texts = [self.chunk_texts[i] for i in keep]
        self.chunk_doc = [self.chunk_doc[i] for i in keep]
        if self._dense is not None:
            mask = torch.ones(self._dense.size, dtype=torch.bool, device=self._dense.device)
            mask[drop] = False
            self._dense.keep(mask)
        self._lexical.remove(drop)

    def search(self, queries: Sequence[str], k: int | None = None) -> list[list[Hit]]:
        """The ``k`` (default ``top_k``) best chunks of each query, best first, with score and relevance.

        For the dense retriever, score and relevance are both the cosine similarity.
        """
        k = k or self.config.top_k
        if not self.chunk_ids or not queries:
            return [[] for _ in queries]
        if self.config.retriever != "dense":
            return self._lexical.search(list(queries), k)
        assert self._dense is not None
        dist, rows = self._dense.search(self.embedder.encode(list(queries)), k, mark_used=False)
        sims = (1 - dist / 2).cpu().tolist()  # cosine from the distance between unit vectors
        return [[Hit(int(r), s, s) for r, s in zip(row, sim)] for row, sim in zip(rows.cpu().tolist(), sims)]

    def augment(self, queries: Sequence[str]) -> list[Augmentation]:
        """Context and bias tokens for each query; queries whose chunks do not pass the gate get none."""
        gate = self.config.min_similarity if self.config.retriever == "dense" else self.config.min_relevance
        plans = []
        margin = self.config.other_documents_margin
        for hits in self.search(queries):
            used = tuple(h for h in hits if h.relevance >= gate)
            if margin is not None and used:
                best = used[0]  # hits come best first
                used = tuple(
                    h
                    for h in used
                    if self.chunk_doc[h.index] == self.chunk_doc[best.index]
                    or h.relevance >= best.relevance - margin
                )
            if not used:
                plans.append(Augmentation((), None, ()))
                continue
            context = self.config.chunk_separator.join(self.chunk_texts[h.index] for h in used)
            tokens = sorted({t for h in used for t in self.chunk_ids[h.index] if t not in self._special})
            plans.append(Augmentation(used, context, tuple(tokens)))
        return plans

    # -- learning -------------------------------------------------------------------------------------------
    def learn(self, document: Document) -> LearnReport:
        return self._learn_by_adding([document], self._index)[0]

    def learn_documents(self, documents: Sequence[Document]) -> list[LearnReport]:
        """Index every document, with each one's loss before and after measured in batches (the losses
        before are all taken before any of them is indexed)."""
        return self._learn_by_adding(documents, self._index)

    def index(self, documents: Sequence[Document]) -> int:
        """Put documents in the index as :meth:`learn_documents` does, without measuring each one's loss
        before and after (bulk loading: two forward passes per document saved); the chunks added."""
        before = len(self.chunk_ids)
        for document in documents:
            self._index(document)
        return len(self.chunk_ids) - before

    def _index(self, document: Document) -> tuple[int, dict[str, Any]]:
        """Put a document's chunks in the index (a document already held under its id is replaced, or kept
        when its text is the same); the tokens read and figures for its report."""
        ids = self.backbone.tokenizer(document.text, add_special_tokens=False)["input_ids"]
        chunks = [ids[a:b] for a, b in chunk_spans(len(ids), self.chunk_tokens, self.chunk_overlap)]
        if document.id in self.doc_ids:
            index = self.doc_ids.index(document.id)
            if self.doc_sha[index] == document.sha256:
                logger.info("retrieval: %s is already indexed, unchanged", document.id)
                return len(ids), {"chunks": 0, "unchanged": True}
            self._remove_document(index)
        if document.id in self.doc_ids:
            index = self.doc_ids.index(document.id)
            self.doc_sha[index] = document.sha256
        else:
            index = len(self.doc_ids)
            self.doc_ids.append(document.id)
            self.doc_sha.append(document.sha256)
        self._add_chunks(chunks, [index] * len(chunks))
        self.documents_learned += 1
        return len(ids), {
            "chunks": len(chunks),
            "index_chunks": len(self.chunk_ids),
            "retriever": self.config.retriever,
        }

    # -- answering ------------------------------------------------------------------------------------------
    def _vocab_size(self) -> int:
        head = self.backbone.model.get_output_embeddings()
        if head is None:
            return int(self.backbone.model.config.vocab_size)
        return int(getattr(head, "out_features", None) or head.weight.shape[0])  # quantized heads: no .weight

    def generate(
        self,
        prompts: Sequence[str],
        *,
        chat: bool | None = None,
        max_new_tokens: int | None = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        prompts = list(prompts)
        if not self.chunk_ids:
            return self.backbone.generate(
                prompts, chat=chat, max_new_tokens=max_new_tokens, **generate_kwargs
            )
        plans = self.augment(prompts)
        answers: list[str | None] = [None] * len(prompts)
        plain = [i for i, p in enumerate(plans) if p.context is None]
        if plain:  # exactly what the base model answers, batched among themselves
            for i, answer in zip(
                plain,
                self.backbone.generate(
                    [prompts[i] for i in plain], chat=chat, max_new_tokens=max_new_tokens, **generate_kwargs
                ),
            ):
                answers[i] = answer
        rich = [i for i, p in enumerate(plans) if p.context is not None]
        use_chat = self.backbone.uses_chat(chat)
        step = self.backbone.generation.batch_size
        for start in range(0, len(rich), step):
            rows = rich[start : start + step]
            inputs = [self._with_context(prompts[i], plans[i], use_chat) for i in rows]
            kwargs: dict[str, Any] = dict(generate_kwargs)
            if self.config.bias_strength > 0:
                bias = torch.stack([inp.bias for inp in inputs if inp.bias is not None])
                kwargs["logits_processor"] = LogitsProcessorList(
                    [TokenBiasProcessor(bias), *(generate_kwargs.get("logits_processor") or [])]
                )
            outs = self.backbone.generate(
                [inp.text for inp in inputs], formatted=True, max_new_tokens=max_new_tokens, **kwargs
            )
            for i, answer in zip(rows, outs):
                answers[i] = answer
        return [a or "" for a in answers]

    def shares_decoding(self) -> bool:
        return type(self).generate is RetrievalStrategy.generate and self.relevance_gate is None

    def decoding_inputs(
        self, prompts: Sequence[str], *, chat: bool | None = None
    ) -> list[DecodingInput] | None:
        """Each prompt's model text as :meth:`generate` builds it (with its retrieved context, or plain when
        none passes the gate) and its bias towards the context's tokens."""
        if not self.shares_decoding():
            return None
        prompts = list(prompts)
        model_text = self.backbone.model_text
        if not self.chunk_ids:
            return [DecodingInput(model_text(p, chat=chat)) for p in prompts]
        use_chat = self.backbone.uses_chat(chat)
        return [
            DecodingInput(model_text(prompt, chat=chat))
            if plan.context is None
            else self._with_context(prompt, plan, use_chat)
            for prompt, plan in zip(prompts, self.augment(prompts))
        ]

    def _with_context(self, prompt: str, plan: Augmentation, use_chat: bool) -> DecodingInput:
        """The model text of ``prompt`` with ``plan``'s retrieved context, and the bias towards its tokens."""
        augmented = self._augmented_prompt(prompt, plan.context or "", use_chat)
        bias = None
        if self.config.bias_strength > 0:
            bias = token_bias(
                [plan.bias_tokens], self._vocab_size(), self.config.bias_strength, device=self.backbone.device
            )[0]
        return DecodingInput(self.backbone.model_text(augmented, formatted=True), bias)

    def _augmented_prompt(self, prompt: str, context: str, use_chat: bool) -> str:
        """The exact model input for ``prompt`` with ``context`` (chat template kept when it is used)."""
        if use_chat:
            return self.backbone.format_prompt(
                self.config.prompt_template.format(context=context, prompt=prompt), chat=True
            )
        return self.config.text_template.format(context=context) + prompt

    def _bias_rows(self, plans: Sequence[Augmentation]) -> torch.Tensor:
        return token_bias(
            [p.bias_tokens for p in plans],
            self._vocab_size(),
            self.config.bias_strength,
            device=self.backbone.device,
        )

    def scoring_hooks(self, queries: Sequence[str]) -> ScoringHooks | None:
        """Retrieval for each row's query: its context in front and, with ``bias_strength``, its token bias.

        Rows whose query does not pass the gate are untouched: scored exactly as by the base model.
        """
        if not self.chunk_ids:
            return None
        return _RetrievedContext(self, self.augment(list(queries)))

    # -- state ----------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        flat, ends = pack_ragged(self.chunk_ids, torch.int32)
        state = {
            "chunk_tokens": flat,
            "chunk_offsets": torch.cat([torch.zeros(1, dtype=torch.int64), ends]),
            "chunk_doc": torch.tensor(self.chunk_doc, dtype=torch.int32),
        }
        if self._dense is not None and self._dense.size:
            state["embeddings"] = self._dense.keys[: self._dense.size].float()
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        required = {"chunk_tokens", "chunk_offsets", "chunk_doc"}
        allowed = required | ({"embeddings"} if self.config.retriever == "dense" else set())
        if not required <= set(state) or not set(state) <= allowed:
            raise ValueError(
                f"retrieval state must hold {sorted(required)} (and embeddings for dense), "
                f"got {sorted(state)}"
            )
        offsets, docs = state["chunk_offsets"], state["chunk_doc"].cpu().tolist()
        try:
            if offsets.numel() < 1 or int(offsets[0]) != 0:
                raise ValueError("chunk_offsets must start at 0")
            chunks = unpack_ragged(state["chunk_tokens"], offsets[1:])
        except ValueError as exc:
            raise ValueError(
                f"retrieval state: chunk_offsets and chunk_tokens do not agree ({exc})"
            ) from None
        n = len(chunks)
        if len(docs) != n:
            raise ValueError("retrieval state: chunk_offsets, chunk_tokens and chunk_doc do not agree")
        embeddings = state.get("embeddings")
        if self.config.retriever == "dense" and n and (embeddings is None or embeddings.shape[0] != n):
            raise ValueError(f"retrieval state: dense retriever needs embeddings for all {n} chunks")
        doc_ids, doc_sha, learned = self.doc_ids, self.doc_sha, self.documents_learned
        self._clear()
        self.doc_ids, self.doc_sha, self.documents_learned = doc_ids, doc_sha, learned
        self._add_chunks(
            chunks, docs, embeddings.to(self.backbone.device) if embeddings is not None else None
        )

    def extra_state(self) -> dict[str, Any]:
        return {
            "documents_learned": self.documents_learned,
            "doc_ids": list(self.doc_ids),
            "doc_sha256": list(self.doc_sha),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.doc_ids = [str(d) for d in state.get("doc_ids", [])]
        self.doc_sha = [str(d) for d in state.get("doc_sha256", [])]

    def reset(self) -> None:
        self._clear()

    def forget(self, doc_id: str) -> None:
        """Remove the document's chunks from the index (the other documents' stay as they were)."""
        if doc_id not in self.doc_ids:
            raise KeyError(doc_id)
        index = self.doc_ids.index(doc_id)
        self._remove_document(index)
        del self.doc_ids[index], self.doc_sha[index]
        self.chunk_doc = [d - (d > index) for d in self.chunk_doc]
        self.documents_learned = max(0, self.documents_learned - 1)

    def stats(self) -> StrategyStats:
        return StrategyStats(
            params_added=0,
            params_trainable=0,
            state_bytes=tensor_bytes(self.trainable_state()),
            documents=self.documents_learned,
        )
