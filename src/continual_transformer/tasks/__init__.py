"""Task-incremental learning with zero new parameters per task.

A frozen backbone classifies generatively (label names scored as text), so tasks add no heads; a fixed pool of
bottleneck adapters, merged by distillation when full, serves every task (Adapter Distillation, Ermis et al.
2022); a prototype router picks the task when none is given. Baselines (sequential, joint, per-task LoRA, EWC,
LwF, replay) run on the same harness, and :func:`run_task_benchmark` compares them on CLINC150, Banking77 and
the 15-task long sequence.

The public names load on first access, so ``continual_transformer.tasks.config`` (read by every config) stays
free of torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from continual_transformer.tasks.benchmark import bench_tasks, run_task_benchmark
    from continual_transformer.tasks.config import TaskBenchmarkSettings, TaskConfig
    from continual_transformer.tasks.data import (
        UNKNOWN_TASK,
        LabeledExample,
        TaskDataError,
        TaskError,
        read_labeled,
    )
    from continual_transformer.tasks.learner import TaskLearner, TaskReport
    from continual_transformer.tasks.methods import TaskMethod, method_names, register_task_method
    from continual_transformer.tasks.suites import SUITES, TaskSpec, load_suite

_LAZY = {
    "SUITES": "suites",
    "UNKNOWN_TASK": "data",
    "LabeledExample": "data",
    "TaskBenchmarkSettings": "config",
    "TaskConfig": "config",
    "TaskDataError": "data",
    "TaskError": "data",
    "TaskLearner": "learner",
    "TaskMethod": "methods",
    "TaskReport": "learner",
    "TaskSpec": "suites",
    "bench_tasks": "benchmark",
    "load_suite": "suites",
    "method_names": "methods",
    "read_labeled": "data",
    "register_task_method": "methods",
    "run_task_benchmark": "benchmark",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "SUITES",
    "UNKNOWN_TASK",
    "LabeledExample",
    "TaskBenchmarkSettings",
    "TaskConfig",
    "TaskDataError",
    "TaskError",
    "TaskLearner",
    "TaskMethod",
    "TaskReport",
    "TaskSpec",
    "bench_tasks",
    "load_suite",
    "method_names",
    "read_labeled",
    "register_task_method",
    "run_task_benchmark",
]
