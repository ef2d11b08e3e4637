"""``lwf``: the shared adapter distilled towards its own answers from before the task (Learning without
Forgetting)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from continual_transformer.tasks.methods import registry
from continual_transformer.tasks.methods.sequential import SequentialMethod
from continual_transformer.tasks.prompts import AnswerBatch, TrainRow, answer_logits
from continual_transformer.tasks.training import answer_nll, distillation_loss


@registry.register("lwf")
class LwFMethod(SequentialMethod):
    """Shared adapter; while learning a task, its answers' distributions are also distilled from the adapter
    as it was before the task (slot 0) on the new task's inputs (Li & Hoiem 2017, adapted to a generative
    LM)."""

    def step_loss(self, batch: AnswerBatch, rows: Sequence[TrainRow]) -> torch.Tensor:
        student = self.student_logits(batch)
        loss = answer_nll(student, batch)
        if int(self.tasks_learned) > 0 and self.config.lwf_alpha:
            with torch.no_grad(), self.pool.use(0):
                teacher = answer_logits(self.backbone.model, batch)
            loss = loss + self.config.lwf_alpha * distillation_loss(
                student, teacher, batch.target_mask, self.config.distill_temperature
            )
        return loss
