"""``lora``: LoRA fine-tuning on the document (peft), on a chosen range of decoder layers.

The standard parameter-efficient baseline. Adapters are injected into the projections of the chosen decoder
layers in place (``peft.inject_adapter_in_model``): ``nn.Linear`` in Llama-like models, transformers'
``Conv1D`` in GPT-2 (:func:`continual_transformer.layers.projection_targets`). Only the LoRA matrices train
and only they are saved. :meth:`disabled` switches the adapters off (the base model exactly); ``close``
unwraps the layers.

Answers are decoded with each adapted projection merged into a copy of its layer (``merge_answers``: the
weight plus peft's delta, ``scale * B @ A``), put in place of peft's wrapper for the call. Decoding then runs
plain layers, which the fast backends fuse and record as CUDA graphs as they do the base model's, and one
product per projection instead of three. The copies are kept until the adapters change.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from continual_transformer.config import ConfigError, GateArgs, OptimArgs, WindowArgs
from continual_transformer.distillation import ContextDistillConfig, check_objective
from continual_transformer.layers import check_layer_spec, is_transposed, projection_targets, select_layers
from continual_transformer.strategies import register_strategy
from continual_transformer.strategies.base import StrategyStats, TrainingStrategy, tensor_bytes

ADAPTER = "ctt"


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    layers: str = "all"
    """Decoder layers that get adapters: ``all``, a slice such as ``-8:``, one index, or a share such as
    ``25%``."""
    rank: int = 16
    """LoRA rank r."""
    alpha: float = 32.0
    """LoRA scaling numerator (the update is scaled by alpha / rank)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    optim: OptimArgs = field(default_factory=lambda: OptimArgs(learning_rate=1e-3))
    """Optimiser settings; LoRA needs a larger learning rate (1e-3) than full fine-tuning."""
    windows: WindowArgs = field(default_factory=WindowArgs)
    """Training windows: 512 tokens, each re-reading 64 tokens of preceding text."""
    objective: str = "next_token"
    """What a document trains: ``next_token`` (the document's own next-token loss) or ``context_distill``
    (match the base model that reads the document in its prompt, on queries about it; ``distill``)."""
    distill: ContextDistillConfig = field(default_factory=ContextDistillConfig)
    """Queries and teacher settings of the ``context_distill`` objective."""
    gate: GateArgs = field(default_factory=GateArgs)
    """Apply what was learned only to prompts about learned documents (off by default; ``GateArgs``)."""
    merge_answers: bool = True
    """Decode answers with each adapted projection merged into one plain layer (a copy of the adapted
    weights is kept while the adapters stay unchanged); ``false``: through peft's wrapped layers."""

    def __post_init__(self) -> None:
        check_layer_spec(self.layers, "strategies.lora.layers")
        check_objective(self.objective, "strategies.lora.objective")
        if self.rank < 1:
            raise ConfigError("strategies.lora.rank: must be >= 1")


