"""``sequential``: one adapter shared by every task, fine-tuned on each in turn; the base of the
shared-adapter family (``ewc``, ``lwf``, ``replay``, ``joint``), which changes only the step loss, the rows or
the hooks."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from continual_transformer.backbone import Backbone
from continual_transformer.tasks.config import TaskConfig
from continual_transformer.tasks.methods import registry
from continual_transformer.tasks.methods.base import RowsOf, TaskMethod, adapter_pool, copy_exact, sub_tensors
from continual_transformer.tasks.prompts import AnswerBatch, Encoded, TrainRow
from continual_transformer.tasks.training import answer_nll


@registry.register("sequential")
class SequentialMethod(TaskMethod):
    """One adapter shared by every task, trained on each new task in turn (the lower bound: forgets freely).

    Slot 0 holds the shared adapter; training continues it in the scratch adapter and writes it back.
    """

    def __init__(self, backbone: Backbone, config: TaskConfig) -> None:
        super().__init__(backbone, config)
        self.pool = adapter_pool(backbone, config, 1)
        self.tasks_learned = torch.zeros((), dtype=torch.int64)

    def activate(self, tasks: torch.Tensor):
        return self.pool.use(0)

    def learn(
        self, task: int, examples: Sequence[Encoded], *, epochs: int, rows_of: RowsOf
    ) -> dict[str, Any]:
        rows = rows_of(self.training_examples(task, examples))
        start = time.perf_counter()
        if bool(self.pool.slot_down[0].any()):  # sync: once per task
            self.pool.fetch(0)
        else:
            # the first training: a fresh adapter. From all zeros only the output bias would learn (the
            # bottleneck's activations and the up-projection's gradient are both zero), a constant offset per
            # layer whatever the input.
            self.pool.fresh_scratch(self.config.seed + task)
        self.before_task(task, rows)
        losses = self._fit(
            self.pool.scratch_parameters(),
            rows,
            self.step_loss,
            epochs=epochs,
            seed=self.config.seed + task,
            description=f"task {task}: {self.name}",
            extra_rows=self.extra_rows(rows_of),
        )
        self.after_task(task, examples, rows)
        self.pool.store(0)
        self.tasks_learned += 1
        return {
            "losses": losses,
            "train_s": time.perf_counter() - start,
            "distill_s": 0.0,
            "slot": 0,
            "merged": False,
        }

    # hooks for the variants
    def training_examples(self, task: int, examples: Sequence[Encoded]) -> Sequence[Encoded]:
        return examples

    def before_task(self, task: int, rows: Sequence[TrainRow]) -> None:
        pass

    def after_task(self, task: int, examples: Sequence[Encoded], rows: Sequence[TrainRow]) -> None:
        pass

    def extra_rows(self, rows_of: RowsOf):
        return None

    def student_logits(self, batch: AnswerBatch) -> torch.Tensor:
        return self.scratch_logits(self.pool, batch)

    def step_loss(self, batch: AnswerBatch, rows: Sequence[TrainRow]) -> torch.Tensor:
        return answer_nll(self.student_logits(batch), batch)

    def num_parameters(self) -> int:
        return self.pool.num_parameters()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            **{f"pool.{k}": v for k, v in self.pool.state_tensors().items()},
            "tasks_learned": self.tasks_learned,
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.pool.load_state_tensors(sub_tensors(tensors, "pool."))
        copy_exact(self.tasks_learned, tensors, "tasks_learned")
