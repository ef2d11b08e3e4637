"""The task-incremental benchmark: suite profiles (:mod:`.profiles`), the run (:mod:`.runner`), methods in
parallel processes (:mod:`.workers`) and the Markdown report and plots (:mod:`.report`)."""

from continual_transformer.tasks.bench.profiles import profile_settings, resolve_settings
from continual_transformer.tasks.bench.runner import (
    DEFAULT_METHODS,
    PLAIN_ADAPTERS,
    bench_tasks,
    merge_runs,
    run_method,
    run_task_benchmark,
    zero_shot_accuracy,
)

__all__ = [
    "DEFAULT_METHODS",
    "PLAIN_ADAPTERS",
    "bench_tasks",
    "merge_runs",
    "profile_settings",
    "resolve_settings",
    "run_method",
    "run_task_benchmark",
    "zero_shot_accuracy",
]
