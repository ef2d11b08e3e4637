"""``adapter_distill``: the zero-growth method, a fixed pool of adapters merged by distillation when full."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from continual_transformer.backbone import Backbone
from continual_transformer.tasks.buffer import ReplayBuffer
from continual_transformer.tasks.config import TaskConfig
from continual_transformer.tasks.methods import registry
from continual_transformer.tasks.methods.base import RowsOf, TaskMethod, adapter_pool, copy_exact, sub_tensors
from continual_transformer.tasks.prompts import AnswerBatch, Encoded, TrainRow, answer_batch, answer_logits
from continual_transformer.tasks.training import answer_nll, distillation_loss, rows_nll

logger = logging.getLogger(__name__)


@registry.register("adapter_distill")
class AdapterDistillMethod(TaskMethod):
    """A fixed pool of adapters; a full pool absorbs each new task by distillation (Ermis et al., 2022, Sec.
    3).

    Memory, all allocated at construction: ``pool_size`` adapter slots, one staging slot (holds the new
    adapter as a teacher while the merged one trains), the scratch adapter being trained, the task-to-slot
    table (``max_tasks`` ints) and the replay/distillation buffer (``buffer_size`` rows of ``max_text_tokens``
    int32 ids). Distilling slot ``s`` with a new task uses the new task's training data (teacher: the new
    adapter) and the buffer rows of the tasks served by ``s`` (teacher: ``s``); when the buffer holds none of
    them, the new task's inputs are also matched against ``s``, as in the data-free original.
    """

    def __init__(self, backbone: Backbone, config: TaskConfig) -> None:
        super().__init__(backbone, config)
        self.staging = config.pool_size
        self.pool = adapter_pool(backbone, config, config.pool_size + 1)
        self.slot_of_task = torch.full((config.max_tasks,), -1, dtype=torch.int64)
        self.merges = torch.zeros((), dtype=torch.int64)
        self.buffer = ReplayBuffer(config.buffer_size, config.max_text_tokens, seed=config.seed)

    def activate(self, tasks: torch.Tensor):
        slots = torch.where(tasks >= 0, self.slot_of_task[tasks.clamp(min=0)], torch.full_like(tasks, -1))
        return self.pool.use(slots)

    def learn(
        self, task: int, examples: Sequence[Encoded], *, epochs: int, rows_of: RowsOf
    ) -> dict[str, Any]:
        cfg, pool = self.config, self.pool
        rows = rows_of(examples)
        start = time.perf_counter()
        pool.fresh_scratch(cfg.seed + task)
        losses = self._fit(
            pool.scratch_parameters(),
            rows,
            self._gold_loss,
            epochs=epochs,
            seed=cfg.seed + task,
            description=f"task {task}: new adapter",
        )
        train_s = time.perf_counter() - start
        others = self.slot_of_task.clone()
        others[task] = -1
        used = set(others[others >= 0].tolist())
        free = [s for s in range(cfg.pool_size) if s not in used]
        report: dict[str, Any] = {"losses": losses, "train_s": train_s, "distill_s": 0.0}
        if free:
            slot = free[0]
            pool.store(slot)
            report.update(slot=slot, merged=False)
        else:
            start = time.perf_counter()
            slot, transfer = self._most_transferable(rows, sorted(used))
            pool.store(self.staging)  # the new adapter becomes a teacher
            pool.fetch(slot)  # the student starts from the old adapter
            old_tasks = [t for t in range(cfg.max_tasks) if int(others[t]) == slot]
            replayed = self.buffer.examples(old_tasks)
            distill_rows = [TrainRow(r.prompt, r.answer, r.task, self.staging) for r in rows]
            if replayed:
                distill_rows += [TrainRow(r.prompt, r.answer, r.task, slot) for r in rows_of(replayed)]
            else:
                distill_rows += [TrainRow(r.prompt, r.answer, r.task, slot) for r in rows]
            distill_losses = self._fit(
                pool.scratch_parameters(),
                distill_rows,
                self._distill_loss,
                epochs=cfg.distill_epochs,
                seed=cfg.seed + task + 7919,
                description=f"task {task}: distil into slot {slot}",
            )
            pool.store(slot)
            self.merges += 1
            report.update(
                slot=slot,
                merged=True,
                transfer_nll=transfer,
                merged_tasks=old_tasks,
                replayed_rows=len(replayed),
                distill_losses=distill_losses,
                distill_s=time.perf_counter() - start,
            )
            logger.info(
                "task %d distilled into slot %d with tasks %s (%d replayed rows)",
                task,
                slot,
                old_tasks,
                len(replayed),
            )
        self.slot_of_task[task] = slot
        self.buffer.add(examples)
        return report

    def _gold_loss(self, batch: AnswerBatch, rows: Sequence[TrainRow]) -> torch.Tensor:
        with self.pool.use("scratch"):
            return answer_nll(answer_logits(self.backbone.model, batch), batch)

    def _distill_loss(self, batch: AnswerBatch, rows: Sequence[TrainRow]) -> torch.Tensor:
        target = self._teacher_logits(batch, rows)
        with self.pool.use("scratch"):
            student = answer_logits(self.backbone.model, batch)
        loss = distillation_loss(student, target, batch.target_mask, self.config.distill_temperature)
        if self.config.distill_ce_weight:
            loss = loss + self.config.distill_ce_weight * answer_nll(student, batch)
        return loss

    @torch.no_grad()
    def _teacher_logits(self, batch: AnswerBatch, rows: Sequence[TrainRow]) -> torch.Tensor:
        """Each row's teacher logits (B, A, V). With a shared prompt prefix, one pass per teacher (the
        prefix's hidden states depend on the adapter); otherwise one pass with per-row slots."""
        teachers = torch.tensor([r.teacher for r in rows], dtype=torch.long)
        if not batch.shared:
            with self.pool.use(teachers):
                return answer_logits(self.backbone.model, batch)
        out = None
        for teacher in teachers.unique().tolist():
            index = (teachers == teacher).nonzero().squeeze(1)
            group = [rows[i] for i in index.tolist()]
            sub = answer_batch(group, batch.pad_id, batch.targets.device, share_prefix=len(group) > 1)
            with self.pool.use(int(teacher)):
                logits = answer_logits(self.backbone.model, sub)  # (b, A_sub, V), right-aligned answers
            if out is None:
                out = logits.new_zeros(len(rows), batch.answer_width, logits.shape[-1])
            out[index.to(out.device), batch.answer_width - sub.answer_width :] = logits
        return out

    def _most_transferable(self, rows: Sequence[TrainRow], slots: list[int]) -> tuple[int, dict[int, float]]:
        """The used slot under which the new task's answers are most likely (lowest mean NLL, no training)."""
        sample = list(rows[: self.config.transfer_samples])
        expanded = [r for _ in slots for r in sample]  # slot-major: rows of slot i are a contiguous block
        teachers = torch.tensor([s for s in slots for _ in sample], dtype=torch.long)
        offset = [0]

        def forward(batch: AnswerBatch) -> torch.Tensor:
            n = batch.size
            with self.pool.use(teachers[offset[0] : offset[0] + n]):
                offset[0] += n
                return answer_logits(self.backbone.model, batch)

        nll = rows_nll(self.backbone, expanded, forward, self.config.eval_batch_size, share_prefix=False)
        nll = nll.view(len(slots), len(sample))
        means = nll.mean(1)
        best = int(means.argmin())
        return slots[best], {s: float(m) for s, m in zip(slots, means)}

    def num_parameters(self) -> int:
        return self.pool.num_parameters()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            **{f"pool.{k}": v for k, v in self.pool.state_tensors().items()},
            **{f"buffer.{k}": v for k, v in self.buffer.state_tensors().items()},
            "slot_of_task": self.slot_of_task,
            "merges": self.merges,
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.pool.load_state_tensors(sub_tensors(tensors, "pool."))
        self.buffer.load_state_tensors(sub_tensors(tensors, "buffer."))
        copy_exact(self.slot_of_task, tensors, "slot_of_task")
        copy_exact(self.merges, tensors, "merges")
