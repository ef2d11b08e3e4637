"""What a task method is (:class:`TaskMethod`) and the helpers every method shares."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, ClassVar

import torch

from continual_transformer.backbone import Backbone
from continual_transformer.errors import ConfigError
from continual_transformer.tasks.adapters import AdapterPool
from continual_transformer.tasks.config import TaskConfig
from continual_transformer.tasks.prompts import AnswerBatch, Encoded, TrainRow, answer_logits
from continual_transformer.tasks.state import TensorState, sub_tensors
from continual_transformer.tasks.training import fit

__all__ = [
    "RowsOf",
    "TaskMethod",
    "adapter_pool",
    "copy_exact",
    "resolve_share_prefix",
    "select_layers",
    "sub_tensors",
    "without_prefix",
]

RowsOf = Callable[[Sequence[Encoded]], list[TrainRow]]
"""Turns stored examples into training rows (prompt + gold answer); provided by the learner."""


def select_layers(spec: str, n_layers: int) -> list[int]:
    """Layer indices for ``all``, a slice such as ``-8:``, or one index (as the document strategies read
    it)."""
    from continual_transformer.strategies.finetune import select_layers as _select

    try:
        return _select(spec, n_layers)
    except ConfigError as exc:
        raise ConfigError(f"tasks.adapter_layers: {exc}") from None


def resolve_share_prefix(config: TaskConfig, backbone: Backbone) -> bool:
    """``config.share_prefix``, or when unset: share on CPU only (see the field's docstring)."""
    return config.share_prefix if config.share_prefix is not None else backbone.device.type == "cpu"


class TaskMethod(TensorState, ABC):
    """Base class: what a method owns and how the learner talks to it.

    A method's whole state is :meth:`state_tensors` (saved in checkpoints); :meth:`snapshot` and
    :meth:`rollback` (from :class:`TensorState`) let the learner undo a task that failed half-way. A method
    that changes the backbone's structure (LoRA) overrides :meth:`rollback` and :meth:`close`.
    """

    name: ClassVar[str]
    grows_with_tasks: ClassVar[bool] = False
    """True when parameters or state grow with every task (the contrast baselines)."""
    mixed_batches: ClassVar[bool] = True
    """False when one forward pass can serve only one task (the learner then groups rows by task)."""

    def __init__(self, backbone: Backbone, config: TaskConfig) -> None:
        self.backbone = backbone
        self.config = config
        self.share_prefix = resolve_share_prefix(config, backbone)

    @abstractmethod
    def learn(
        self, task: int, examples: Sequence[Encoded], *, epochs: int, rows_of: RowsOf
    ) -> dict[str, Any]:
        """Learn task ``task`` from its examples; returns figures for the report (losses, seconds...)."""
        ...

    @abstractmethod
    def activate(self, tasks: torch.Tensor) -> Any:
        """Context manager attaching the weights that serve rows of ``tasks`` (CPU, (B,); -1: unseen task)."""
        ...

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...

    @abstractmethod
    def num_parameters(self) -> int:
        """Parameters this method adds to the backbone (adapter weights of every slot)."""
        ...

    def close(self) -> None:
        """Undo structural changes to the backbone (only LoRA makes any)."""

    def scratch_logits(self, pool: AdapterPool, batch: AnswerBatch) -> torch.Tensor:
        """Answer logits of ``batch`` with ``pool``'s trainable adapter attached: the forward pass of a
        training step. With ``tasks.compile`` on a GPU the model runs compiled for varying shapes
        (``Backbone.compiled_calls``), except for a batch whose shared prefix runs on its own and a batch of
        one row (the compiler makes a graph of its own for a dimension of 1: minutes, for one step)."""
        compiled = self.config.compile and not batch.shared and batch.size > 1
        with (
            pool.use("scratch"),
            self.backbone.compiled_calls("task training") if compiled else nullcontext(),
        ):
            return answer_logits(self.backbone.model, batch)

    def _fit(
        self,
        params,
        rows,
        step_loss,
        *,
        epochs: int,
        seed: int,
        description: str,
        extra_rows=None,
        share_prefix: bool = True,
    ) -> list[float]:
        """:func:`training.fit` with this method's optimiser settings."""
        cfg = self.config
        return fit(
            self.backbone,
            params,
            rows,
            step_loss,
            epochs=epochs,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
            seed=seed,
            extra_rows=extra_rows,
            share_prefix=share_prefix and self.share_prefix,
            description=description,
        )


def adapter_pool(backbone: Backbone, config: TaskConfig, slots: int) -> AdapterPool:
    """An adapter pool of ``slots`` slots on the layers and with the shape ``config`` names."""
    layers = select_layers(config.adapter_layers, backbone.num_layers)
    return AdapterPool(
        backbone,
        slots=slots,
        bottleneck=config.adapter_dim,
        layers=layers,
        activation=config.adapter_activation,
    )


def without_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names do not start with ``prefix``."""
    return {k: v for k, v in tensors.items() if not k.startswith(prefix)}


def copy_exact(own: torch.Tensor, tensors: dict[str, torch.Tensor], key: str) -> None:
    """Copy ``tensors[key]`` into ``own``; a missing tensor or another shape is a ValueError."""
    if key not in tensors:
        raise ValueError(f"tensor {key} is missing")
    if tensors[key].shape != own.shape:
        raise ValueError(f"tensor {key}: shape {tuple(tensors[key].shape)} != {tuple(own.shape)}")
    own.copy_(tensors[key])
