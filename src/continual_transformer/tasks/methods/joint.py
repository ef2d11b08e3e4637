"""``joint``: the shared adapter trained on every task's examples so far (the multitask upper bound)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import torch

from continual_transformer.backbone import Backbone
from continual_transformer.tasks.config import TaskConfig
from continual_transformer.tasks.methods import registry
from continual_transformer.tasks.methods.base import without_prefix
from continual_transformer.tasks.methods.sequential import SequentialMethod
from continual_transformer.tasks.prompts import Encoded


@registry.register("joint")
class JointMethod(SequentialMethod):
    """Shared adapter trained, at each step, on every example of every task so far (multitask upper bound).

    It keeps all training data (its state grows with every task) and its cost per step grows with the tasks
    seen. Its adapter is as wide as ``adapter_distill``'s whole pool (``joint_adapter_dim``).
    """

    grows_with_tasks = True

    def __init__(self, backbone: Backbone, config: TaskConfig) -> None:
        width = config.joint_adapter_dim or config.pool_size * config.adapter_dim
        super().__init__(backbone, dataclasses.replace(config, adapter_dim=width))
        self.store: list[Encoded] = []

    def training_examples(self, task: int, examples: Sequence[Encoded]) -> Sequence[Encoded]:
        self.store = [e for e in self.store if e.task != task] + list(examples)
        cap = self.config.joint_max_examples
        if cap is not None and len(self.store) > cap:
            return random.Random(self.config.seed + task).sample(self.store, cap)
        return self.store

    def state_tensors(self) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(e.text_ids) for e in self.store], dtype=torch.int64)
        tokens = torch.tensor([t for e in self.store for t in e.text_ids], dtype=torch.int32)
        meta = torch.tensor([[e.task, e.label] for e in self.store], dtype=torch.int32).reshape(-1, 2)
        return {
            **super().state_tensors(),
            "store.tokens": tokens,
            "store.lengths": lengths,
            "store.meta": meta,
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(without_prefix(tensors, "store."))
        ends = tensors["store.lengths"].cumsum(0).tolist()
        tokens = tensors["store.tokens"].tolist()
        starts = [0, *ends[:-1]]
        self.store = [
            Encoded(tuple(tokens[a:b]), int(task), int(label))
            for a, b, (task, label) in zip(starts, ends, tensors["store.meta"].tolist())
        ]
