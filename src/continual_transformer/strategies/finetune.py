"""``finetune``: plain gradient descent on the document, in place, on a chosen range of decoder layers.

The baseline every other strategy is measured against. It adds no parameters; its state is what learning
changed in the layers it trains, relative to the base model (:func:`delta_state`: unchanged tensors are left
out, changes confined to a few rows or columns are stored as those, dense changes as ``delta_bits``-bit codes
the weights are rounded to after each learning run, so a reload answers exactly as before). The original
weights of those layers are kept on the CPU (pinned, from a GPU) so :meth:`reset` restores the base model
exactly (and :meth:`disabled` swaps them in for a while).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from continual_transformer.config import GateArgs, OptimArgs, WindowArgs
from continual_transformer.distillation import ContextDistillConfig, check_objective
from continual_transformer.layers import check_layer_spec, select_layers
from continual_transformer.strategies import register_strategy
from continual_transformer.strategies.base import (
    StrategyStats,
    TrainingStrategy,
    check_delta_bits,
    host_copy,
    tensor_bytes,
)

__all__ = ["FinetuneConfig", "FinetuneStrategy", "select_layers"]


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    layers: str = "all"
    """Decoder layers to train: ``all``, a slice such as ``-8:`` (the last 8) or ``4:12``, one index, or a
    share of the top layers such as ``25%``."""
    optim: OptimArgs = field(default_factory=OptimArgs)
    """Optimiser settings (learning rate 1e-4, 30 epochs, early stop below loss 0.1)."""
    windows: WindowArgs = field(default_factory=WindowArgs)
    """Training windows: 512 tokens, each re-reading 64 tokens of preceding text."""
    objective: str = "next_token"
    """What a document trains: ``next_token`` (the document's own next-token loss) or ``context_distill``
    (match the base model that reads the document in its prompt, on queries about it; ``distill``)."""
    distill: ContextDistillConfig = field(default_factory=ContextDistillConfig)
    """Queries and teacher settings of the ``context_distill`` objective."""
    gate: GateArgs = field(default_factory=GateArgs)
    """Apply what was learned only to prompts about learned documents (off by default; ``GateArgs``)."""
    delta_bits: int = 8
    """Bits per value of what learning changed, as checkpoints store it and as the model then uses it: after
    each learning run the change from the original weights is rounded to this many bits with one scale per
    row (8: 4x smaller than float32; 4: 8x; 0: kept exactly, stored whole)."""

    def __post_init__(self) -> None:
        check_layer_spec(self.layers, "strategies.finetune.layers")
        check_delta_bits(self.delta_bits, "strategies.finetune.delta_bits")
        check_objective(self.objective, "strategies.finetune.objective")


@register_strategy("finetune", config_cls=FinetuneConfig)
class FinetuneStrategy(TrainingStrategy):
    modifies_backbone = True

    def __init__(self, backbone, config: FinetuneConfig, *, settings) -> None:
        super().__init__(backbone, config, settings=settings)
        self.layer_ids = select_layers(config.layers, backbone.num_layers, "strategies.finetune.layers")
        self._params = {
            f"layers.{i}.{name}": param
            for i in self.layer_ids
            for name, param in backbone.layers[i].named_parameters()
        }
        self._original: dict[str, torch.Tensor] | None = None  # CPU copy, made on first learn

    def _remember_original(self) -> None:
        if self._original is None:
            self._original = {k: host_copy(p) for k, p in self._params.items()}

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        self._remember_original()
        return self._params

    def delta_base(self) -> dict[str, torch.Tensor]:
        self._remember_original()
        assert self._original is not None
        return self._original

    def after_training(self, document, losses: list[float]) -> dict[str, Any]:
        return {"layers": f"{self.layer_ids[0]}..{self.layer_ids[-1]}"}

    @contextmanager
    def _base_model(self) -> Iterator[None]:
        """Swap the original weights in (the trained ones wait on the CPU) and back."""
        if self._original is None:
            yield
            return
        with torch.no_grad():
            trained = {k: host_copy(p) for k, p in self._params.items()}
            for key, param in self._params.items():
                param.copy_(self._original[key])
        try:
            yield
        finally:
            with torch.no_grad():
                for key, param in self._params.items():
                    param.copy_(trained[key])

    def trained_backbone_parameters(self) -> set[str]:
        owned = {id(p) for p in self._params.values()}
        return {name for name, p in self.backbone.model.named_parameters() if id(p) in owned}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What learning changed in the trained layers (:func:`delta_state` against the original weights;
        empty before anything was learned)."""
        if self._original is None:
            return {}
        return self.stored_delta()

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a :meth:`trainable_state` (or full tensors of the trained layers, as older checkpoints
        hold them); everything is checked before anything changes."""
        self._remember_original()
        assert self._original is not None
        full = self.load_stored_delta(state, f"finetune state does not match layers {self.config.layers!r}")
        for key, param in self._params.items():
            param.copy_(full[key])

    @torch.no_grad()
    def reset(self) -> None:
        if self._original is not None:
            for key, param in self._params.items():
                param.copy_(self._original[key])
        self._rounded = None
        self.documents_learned = 0
        self.forget_all()

    def stats(self) -> StrategyStats:
        n = sum(p.numel() for p in self._params.values())
        return StrategyStats(
            params_added=0,
            params_trainable=n,
            state_bytes=tensor_bytes(self.trainable_state()),
            documents=self.documents_learned,
        )
