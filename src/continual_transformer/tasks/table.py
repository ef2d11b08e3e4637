"""The task table: task ids and label names in fixed-size UTF-8 byte tensors, allocated for ``max_tasks``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from continual_transformer.tasks.config import TaskConfig
from continual_transformer.tasks.data import TaskError
from continual_transformer.tasks.state import TensorState


class TaskTable(TensorState):
    """Task ids and label names in fixed-size UTF-8 byte tables, so even names do not grow the state."""

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self.ids = torch.zeros(config.max_tasks, config.max_task_id_bytes, dtype=torch.uint8)
        self.labels = torch.zeros(
            config.max_tasks, config.max_labels_per_task, config.max_label_bytes, dtype=torch.uint8
        )
        self.num_labels = torch.zeros(config.max_tasks, dtype=torch.int64)
        self.count = torch.zeros((), dtype=torch.int64)
        self._decoded: list[tuple[str, tuple[str, ...]]] = []  # derived cache

    def __len__(self) -> int:
        return int(self.count)

    def index(self, task_id: str) -> int | None:
        for i, (name, _) in enumerate(self.decoded()):
            if name == task_id:
                return i
        return None

    def decoded(self) -> list[tuple[str, tuple[str, ...]]]:
        if len(self._decoded) != len(self):
            self._decoded = [
                (
                    _decode(self.ids[i]),
                    tuple(_decode(self.labels[i, j]) for j in range(int(self.num_labels[i]))),
                )
                for i in range(len(self))
            ]
        return self._decoded

    def task_ids(self) -> list[str]:
        return [name for name, _ in self.decoded()]

    def label_set(self, index: int) -> tuple[str, ...]:
        return self.decoded()[index][1]

    def put(self, task_id: str, labels: Sequence[str]) -> int:
        """Add a task or extend an existing task's labels; returns the task's index. Checks before
        changing."""
        cfg = self.config
        index = self.index(task_id)
        if index is None and len(self) >= cfg.max_tasks:
            raise TaskError(f"the learner is full: tasks.max_tasks={cfg.max_tasks} tasks are learned already")
        current = list(self.label_set(index)) if index is not None else []
        merged = current + [label for label in dict.fromkeys(labels) if label not in current]
        if len(merged) > cfg.max_labels_per_task:
            raise TaskError(
                f"task {task_id!r} has {len(merged)} labels; "
                f"tasks.max_labels_per_task={cfg.max_labels_per_task}"
            )
        if len(merged) < 2:
            raise TaskError(f"task {task_id!r} needs at least two labels, got {merged}")
        rows = torch.stack(
            [_encode(label, cfg.max_label_bytes, "label", "tasks.max_label_bytes") for label in merged]
        )
        id_row = _encode(task_id, cfg.max_task_id_bytes, "task id", "tasks.max_task_id_bytes")
        if index is None:
            index = len(self)
            self.ids[index] = id_row
            self.count += 1
        self.labels[index, : len(merged)] = rows
        self.num_labels[index] = len(merged)
        self._decoded = []
        return index

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"ids": self.ids, "labels": self.labels, "num_labels": self.num_labels, "count": self.count}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, own in self.state_tensors().items():
            if name not in tensors or tensors[name].shape != own.shape:
                raise ValueError(f"task table tensor {name} is missing or has the wrong shape")
            own.copy_(tensors[name])
        self._decoded = []


def _encode(text: str, width: int, what: str, key: str) -> torch.Tensor:
    data = text.encode("utf-8")
    if len(data) > width or "\x00" in text or not data:
        raise TaskError(f"{what} {text!r} is empty, holds a NUL or is longer than {key}={width} bytes")
    row = torch.zeros(width, dtype=torch.uint8)
    row[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return row


def _decode(row: torch.Tensor) -> str:
    return bytes(row.tolist()).rstrip(b"\x00").decode("utf-8")
