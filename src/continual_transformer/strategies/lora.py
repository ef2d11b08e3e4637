"""``lora``: LoRA fine-tuning on the document (peft), on a chosen range of decoder layers.

The standard parameter-efficient baseline. Adapters are injected into the backbone's linear layers in place
(``peft.inject_adapter_in_model``); only the LoRA matrices train and only they are saved. ``close`` unwraps
the layers again so the backbone is the base model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from continual_transformer import training
from continual_transformer.config import ConfigError
from continual_transformer.documents import Document
from continual_transformer.strategies import register_strategy
from continual_transformer.strategies.base import LearnReport, Strategy, StrategyStats, tensor_bytes
from continual_transformer.strategies.finetune import _LAYER_SPEC, select_layers

ADAPTER = "ctt"


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    layers: str = "all"
    """Decoder layers that get adapters: ``all``, a slice such as ``-8:``, or one index."""
    rank: int = 16
    """LoRA rank r."""
    alpha: float = 32.0
    """LoRA scaling numerator (the update is scaled by alpha / rank)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    learning_rate: float = 1e-3
    """Optimizer learning rate (LoRA needs a larger rate than full fine-tuning)."""
    optimizer: str = "adamw"
    """``adamw`` or ``sgd``."""
    epochs: int = 30
    """Passes over each document."""
    batch_size: int = 8
    """Windows per optimisation step."""
    window_tokens: int = 512
    """Tokens per training window."""
    context_tokens: int = 64
    """Tokens of preceding text each window re-reads (unscored)."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 disables it)."""
    stop_loss: float = 0.1
    """Stop after the first epoch whose mean loss is below this (0 disables early stopping)."""

    def __post_init__(self) -> None:
        if not _LAYER_SPEC.match(self.layers.strip()):
            raise ConfigError(
                f"strategies.lora.layers: {self.layers!r} is not 'all', a slice like '-8:', or an index"
            )
        if self.rank < 1:
            raise ConfigError("strategies.lora.rank: must be >= 1")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"strategies.lora.optimizer: must be adamw or sgd, got {self.optimizer!r}")
        if not 0 <= self.context_tokens < self.window_tokens:
            raise ConfigError("strategies.lora.context_tokens: must be in [0, window_tokens)")


@register_strategy("lora", config_cls=LoraConfig)
class LoraStrategy(Strategy):
    modifies_backbone = True

    def __init__(self, backbone, config: LoraConfig, *, settings) -> None:
        super().__init__(backbone, config, settings=settings)
        layer_ids = select_layers(config.layers, backbone.num_layers)
        prefix = self._layers_prefix()
        targets = [
            name
            for name, module in backbone.model.named_modules()
            if isinstance(module, torch.nn.Linear)
            and any(name.startswith(f"{prefix}.{i}.") for i in layer_ids)
        ]
        peft_config = PeftLoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=targets,
            bias="none",
        )
        torch.manual_seed(settings.seed)
        inject_adapter_in_model(peft_config, backbone.model, adapter_name=ADAPTER)
        self._params = {n: p for n, p in backbone.model.named_parameters() if "lora_" in n}
        for p in self._params.values():
            p.requires_grad_(False)
        self._initial = {n: p.detach().clone() for n, p in self._params.items()}

    def _layers_prefix(self) -> str:
        for name, module in self.backbone.model.named_modules():
            if module is self.backbone.layers:
                return name
        raise RuntimeError("decoder layers not found in the model")

    def learn(self, document: Document) -> LearnReport:
        cfg = self.config
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
                epochs=cfg.epochs,
                batch_size=cfg.batch_size,
                max_grad_norm=cfg.max_grad_norm or None,
                stop_loss=cfg.stop_loss or None,
                seed=self.settings.seed + self.documents_learned,
                description=f"lora {document.id}",
            )
        finally:
            for p in params:
                p.requires_grad_(False)
        self.documents_learned += 1
        return LearnReport(
            doc_id=document.id,
            tokens=sum(e.scored_tokens for e in examples),
            loss_before=loss_before,
            loss_after=self.backbone.mean_nll([document.text]),
            seconds=time.perf_counter() - start,
            step_losses=tuple(losses),
            extra={"steps": len(losses)},
        )

    def trained_backbone_parameters(self) -> set[str]:
        return set(self._params)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self._params.items()}

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self._params):
            raise ValueError(
                f"lora state does not match the adapters: {sorted(set(state) ^ set(self._params))[:3]}"
            )
        for name, param in self._params.items():
            if state[name].shape != param.shape:
                raise ValueError(f"{name}: shape {tuple(state[name].shape)} != {tuple(param.shape)}")
            param.copy_(state[name])

    @torch.no_grad()
    def reset(self) -> None:
        for name, param in self._params.items():
            param.copy_(self._initial[name])  # lora_B starts at zero: the base model exactly
        self.documents_learned = 0

    def close(self) -> None:
        """Replace every LoRA-wrapped layer by its base layer."""
        model = self.backbone.model
        wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
        for name, module in wrapped:
            parent_name, _, child = name.rpartition(".")
            setattr(
                model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer()
            )
        self._params = {}

    def stats(self) -> StrategyStats:
        n = sum(p.numel() for p in self._params.values())
        return StrategyStats(
            params_added=n,
            params_trainable=n,
            state_bytes=tensor_bytes(self.trainable_state()),
            documents=self.documents_learned,
        )
