"""``in_context``: learned documents are put in the prompt, newest first, up to a token budget.

The ceiling for retrieval strategies (every document is "retrieved") and a reference for what the model can do
with the facts when it sees them. Cost grows with the documents: answering reads all of them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from continual_transformer.backbone import ScoringHooks
from continual_transformer.config import ConfigError
from continual_transformer.documents import Document
from continual_transformer.strategies import register_strategy
from continual_transformer.strategies.base import (
    LearnReport,
    Strategy,
    StrategyStats,
    pack_texts,
    tensor_bytes,
    unpack_texts,
)


@dataclass(frozen=True, kw_only=True)
class InContextConfig:
    max_context_tokens: int = 4096
    """Token budget for documents in the prompt; the newest documents that fit are kept."""
    instruction: str = "Use the following documents to answer."
    """Put before the documents in chat prompts."""

    def __post_init__(self) -> None:
        if self.max_context_tokens < 1:
            raise ConfigError("strategies.in_context.max_context_tokens: must be >= 1")


class _ContextInFront(ScoringHooks):
    def __init__(self, prefix: str) -> None:
        self._prefix = prefix

    def prefix(self, row: int) -> str:
        return self._prefix


@register_strategy("in_context", config_cls=InContextConfig)
class InContext(Strategy):
    reads_context = True

    def __init__(self, backbone, config: InContextConfig, *, settings) -> None:
        super().__init__(backbone, config, settings=settings)
        self.texts: list[str] = []
        self._lengths: list[int] = []
        self.doc_ids: list[str | None] = []  # one per text (None: loaded from a state without ids)

    def learn(self, document: Document) -> LearnReport:
        start = time.perf_counter()
        tokens = len(self.backbone.tokenizer(document.text, add_special_tokens=False)["input_ids"])
        loss_before = self.backbone.mean_nll([document.text])  # the base model's, without any document
        self.texts.append(document.text)
        self._lengths.append(tokens)
        self.doc_ids.append(document.id)
        self.documents_learned += 1
        # The document's loss with itself in context: what "having learned it" means for this strategy.
        loss_after = self.mean_nll([document.text])
        return LearnReport(
            doc_id=document.id,
            tokens=tokens,
            loss_before=loss_before,
            loss_after=loss_after,
            seconds=time.perf_counter() - start,
        )

    def context(self) -> str:
        """The newest documents that fit the budget, in learning order."""
        return self.fitting(self.texts, self._lengths)

    def fitting(self, texts: Sequence[str], lengths: Sequence[int] | None = None) -> str:
        """The newest of ``texts`` (in learning order, with their token counts when known) that fit the
        budget, joined as they are put in the prompt."""
        if lengths is None:
            lengths = [len(self.backbone.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        budget = min(self.config.max_context_tokens, self.backbone.max_length // 2)
        chosen, used = [], 0
        for text, n in zip(reversed(texts), reversed(lengths)):
            if used + n > budget:
                break
            chosen.append(text)
            used += n
        return "\n\n".join(reversed(chosen))

    def _with_context(self, prompts: Sequence[str], chat: bool | None) -> list[str]:
        return self.with_context(self.context(), prompts, chat)

    def with_context(self, context: str, prompts: Sequence[str], chat: bool | None) -> list[str]:
        """``prompts`` as model input with ``context`` (documents as :meth:`fitting` joins them) in front."""
        if not context:
            return [self.backbone.format_prompt(p, chat=chat) for p in prompts]
        if self.backbone.uses_chat(chat):
            return [
                self.backbone.format_prompt(f"{self.config.instruction}\n\n{context}\n\n{p}", chat=True)
                for p in prompts
            ]
        return [f"{context}\n\n{p}" for p in prompts]

    def generate(
        self,
        prompts: Sequence[str],
        *,
        chat: bool | None = None,
        max_new_tokens: int | None = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        return self.backbone.generate(
            self._with_context(prompts, chat),
            formatted=True,
            max_new_tokens=max_new_tokens,
            **generate_kwargs,
        )

    def scoring_hooks(self, queries: Sequence[str]) -> ScoringHooks | None:
        """The documents, then a blank line, in front of every scored text."""
        context = self.context()
        return _ContextInFront(f"{context}\n\n") if context else None

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return pack_texts(self.texts, "documents")

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        texts = unpack_texts(state, "documents")
        self.texts = texts
        self._lengths = [
            len(self.backbone.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts
        ]
        self.doc_ids = [None] * len(texts)

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "doc_ids": list(self.doc_ids)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        ids = state.get("doc_ids")
        if isinstance(ids, list) and len(ids) == len(self.texts):
            self.doc_ids = [None if i is None else str(i) for i in ids]

    def reset(self) -> None:
        self.texts, self._lengths, self.doc_ids = [], [], []
        self.documents_learned = 0

    def forget(self, doc_id: str) -> None:
        """Drop the document's text from the context."""
        if doc_id not in self.doc_ids:
            raise KeyError(doc_id)
        index = self.doc_ids.index(doc_id)
        del self.texts[index], self._lengths[index], self.doc_ids[index]
        self.documents_learned = max(0, self.documents_learned - 1)

    def stats(self) -> StrategyStats:
        return StrategyStats(
            params_added=0,
            params_trainable=0,
            state_bytes=tensor_bytes(self.trainable_state()),
            documents=self.documents_learned,
        )
