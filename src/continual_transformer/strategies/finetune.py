"""``finetune``: plain gradient descent on the document, in place, on a chosen range of decoder layers.

The baseline every other strategy is measured against. It adds no parameters; its state is the current value
of the layers it trains. The original weights of those layers are kept on the CPU so :meth:`reset` restores the
base model exactly.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from continual_transformer import training
from continual_transformer.config import ConfigError
from continual_transformer.documents import Document
from continual_transformer.strategies import register_strategy
from continual_transformer.strategies.base import LearnReport, Strategy, StrategyStats, tensor_bytes

_LAYER_SPEC = re.compile(r"^(all|-?\d*:-?\d*|-?\d+)$")


def select_layers(spec: str, n_layers: int) -> list[int]:
    """Layer indices for ``spec``: ``all``, a Python slice such as ``-8:`` or ``4:12``, or one index."""
    spec = spec.strip()
    if not _LAYER_SPEC.match(spec):
        raise ConfigError(f"layers: {spec!r} is not 'all', a slice like '-8:' or '4:12', or an index")
    if spec == "all":
        return list(range(n_layers))
    if ":" not in spec:
        index = int(spec)
        if not -n_layers <= index < n_layers:
            raise ConfigError(f"layers: index {index} out of range for a model with {n_layers} layers")
        return [index % n_layers]
    start, stop = (int(part) if part else None for part in spec.split(":"))
    chosen = list(range(n_layers))[slice(start, stop)]
    if not chosen:
        raise ConfigError(f"layers: {spec!r} selects no layer of a model with {n_layers} layers")
    return chosen


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    layers: str = "all"
    """Decoder layers to train: ``all``, a slice such as ``-8:`` (the last 8) or ``4:12``, or one index."""
    learning_rate: float = 1e-4
    """Optimizer learning rate."""
    optimizer: str = "adamw"
    """``adamw`` or ``sgd``."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    epochs: int = 30
    """Passes over each document."""
    batch_size: int = 8
    """Windows per optimisation step."""
    window_tokens: int = 512
    """Tokens per training window."""
    context_tokens: int = 64
    """Tokens of preceding text each window re-reads (unscored), so facts keep their subject."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 disables it)."""
    stop_loss: float = 0.1
    """Stop after the first epoch whose mean loss is below this (0 disables early stopping)."""

    def __post_init__(self) -> None:
        if not _LAYER_SPEC.match(self.layers.strip()):
            raise ConfigError(
                f"strategies.finetune.layers: {self.layers!r} is not 'all', a slice like '-8:', or an index"
            )
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"strategies.finetune.optimizer: must be adamw or sgd, got {self.optimizer!r}")
        if self.learning_rate <= 0:
            raise ConfigError("strategies.finetune.learning_rate: must be > 0")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("strategies.finetune: epochs and batch_size must be >= 1")
        if not 0 <= self.context_tokens < self.window_tokens:
            raise ConfigError("strategies.finetune.context_tokens: must be in [0, window_tokens)")


@register_strategy("finetune", config_cls=FinetuneConfig)
class FinetuneStrategy(Strategy):
    modifies_backbone = True

    def __init__(self, backbone, config: FinetuneConfig, *, settings) -> None:
        super().__init__(backbone, config, settings=settings)
        self.layer_ids = select_layers(config.layers, backbone.num_layers)
        self._params = {
            f"layers.{i}.{name}": param
            for i in self.layer_ids
            for name, param in backbone.layers[i].named_parameters()
        }
        self._original: dict[str, torch.Tensor] | None = None  # CPU copy, made on first learn

    def _remember_original(self) -> None:
        if self._original is None:
            self._original = {k: p.detach().to("cpu", copy=True) for k, p in self._params.items()}

    def learn(self, document: Document) -> LearnReport:
        cfg = self.config
        self._remember_original()
        examples = training.text_examples(
            self.backbone, document.text, window=cfg.window_tokens, context=cfg.context_tokens
        )
        start = time.perf_counter()
        loss_before = self.backbone.mean_nll([document.text])
        params = list(self._params.values())
        for p in params:
            p.requires_grad_(True)
        try:
            losses = training.train(
                self.backbone,
                examples,
                params,
                optimizer=cfg.optimizer,
                learning_rate=cfg.learning_rate,
                weight_decay=cfg.weight_decay,
                epochs=cfg.epochs,
                batch_size=cfg.batch_size,
                max_grad_norm=cfg.max_grad_norm or None,
                stop_loss=cfg.stop_loss or None,
                seed=self.settings.seed + self.documents_learned,
                description=f"finetune {document.id}",
            )
        finally:
            for p in params:
                p.requires_grad_(False)
        loss_after = self.backbone.mean_nll([document.text])
        self.documents_learned += 1
        return LearnReport(
            doc_id=document.id,
            tokens=sum(e.scored_tokens for e in examples),
            loss_before=loss_before,
            loss_after=loss_after,
            seconds=time.perf_counter() - start,
            step_losses=tuple(losses),
            extra={"steps": len(losses), "layers": f"{self.layer_ids[0]}..{self.layer_ids[-1]}"},
        )

    def trained_backbone_parameters(self) -> set[str]:
        owned = {id(p) for p in self._params.values()}
        return {name for name, p in self.backbone.model.named_parameters() if id(p) in owned}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self._params.items()}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self._params) - set(state))
        unexpected = sorted(set(state) - set(self._params))
        if missing or unexpected:
            raise ValueError(
                f"finetune state does not match layers {self.config.layers!r}: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        self._remember_original()
        for key, param in self._params.items():
            if state[key].shape != param.shape:
                raise ValueError(f"{key}: shape {tuple(state[key].shape)} != {tuple(param.shape)}")
            param.copy_(state[key])

    @torch.no_grad()
    def reset(self) -> None:
        if self._original is not None:
            for key, param in self._params.items():
                param.copy_(self._original[key])
        self.documents_learned = 0

    def stats(self) -> StrategyStats:
        n = sum(p.numel() for p in self._params.values())
        return StrategyStats(
            params_added=0,
            params_trainable=n,
            state_bytes=tensor_bytes(self.trainable_state()),
            documents=self.documents_learned,
        )
