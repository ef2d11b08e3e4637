"""Sentence embeddings: mean pooling of a Hugging Face encoder's last hidden states, L2-normalised.

The default is the packaged all-MiniLM-L6-v2 (``continual_transformer.zoo.resolve("minilm-l6")``), used the
way sentence-transformers uses it (mean over non-padding tokens, then normalise), so cosine similarity is a
dot product.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)


class SentenceEmbedder:
    """Embeds texts into unit vectors with an encoder model and its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer, *, max_length: int = 256, batch_size: int = 32) -> None:
        self.model = model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size

    @classmethod
    def load(
        cls, name_or_path: str = "minilm-l6", *, device: torch.device | str = "cpu", **kwargs
    ) -> SentenceEmbedder:
        """Load a packaged embedder name, a local directory or a hub id (resolved by the model zoo)."""
        from transformers import AutoModel, AutoTokenizer

        from continual_transformer import zoo

        source = zoo.resolve(name_or_path)
        logger.info("loading embedder %s from %s", name_or_path, source)
        model = AutoModel.from_pretrained(source, dtype=torch.float32).to(device)
        return cls(model, AutoTokenizer.from_pretrained(source), **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, dim) float32 unit vectors on the embedder's device."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            batch = {k: v.to(self.device) for k, v in batch.items()}
            hidden = self.model(**batch).last_hidden_state.float()  # (B, T, H)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        if not out:
            return torch.zeros(0, self.dim, device=self.device)
        return torch.cat(out)
