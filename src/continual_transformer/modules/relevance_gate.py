"""A relevance gate in front of learned weights: which prompts are about a learned document.

A strategy that changes weights (``finetune``, ``lora``, ``ttt``, ``memory_layer``) changes how the model
answers *everything*; that is where its forgetting comes from. With the gate, the change applies only to
prompts whose sentence embedding comes close enough (cosine ``min_similarity``) to a chunk of a learned
document; every other prompt is answered and scored by the base model, exactly. The gate keeps the chunks'
text (state: JSON) and embeds them again when loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from continual_transformer.config import GateArgs
from continual_transformer.documents import chunk_spans

logger = logging.getLogger(__name__)


class RelevanceGate:
    """Chunks of the learned documents and the test ``open(queries)``."""

    def __init__(self, args: GateArgs, tokenizer, device: torch.device) -> None:
        self.args = args
        self.tokenizer = tokenizer
        self.device = device
        self.chunks: list[str] = []
        self._vectors: torch.Tensor | None = None  # (N, dim) unit rows of the embedded chunks, made lazily
        self._embedder = None

    @property
    def embedder(self):
        if self._embedder is None:
            from continual_transformer.modules.embedder import SentenceEmbedder

            self._embedder = SentenceEmbedder.load(self.args.embedder, device=self.device)
        return self._embedder

    def split(self, text: str) -> list[str]:
        """``text`` as chunks of ``chunk_tokens`` backbone tokens (no overlap)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        spans = chunk_spans(len(ids), self.args.chunk_tokens, 0)
        return [piece for a, b in spans if (piece := self.tokenizer.decode(ids[a:b]).strip())]

    def add(self, text: str) -> int:
        """Remember a learned document; returns the number of chunks it added."""
        pieces = self.split(text)
        if pieces:
            vectors = self.embedder.encode(pieces)
            self._vectors = vectors if self._vectors is None else torch.cat([self._vectors, vectors])
            self.chunks.extend(pieces)
        return len(pieces)

    @torch.no_grad()
    def similarity(self, queries: Sequence[str]) -> torch.Tensor:
        """(Q,) best cosine similarity of each query to a learned chunk (-1 when nothing is learned)."""
        if not self.chunks:
            return torch.full((len(queries),), -1.0)
        if self._vectors is None:
            self._vectors = self.embedder.encode(self.chunks)
        queries_vec = self.embedder.encode(list(queries))  # (Q, dim)
        return (queries_vec @ self._vectors.T).max(dim=1).values.float().cpu()  # sync: the decisions

    def open(self, queries: Sequence[str]) -> list[bool]:
        """Per query: is it about a learned document (learned weights apply)?"""
        if not queries:
            return []
        return [bool(s >= self.args.min_similarity) for s in self.similarity(queries)]

    def clear(self) -> None:
        self.chunks = []
        self._vectors = None

    def state(self) -> list[str]:
        return list(self.chunks)

    def load_state(self, chunks: Sequence[str]) -> None:
        if not isinstance(chunks, list) or not all(isinstance(c, str) for c in chunks):
            raise ValueError("gate state must be a list of chunk texts")
        self.chunks = list(chunks)
        self._vectors = None  # embedded again on first use