@register_strategy("lora", config_cls=LoraConfig)
class LoraStrategy(TrainingStrategy):
    modifies_backbone = True

    def __init__(self, backbone, config: LoraConfig, *, settings) -> None:
        super().__init__(backbone, config, settings=settings)
        layer_ids = select_layers(config.layers, backbone.num_layers, "strategies.lora.layers")
        targets = projection_targets(backbone.model, backbone.layers, layer_ids)
        if not targets:
            raise ConfigError(f"strategies.lora.layers: no Linear or Conv1D projection in layers {layer_ids}")
        peft_config = PeftLoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=targets,
            fan_in_fan_out=is_transposed(backbone.model, targets),
            bias="none",
        )
        # The adapters' random initialisation draws from the global generator: seeded here, restored after.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            inject_adapter_in_model(peft_config, backbone.model, adapter_name=ADAPTER)
        self._params = {n: p for n, p in backbone.model.named_parameters() if "lora_" in n}
        for p in self._params.values():
            p.requires_grad_(False)
        self._initial = {n: p.detach().clone() for n, p in self._params.items()}
        self._merged: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []
        self._merged_key: tuple[Any, ...] | None = None
        # the wrapped layers, (parent, child name, wrapper), listed again when the model's modules change
        self._wrapped: list[tuple[nn.Module, str, LoraLayer]] = []
        self._wrapped_walk: tuple[nn.Module, ...] | None = None

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return self._params

    def _lora_layers(self) -> list[LoraLayer]:
        return [m for m in self.backbone.model.modules() if isinstance(m, LoraLayer)]

    @contextmanager
    def _base_model(self) -> Iterator[None]:
        """peft's own switch: a disabled LoRA layer computes its base layer only."""
        layers = self._lora_layers()
        grads = {n: p.requires_grad for n, p in self._params.items()}
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)  # peft switches requires_grad on here: put it back as it was
            for name, param in self._params.items():
                param.requires_grad_(grads[name])

    def _answering(self) -> AbstractContextManager[Any]:
        return self._merged_layers() if self.config.merge_answers and self._params else nullcontext()

    @contextmanager
    def _merged_layers(self) -> Iterator[None]:
        """Each wrapped projection replaced by its merged copy while inside, the wrappers back after (straight
        into the parents' children: every answer swaps them in and out)."""
        self._refresh_merged()
        for parent, child, _, merged in self._merged:
            parent._modules[child] = merged
        try:
            yield
        finally:
            for parent, child, wrapper, _ in self._merged:
                parent._modules[child] = wrapper

    def _wrapped_layers(self) -> list[tuple[nn.Module, str, LoraLayer]]:
        """(parent, child name, wrapper) of every LoRA-wrapped layer, listed again only when the model's
        modules changed (:meth:`Backbone.modules`)."""
        walk = self.backbone.modules()
        if walk is not self._wrapped_walk:
            model = self.backbone.model
            wrapped = []
            for name, module in model.named_modules():
                if isinstance(module, LoraLayer):
                    parent_name, _, child = name.rpartition(".")
                    wrapped.append(
                        (model.get_submodule(parent_name) if parent_name else model, child, module)
                    )
            self._wrapped, self._wrapped_walk = wrapped, walk
        return self._wrapped

    def _refresh_merged(self) -> None:
        """(Re)build the merged copies when an adapter or base weight changed since they were made (a load
        or a reset writes in place and bumps the tensor's version; a fused optimiser step does not, so every
        training of the backbone counts as a change)."""
        wrapped = self._wrapped_layers()
        key = tuple(
            (id(w), p.data_ptr(), p._version)
            for _, _, w in wrapped
            for p in (
                *w.get_base_layer()._parameters.values(),
                *(w.lora_A[ADAPTER]._parameters.values() if ADAPTER in w.lora_A else ()),
                *(w.lora_B[ADAPTER]._parameters.values() if ADAPTER in w.lora_B else ()),
            )
            if p is not None
        ) + (self.backbone.trainings,)
        if key == self._merged_key:
            return
        merged = []
        # plain tensors even when first made inside inference mode (generate)
        with torch.inference_mode(False), torch.no_grad():
            for parent, child, wrapper in wrapped:
                layer = copy.deepcopy(wrapper.get_base_layer())
                for param in layer.parameters():
                    param.requires_grad_(False)
                if ADAPTER in wrapper.lora_A:  # peft's delta in the base weight's layout (fan_in_fan_out)
                    layer.weight.add_(wrapper.get_delta_weight(ADAPTER).to(layer.weight.dtype))
                merged.append((parent, child, wrapper, layer))
        self._merged, self._merged_key = merged, key

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
        for name, param in self._params.items():
            param.copy_(state[name])

    @torch.no_grad()
    def reset(self) -> None:
        for name, param in self._params.items():
            param.copy_(self._initial[name])  # lora_B starts at zero: the base model exactly
        self.documents_learned = 0
        self.forget_all()

    def close(self) -> None:
        """Replace every LoRA-wrapped layer by its base layer."""
        for parent, child, wrapper in self._wrapped_layers():
            setattr(parent, child, wrapper.get_base_layer())
        self._params = {}
        self._merged, self._merged_key = [], None
        self._wrapped, self._wrapped_walk = [], None

    def stats(self) -> StrategyStats:
        n = sum(p.numel() for p in self._params.values())
        return StrategyStats(
            params_added=n,
            params_trainable=n,
            state_bytes=tensor_bytes(self.trainable_state()),
            documents=self.documents_learned,
        )
