"""``ewc``: the shared adapter with an online elastic-weight-consolidation penalty (diagonal Fisher)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from continual_transformer.backbone import Backbone
from continual_transformer.tasks.config import TaskConfig
from continual_transformer.tasks.methods import registry
from continual_transformer.tasks.methods.base import copy_exact, without_prefix
from continual_transformer.tasks.methods.sequential import SequentialMethod
from continual_transformer.tasks.prompts import AnswerBatch, Encoded, TrainRow
from continual_transformer.tasks.training import answer_nll, diagonal_fisher, ewc_penalty


@registry.register("ewc")
class EWCMethod(SequentialMethod):
    """Shared adapter with online EWC: ``lambda/2 * sum F (theta - theta*)^2``; F accumulates over tasks
    (Schwarz et al. 2018's online form, so its memory is one Fisher, not one per task); theta* is slot 0."""

    def __init__(self, backbone: Backbone, config: TaskConfig) -> None:
        super().__init__(backbone, config)
        self.fisher = [torch.zeros_like(p) for p in self.pool.scratch_parameters()]

    def anchors(self) -> list[torch.Tensor]:
        pool = self.pool
        return [pool.slot_down[0], pool.slot_down_bias[0], pool.slot_up[0], pool.slot_up_bias[0]]

    def penalty(self) -> torch.Tensor:
        """``lambda/2 * sum F (theta - theta*)^2`` of the scratch adapter against the anchor (slot 0)."""
        return (
            0.5
            * self.config.ewc_lambda
            * ewc_penalty(self.pool.scratch_parameters(), self.anchors(), self.fisher)
        )

    def step_loss(self, batch: AnswerBatch, rows: Sequence[TrainRow]) -> torch.Tensor:
        loss = answer_nll(self.student_logits(batch), batch)
        if int(self.tasks_learned) > 0:
            loss = loss + self.penalty()
        return loss

    def after_task(self, task: int, examples: Sequence[Encoded], rows: Sequence[TrainRow]) -> None:
        sample = list(rows[: self.config.ewc_fisher_samples])
        fisher = diagonal_fisher(self.backbone, self.pool.scratch_parameters(), sample, self.student_logits)
        for acc, new in zip(self.fisher, fisher):
            acc.add_(new)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        names = ("down", "down_bias", "up", "up_bias")
        return {**super().state_tensors(), **{f"fisher.{n}": f for n, f in zip(names, self.fisher)}}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(without_prefix(tensors, "fisher."))
        for name, own in zip(("down", "down_bias", "up", "up_bias"), self.fisher):
            copy_exact(own, tensors, f"fisher.{name}")
