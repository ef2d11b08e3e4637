"""The task benchmark's former single module, kept so that existing imports work; it lives in
:mod:`.bench`."""

from continual_transformer.evaluation.system import machine_info
from continual_transformer.tasks.bench.profiles import profile_settings, resolve_settings
from continual_transformer.tasks.bench.report import render_markdown, write_plots
from continual_transformer.tasks.bench.runner import (
    DEFAULT_METHODS,
    PLAIN_ADAPTERS,
    bench_tasks,
    earlier_results,
    run_method,
    run_task_benchmark,
    zero_shot_accuracy,
)
from continual_transformer.tasks.bench.workers import run_in_workers

__all__ = [
    "DEFAULT_METHODS",
    "PLAIN_ADAPTERS",
    "bench_tasks",
    "earlier_results",
    "machine_info",
    "profile_settings",
    "render_markdown",
    "resolve_settings",
    "run_in_workers",
    "run_method",
    "run_task_benchmark",
    "write_plots",
    "zero_shot_accuracy",
]
