"""``none``: learns nothing. The floor every strategy must beat; answers are the base model's."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from continual_transformer.documents import Document
from continual_transformer.strategies import register_strategy
from continual_transformer.strategies.base import LearnReport, Strategy, StrategyStats


@dataclass(frozen=True, kw_only=True)
class NoneConfig:
    """``none`` has no settings."""


@register_strategy("none", config_cls=NoneConfig)
class NoLearning(Strategy):
    changes_outputs = False

    def learn(self, document: Document) -> LearnReport:
        start = time.perf_counter()
        tokens = len(self.backbone.tokenizer(document.text, add_special_tokens=False)["input_ids"])
        self.documents_learned += 1
        return LearnReport(
            doc_id=document.id,
            tokens=tokens,
            loss_before=None,
            loss_after=None,
            seconds=time.perf_counter() - start,
        )

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"the none strategy has no tensors, got {sorted(state)[:3]}")

    def reset(self) -> None:
        self.documents_learned = 0

    def stats(self) -> StrategyStats:
        return StrategyStats(
            params_added=0, params_trainable=0, state_bytes=0, documents=self.documents_learned
        )
