"""``replay``: the shared adapter with experience replay from a fixed-size reservoir buffer."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from continual_transformer.backbone import Backbone
from continual_transformer.tasks.buffer import ReplayBuffer
from continual_transformer.tasks.config import TaskConfig
from continual_transformer.tasks.methods import registry
from continual_transformer.tasks.methods.base import RowsOf, sub_tensors, without_prefix
from continual_transformer.tasks.methods.sequential import SequentialMethod
from continual_transformer.tasks.prompts import Encoded, TrainRow


@registry.register("replay")
class ReplayMethod(SequentialMethod):
    """Shared adapter; every step adds ``replay_batch_size`` rows drawn from a fixed reservoir buffer."""

    def __init__(self, backbone: Backbone, config: TaskConfig) -> None:
        super().__init__(backbone, config)
        self.buffer = ReplayBuffer(config.buffer_size, config.max_text_tokens, seed=config.seed)

    def extra_rows(self, rows_of: RowsOf):
        if len(self.buffer) == 0 or self.config.replay_batch_size == 0:
            return None
        return lambda rng: rows_of(self.buffer.sample(self.config.replay_batch_size, rng))

    def after_task(self, task: int, examples: Sequence[Encoded], rows: Sequence[TrainRow]) -> None:
        self.buffer.add(examples)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            **super().state_tensors(),
            **{f"buffer.{k}": v for k, v in self.buffer.state_tensors().items()},
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(without_prefix(tensors, "buffer."))
        self.buffer.load_state_tensors(sub_tensors(tensors, "buffer."))
