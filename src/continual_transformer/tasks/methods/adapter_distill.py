"""``adapter_distill``: the zero-growth method, a fixed pool of adapters merged by distillation when full."""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import torch

from continual_transformer.backbone import Backbone
from continual_transformer.tasks.buffer import ReplayBuffer
from continual_transformer.tasks.config import TaskConfig
from continual_transformer.tasks.methods import registry
from continual_transformer.tasks.methods.base import RowsOf, TaskMethod, adapter_pool, copy_exact, sub_tensors
from continual_transformer.tasks.prompts import (
    AnswerBatch,
    Encoded,
    TrainRow,
    answer_batch,
    answer_logits,
    to_device,
)
from continual_transformer.tasks.training import answer_nll, distillation_loss, rows_nll

logger = logging.getLogger(__name__)

TRANSFER_BATCHES = 4
"""The transfer scores of a slot choice run ``eval_batch_size * TRANSFER_BATCHES`` rows per forward pass
(every candidate slot times ``transfer_samples`` rows: 640 with 10 slots)."""

GOLD = -1
"""Teacher of a distillation row that learns its gold answer instead (an online update's own rows)."""


@registry.register("adapter_distill")
class AdapterDistillMethod(TaskMethod):
    """A fixed pool of adapters; a full pool absorbs each new task by distillation (Ermis et al., 2022, Sec.
    3).

    Memory, all allocated at construction: ``pool_size`` adapter slots, one staging slot (holds the new
    adapter as a teacher while the merged one trains), the scratch adapter being trained, the task-to-slot
    table (``max_tasks`` ints) and the replay/distillation buffer (``buffer_size`` rows of ``max_text_tokens``
    int32 ids). Distilling slot ``s`` with a new task uses the new task's training data (teacher: the new
    adapter) and the buffer rows of the tasks served by ``s`` (teacher: ``s``).

    Where merges lost accuracy (``benchmarks/merge_diagnostics.py`` on the committed H100 runs): only the
    tasks sharing the merged slot lose, and most where the new task's rows outnumber the slot's buffered rows
    (clinc150-10: 3.3 to 1, -0.016 per merge and task; banking77 -0.021; long15, about 1 to 1: no loss). The
    reservoir buffer thins each task's share as tasks arrive, and the original distillation set is the new
    task's rows plus whatever the buffer holds. The defaults keep an equal buffer share per task
    (``buffer_policy: balanced``) and give every task sharing the slot the same weight in the distillation set
    (``merge_data: balanced``); ``reservoir`` / ``new`` give the original method.

    Calling :meth:`learn` again for a learned task is an online update (:meth:`_update`): its slot keeps
    training on the new examples, no new adapter and no merge.
    """

    def __init__(self, backbone: Backbone, config: TaskConfig) -> None:
        super().__init__(backbone, config)
        self.staging = config.pool_size
        self.pool = adapter_pool(backbone, config, config.pool_size + 1)
        self.slot_of_task = torch.full((config.max_tasks,), -1, dtype=torch.int64)
        self.merges = torch.zeros((), dtype=torch.int64)
        self.buffer = ReplayBuffer(
            config.buffer_size,
            config.max_text_tokens,
            seed=config.seed,
            balanced=config.buffer_policy == "balanced",
        )

    def activate(self, tasks: torch.Tensor):
        slots = torch.where(tasks >= 0, self.slot_of_task[tasks.clamp(min=0)], torch.full_like(tasks, -1))
        return self.pool.use(slots)

    def learn(
        self, task: int, examples: Sequence[Encoded], *, epochs: int, rows_of: RowsOf
    ) -> dict[str, Any]:
        if int(self.slot_of_task[task]) >= 0:
            return self._update(task, examples, rows_of=rows_of)
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
        used = sorted(set(self.slot_of_task[self.slot_of_task >= 0].tolist()))
        free = [s for s in range(cfg.pool_size) if s not in used]
        report: dict[str, Any] = {"losses": losses, "train_s": train_s, "distill_s": 0.0}
        if free:
            slot = free[0]
            pool.store(slot)
            report.update(slot=slot, merged=False)
        else:
            start = time.perf_counter()
            slot, transfer = self._choose_slot(rows, used)
            pool.store(self.staging)  # the new adapter becomes a teacher
            pool.fetch(slot)  # the student starts from the old adapter
            old_tasks = self.tasks_of(slot)
            replayed = self.buffer.examples(old_tasks)
            distill_rows = self._distill_rows(
                [TrainRow(r.prompt, r.answer, r.task, self.staging) for r in rows],
                [TrainRow(r.prompt, r.answer, r.task, slot) for r in rows_of(replayed)],
                slot=slot,
                seed=cfg.seed + task,
            )
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
                distill_rows=len(distill_rows),
                distill_losses=distill_losses,
                distill_s=time.perf_counter() - start,
            )
            logger.info(
                "task %d distilled into slot %d with tasks %s (%d replayed rows, %d distillation rows)",
                task,
                slot,
                old_tasks,
                len(replayed),
                len(distill_rows),
            )
        self.slot_of_task[task] = slot
        self.buffer.add(examples)
        return report

    def tasks_of(self, slot: int) -> list[int]:
        """The tasks slot ``slot`` serves, in task order."""
        return (self.slot_of_task == slot).nonzero().squeeze(1).tolist()

    def _distill_rows(
        self, new_rows: list[TrainRow], old_rows: list[TrainRow], *, slot: int, seed: int
    ) -> list[TrainRow]:
        """The rows of one distillation epoch (``merge_data``): the new task's rows and the slot's tasks'
        buffer rows, each task weighing the same when ``balanced``."""
        if self.config.merge_data == "new":
            # With no buffered rows of the slot's tasks, the new task's inputs are matched against the old
            # slot too, as in the data-free original.
            return new_rows + (old_rows or [dataclasses.replace(r, teacher=slot) for r in new_rows])
        rng = random.Random(seed)
        by_task: dict[int, list[TrainRow]] = {}
        for row in old_rows or [dataclasses.replace(r, teacher=slot) for r in new_rows]:  # data-free fallback
            by_task.setdefault(row.task if old_rows else -1, []).append(row)
        budget = int(self.config.distill_budget * len(new_rows)) // (len(by_task) + 1)
        per_task = max(1, min(self.config.distill_rows_per_task, len(new_rows), budget))
        out = rng.sample(new_rows, per_task)
        for task_rows in by_task.values():
            start = rng.randrange(len(task_rows))
            out += [task_rows[(start + i) % len(task_rows)] for i in range(per_task)]  # cycled
        return out

    def _update(self, task: int, examples: Sequence[Encoded], *, rows_of: RowsOf) -> dict[str, Any]:
        """An online update of a learned task: its slot trains on the new examples (gold labels) and the
        task's buffered rows, while the other tasks of the slot are kept by distillation from the slot as it
        was (their buffer rows, as many as the task's rows)."""
        cfg, pool = self.config, self.pool
        start = time.perf_counter()
        slot = int(self.slot_of_task[task])
        own = rows_of(list(examples) + self.buffer.examples([task]))
        gold = [TrainRow(r.prompt, r.answer, r.task, GOLD) for r in own]
        others = [t for t in self.tasks_of(slot) if t != task]
        kept = [
            TrainRow(r.prompt, r.answer, r.task, self.staging) for r in rows_of(self.buffer.examples(others))
        ]
        rows = gold
        if kept:
            rng = random.Random(cfg.seed + task + int(self.buffer.seen))
            rows = gold + [kept[rng.randrange(len(kept))] for _ in range(len(gold))]
        pool.fetch(slot)
        pool.store(self.staging)  # the slot as it was: the teacher of its other tasks
        losses = self._fit(
            pool.scratch_parameters(),
            rows,
            self._distill_loss,
            epochs=cfg.online_epochs,
            seed=cfg.seed + task + int(self.buffer.seen),
            description=f"task {task}: online update of slot {slot}",
        )
        pool.store(slot)
        self.buffer.add(examples)
        return {
            "losses": losses,
            "train_s": time.perf_counter() - start,
            "distill_s": 0.0,
            "slot": slot,
            "merged": False,
            "online": True,
            "kept_tasks": others,
        }

    def _choose_slot(self, rows: Sequence[TrainRow], used: list[int]) -> tuple[int, dict[int, float]]:
        """The slot a new task is merged into (``slot_choice``) and the transfer NLL of each candidate."""
        candidates = used
        if self.config.slot_choice == "balanced":
            load = {s: len(self.tasks_of(s)) for s in used}
            least = min(load.values())
            candidates = [s for s in used if load[s] == least]
        if len(candidates) == 1:
            return candidates[0], {}
        return self._most_transferable(rows, candidates)

    def _gold_loss(self, batch: AnswerBatch, rows: Sequence[TrainRow]) -> torch.Tensor:
        return answer_nll(self.scratch_logits(self.pool, batch), batch)

    def _distill_loss(self, batch: AnswerBatch, rows: Sequence[TrainRow]) -> torch.Tensor:
        """Distillation on rows with a teacher slot; the gold answer's NLL on rows whose teacher is
        :data:`GOLD`; each part weighted by its share of the rows."""
        is_gold = [r.teacher == GOLD for r in rows]
        n_gold = sum(is_gold)  # counted on the host: no device sync
        gold = to_device(torch.tensor(is_gold), batch.target_mask.device)
        student = self.scratch_logits(self.pool, batch)
        loss = student.new_zeros((), dtype=torch.float32)
        if n_gold < len(rows):
            target = self._teacher_logits(batch, rows)
            mask = batch.target_mask & ~gold[:, None]
            kd = distillation_loss(student, target, mask, self.config.distill_temperature)
            loss = loss + kd * (len(rows) - n_gold) / len(rows)
        if n_gold:
            gold_batch = dataclasses.replace(batch, target_mask=batch.target_mask & gold[:, None])
            loss = loss + answer_nll(student, gold_batch) * n_gold / len(rows)
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
            if teacher == GOLD:
                continue  # no teacher: those rows learn the gold answer
            index = (teachers == teacher).nonzero().squeeze(1)
            group = [rows[i] for i in index.tolist()]
            sub = answer_batch(group, batch.pad_id, batch.targets.device, share_prefix=len(group) > 1)
            with self.pool.use(int(teacher)):
                logits = answer_logits(self.backbone.model, sub)  # (b, A_sub, V), right-aligned answers
            if out is None:
                out = logits.new_zeros(len(rows), batch.answer_width, logits.shape[-1])
            out[to_device(index, out.device), batch.answer_width - sub.answer_width :] = logits
        return out  # rows without a teacher stay zero (masked out of the loss)

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

        # No gradients: rows in batches of TRANSFER_BATCHES evaluation batches (a pass costs its launches, not
        # its rows, on a GPU).
        batch_size = self.config.eval_batch_size * TRANSFER_BATCHES
        nll = rows_nll(self.backbone, expanded, forward, batch_size, share_prefix=False)
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
