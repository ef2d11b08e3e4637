"""Reusable building blocks of the strategies that learn without touching the backbone's weights.

- :class:`LexicalIndex`: BM25 / TF-IDF over word terms, on sparse matrices (no Python loop over chunks per
  query).
- :class:`SentenceEmbedder`: mean-pooled sentence embeddings from a Hugging Face encoder (MiniLM by default).
- :class:`VectorStore`: preallocated key/value store with a size counter, geometric growth or a capacity bound
  with FIFO / least-recently-retrieved eviction, searched with batched matmul + top-k.
- :class:`MemoryStore`: a bounded bank of (key, value, gate, importance) memories with duplicate detection.
- :class:`LayerCapture` / :class:`ResidualAdder`: forward hooks that read or shift a layer's hidden states.
- :class:`TokenBiasProcessor` / :class:`KNNMixtureProcessor`: ``transformers`` logits processors.
"""

from __future__ import annotations

from continual_transformer.modules.embedder import SentenceEmbedder
from continual_transformer.modules.hooks import LayerCapture, ResidualAdder, layer_output
from continual_transformer.modules.lexical_index import LexicalIndex, analyze
from continual_transformer.modules.logits import (
    KNNMixtureProcessor,
    TokenBiasProcessor,
    knn_distribution,
    mix_log_probs,
)
from continual_transformer.modules.memory_store import MemoryStore
from continual_transformer.modules.vector_store import VectorStore

__all__ = [
    "KNNMixtureProcessor",
    "LayerCapture",
    "LexicalIndex",
    "MemoryStore",
    "ResidualAdder",
    "SentenceEmbedder",
    "TokenBiasProcessor",
    "VectorStore",
    "analyze",
    "knn_distribution",
    "layer_output",
    "mix_log_probs",
]
