"""Task-incremental benchmark: every method on one suite, the accuracy matrix and what each method costs.

For each method a fresh :class:`TaskLearner` learns the suite's tasks in order; after task ``t`` it is tested
on task ``k`` (with the task id) to fill ``R[t, k]``. Metrics come from
:mod:`continual_transformer.evaluation.metrics`: average accuracy, backward transfer, forward transfer
(against the untrained base model's zero-shot accuracy ``b[k]``) and forgetting. After the last task every
test set is also classified without the task id (the router picks the task): routed accuracy and router
accuracy. Parameters, bytes of state and seconds are recorded after every task.

Outputs under ``out_dir``: ``results.json`` (schema in :func:`run_task_benchmark`), ``results.md`` and three
plots (:mod:`.report`). Methods run one after another in this process, or side by side in worker processes
(:mod:`.workers`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from continual_transformer.backbone import Backbone, resolve_device
from continual_transformer.config import ModelConfig, to_dict
from continual_transformer.errors import ConfigError
from continual_transformer.evaluation.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
)
from continual_transformer.evaluation.report import write_json
from continual_transformer.evaluation.system import meta
from continual_transformer.tasks.bench.profiles import (
    DEFAULT_DATA_DIR,
    command_line_changes,
    resolve_settings,
)
from continual_transformer.tasks.bench.report import write_report_files
from continual_transformer.tasks.config import TaskBenchmarkSettings, TaskConfig
from continual_transformer.tasks.learner import TaskLearner
from continual_transformer.tasks.methods import method_names
from continual_transformer.tasks.suites import TaskSpec, load_suite
from continual_transformer.tasks.training import seeded

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ("adapter_distill", "sequential", "joint", "lora_per_task", "ewc", "lwf", "replay")
PLAIN_ADAPTERS = ("isolation", "sequential")
"""Methods whose training time is the 'plain adapter' reference (one adapter trained per task), first
found."""

Progress = Callable[[str, dict[str, Any]], None]
"""``progress(method, summary)``, called as each method finishes."""


def run_task_benchmark(
    suite: str,
    methods: Sequence[str] | None,
    backbone: Backbone,
    settings: TaskBenchmarkSettings | Mapping[str, Any] | None = None,
    out_dir: str | Path = "benchmarks/results/tasks",
    quick: bool = False,
    *,
    data_dir: str | None = None,
    workers: int = 1,
    add: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run ``methods`` (default: all) on ``suite``; write ``results.json``, ``results.md`` and plots to
    ``out_dir``.

    ``settings`` is a :class:`TaskBenchmarkSettings`, or a mapping of overrides on the profile that ``quick``
    picks. ``progress(method, summary)`` is called after each method. ``workers > 1`` runs that many methods
    at once, each in its own process that loads the model again by name (``backbone.name`` must be loadable):
    a model this small leaves a GPU mostly idle, bound by kernel launches, so methods in parallel finish
    several times sooner (their seconds per task are then measured side by side, under contention).
    Returns the ``results.json`` content::

        {"meta": {model, device, settings, version, date, machine, ...}, "suite": NAME,
         "methods": {NAME: {"avg_accuracy", "bwt", "fwt", "forgetting", "routed_avg_accuracy",
                            "params_after_first_task", "params_after_last_task",
                            "state_bytes_after_first_task", "state_bytes_after_last_task",
                            "train_s_per_task", "accuracy_matrix": [[...]], ...}}}

    Cells of the accuracy matrix no metric reads (``k > t + 1``) are ``null`` unless ``settings.full_matrix``.
    ``add=True`` keeps the methods of an earlier ``results.json`` in ``out_dir`` (same suite, model and
    settings, else refused before any work) and adds or replaces this run's: a suite can be measured in
    several sittings.
    """
    methods = list(methods or DEFAULT_METHODS)
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {method_names()}")
    settings = resolve_settings(suite, quick, settings, data_dir)
    tasks = suite_tasks(suite, settings)
    if len(tasks) > settings.learner.max_tasks:
        raise ValueError(
            f"suite {suite} has {len(tasks)} tasks; raise learner.max_tasks={settings.learner.max_tasks}"
        )
    out_dir = Path(out_dir)
    earlier = (
        earlier_results(out_dir / "results.json", suite, backbone.name, to_dict(settings)) if add else {}
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    logger.info(
        "suite %s: %d tasks, %d train / %d test examples; methods %s",
        suite,
        len(tasks),
        sum(len(t.train) for t in tasks),
        sum(len(t.test) for t in tasks),
        methods,
    )

    start = time.perf_counter()
    baseline = zero_shot_accuracy(backbone, tasks, settings.learner)
    done: dict[str, Any] = {
        m: nan_matrix(v) for m, v in earlier.get("methods", {}).items() if m not in methods
    }

    def write_report() -> dict[str, Any]:
        """Results and plots of the methods finished so far (an interrupted run keeps them)."""
        results = {m: v for m, v in done.items() if m not in methods} | {
            m: done[m] for m in methods if m in done
        }
        plain = next(
            (results[m]["train_s_per_task"] for m in PLAIN_ADAPTERS if m in results and results[m]), None
        )
        for summary in results.values():
            summary["train_time_vs_plain_adapter"] = summary["train_s_per_task"] / plain if plain else None
        run_settings = {**to_dict(settings), "quick": quick}
        report = {
            "meta": {
                **meta(backbone.name, backbone.device, run_settings),
                "device": f"{backbone.device} ({str(backbone.dtype).removeprefix('torch.')})",
                "tasks": [t.name for t in tasks],
                "train_examples": [len(t.train) for t in tasks],
                "test_examples": [len(t.test) for t in tasks],
                "zero_shot_accuracy": baseline,
                "wall_s": round(time.perf_counter() - start + earlier.get("meta", {}).get("wall_s", 0.0), 2),
                "workers": workers,
                "unfinished": [m for m in methods if m not in done],
            },
            "suite": suite,
            "methods": results,
        }
        write_report_files(report, out_dir)
        return report

    def finished(method: str, summary: dict[str, Any]) -> None:
        done[method] = nan_matrix(summary)
        write_report()
        if progress is not None:
            progress(method, summary)

    if workers > 1:
        from continual_transformer.tasks.bench.workers import run_in_workers

        if backbone.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the scoring peak back to the workers sharing this GPU
        run_in_workers(backbone, suite, methods, settings, baseline, workers, out_dir / "logs", finished)
    else:
        for method in methods:
            partial = out_dir / f"partial-{method}.json"
            summary = run_method(
                backbone,
                tasks,
                method,
                settings,
                baseline,
                suite=suite,
                checkpoint=lambda progress, path=partial: write_json(path, progress),
            )
            partial.unlink(missing_ok=True)
            finished(method, summary)
    report = write_report()
    logger.info("wrote %s", out_dir)
    return report


def suite_tasks(suite: str, settings: TaskBenchmarkSettings) -> list[TaskSpec]:
    """The part of ``suite`` that ``settings`` selects (order, tasks, labels and examples per label)."""
    return load_suite(
        suite,
        settings.data_dir,
        order=settings.order,
        num_tasks=settings.num_tasks,
        max_train_per_label=settings.max_train_per_label,
        max_test_per_label=settings.max_test_per_label,
        max_labels_per_task=settings.max_labels_per_task,
    )


def earlier_results(path: Path, suite: str, model: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The results in ``path`` to add methods to (empty when there are none); refused when measured
    otherwise."""
    if not path.is_file():
        return {}
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        same = (
            earlier["suite"] == suite
            and earlier["meta"]["model"] == model
            and {k: v for k, v in earlier["meta"]["settings"].items() if k != "quick"} == settings
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{path} is not a task benchmark result ({exc}); use another output directory"
        ) from exc
    if not same:
        raise ConfigError(
            f"{path} was measured on another suite, model or settings; methods can only be added to "
            "a run of the same profile: use another output directory"
        )
    return earlier


def merge_runs(sources: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """One result from runs of the same suite, model and settings that each measured some of the methods
    (side by side in separate processes, each into its own folder): ``results.json``, ``results.md`` and plots
    in ``out_dir``, as one run with every method would write them. A folder without ``results.json`` (a run
    stopped before its first method finished) is passed over; a run measured otherwise is refused. A method
    found in several runs is taken from the last. ``train_time_vs_plain_adapter`` is recomputed against the
    merged ``isolation`` (or ``sequential``) run, measured side by side under the same contention."""
    runs = [(Path(s), Path(s) / "results.json") for s in sources]
    reports = [
        (folder, json.loads(path.read_text(encoding="utf-8"))) for folder, path in runs if path.is_file()
    ]
    if not reports:
        raise ValueError(f"no results.json in {[str(s) for s in sources]}")
    first = reports[0][1]
    key = (first["suite"], first["meta"]["model"])
    methods: dict[str, Any] = {}
    unfinished: set[str] = set()
    # joint_at_end is compared among the runs that measured joint (all against the first of them); every
    # other setting against the first run
    with_joint = next((report for _, report in reports if "joint" in report["methods"]), first)
    for folder, report in reports:
        if (
            (report["suite"], report["meta"]["model"]) != key
            or not _same_settings(first, report)
            or not _same_settings(with_joint, report)
        ):
            raise ConfigError(
                f"{folder} was measured on another suite, model or settings than {reports[0][0]}"
            )
        methods.update(report["methods"])
        unfinished.update(report["meta"].get("unfinished", []))
    plain = next(
        (methods[m]["train_s_per_task"] for m in PLAIN_ADAPTERS if m in methods and methods[m]), None
    )
    for summary in methods.values():
        summary["train_time_vs_plain_adapter"] = summary["train_s_per_task"] / plain if plain else None
    settings = {**first["meta"]["settings"]}
    if "joint_at_end" in with_joint["meta"]["settings"]:
        settings["joint_at_end"] = with_joint["meta"]["settings"]["joint_at_end"]  # how joint was measured
    merged = {
        "meta": {
            **first["meta"],
            "settings": settings,
            "wall_s": max(r["meta"].get("wall_s", 0.0) for _, r in reports),
            "workers": len(reports),
            "unfinished": sorted(unfinished - set(methods)),
            "merged_from": [folder.name for folder, _ in reports],
        },
        "suite": first["suite"],
        "methods": methods,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report_files(merged, out_dir)
    return merged


def _same_settings(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two task benchmark results were measured with the same settings: ``quick`` aside, and
    ``joint_at_end`` aside unless both measured ``joint`` (it changes how ``joint`` trains, nothing else)."""
    ignored = {"quick"}
    if not ("joint" in a.get("methods", {}) and "joint" in b.get("methods", {})):
        ignored.add("joint_at_end")

    def kept(report: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in report["meta"]["settings"].items() if k not in ignored}

    return kept(a) == kept(b)


def zero_shot_accuracy(backbone: Backbone, tasks: Sequence[TaskSpec], config: TaskConfig) -> list[float]:
    """Accuracy of the untrained base model on each task (the FWT reference ``b[k]``)."""
    learner = TaskLearner(backbone, dataclasses.replace(config, method="adapter_distill"))
    try:
        return learner.evaluate_many([(t.name, t.test, t.labels) for t in tasks])
    finally:
        learner.close()


def run_method(
    backbone: Backbone,
    tasks: Sequence[TaskSpec],
    method: str,
    settings: TaskBenchmarkSettings,
    baseline: Sequence[float],
    *,
    suite: str | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """One method through the whole sequence; returns its summary (one entry of
    ``results.json["methods"]``). ``suite`` names the suite the tasks come from (needed for
    ``settings.unknown_tasks``). ``checkpoint(progress)`` is called after every evaluation of all tasks seen
    (each ``eval_every``-th task) with what a stopped run would otherwise lose: the tasks done, the accuracy
    matrix so far (``null`` where not evaluated), parameters, bytes of state and seconds per task."""
    n = len(tasks)
    learner = TaskLearner(backbone, dataclasses.replace(settings.learner, method=method))
    matrix = np.full((n, n), np.nan)
    params, state_bytes, seconds, adapter_s, distill_s, eval_s = [], [], [], [], [], []
    merges = 0
    merge_log: list[dict[str, Any]] = []
    at_end = method == "joint" and settings.joint_at_end
    try:
        for t, task in enumerate(tqdm(tasks, desc=method, disable=None)):
            epochs = 0 if at_end and t < n - 1 else None
            report = learner.learn_task(task.name, task.train, epochs, labels=task.labels)
            params.append(report.parameters)
            state_bytes.append(report.state_bytes)
            seconds.append(report.seconds)
            adapter_s.append(report.train_seconds)
            distill_s.append(report.distill_seconds)
            merges += int(report.merged)
            if report.merged:
                merge_log.append(
                    {
                        "task": t,
                        "slot": report.slot,
                        "merged_tasks": list(report.extra.get("merged_tasks", [])),
                        "replayed_rows": report.extra.get("replayed_rows"),
                        "distill_rows": report.extra.get("distill_rows"),
                        "distill_s": report.distill_seconds,
                    }
                )
            eval_start = time.perf_counter()
            checkpoint_row = (t + 1) % settings.eval_every == 0 or t == n - 1
            cells = [
                k
                for k in range(n)
                if settings.full_matrix or (k <= t + 1 if checkpoint_row else k in (t, t + 1))
            ]
            if at_end and t < n - 1:
                cells = []  # not trained yet: no metric of a joint trained at the end reads these rows
            if cells:
                accuracies = learner.evaluate_many(
                    [(tasks[k].name, tasks[k].test, tasks[k].labels) for k in cells]
                )
                matrix[t, cells] = accuracies
            eval_s.append(time.perf_counter() - eval_start)
            if checkpoint is not None and checkpoint_row and t < n - 1 and not at_end:
                checkpoint(
                    {
                        "method": method,
                        "tasks_done": t + 1,
                        "avg_accuracy_so_far": float(np.mean(matrix[t, : t + 1])),
                        "accuracy_matrix": [
                            [None if math.isnan(v) else v for v in row] for row in matrix[: t + 1].tolist()
                        ],
                        "params_over_tasks": params,
                        "state_bytes_over_tasks": state_bytes,
                        "train_s_per_task": float(np.mean(seconds)),
                        "eval_s_per_task": float(np.mean(eval_s)),
                    }
                )
            logger.info("%s after %s: %s", method, task.name, np.round(matrix[t, : t + 1], 3).tolist())
        routed = learner.evaluate_routed_many([(task.name, task.test) for task in tasks])
        unknown = (
            unknown_task_detection(learner, suite, tasks, settings)
            if settings.unknown_tasks and suite is not None
            else None
        )
    finally:
        learner.close()
    sequence_metrics = not at_end
    return {
        "avg_accuracy": average_accuracy(matrix),
        "bwt": backward_transfer(matrix) if sequence_metrics else None,
        "fwt": forward_transfer(matrix, baseline) if sequence_metrics else None,
        "forgetting": (
            (forgetting(matrix) if settings.eval_every == 1 else sparse_forgetting(matrix))
            if sequence_metrics
            else None
        ),
        "trained_at_end": at_end,
        "unknown_tasks": unknown,
        "routed_avg_accuracy": float(np.mean([r["accuracy"] for r in routed])),
        "router_accuracy": float(np.mean([r["router_accuracy"] for r in routed])),
        "routed_accuracy_per_task": [r["accuracy"] for r in routed],
        "router_accuracy_per_task": [r["router_accuracy"] for r in routed],
        "params_after_first_task": params[0],
        "params_after_last_task": params[-1],
        "state_bytes_after_first_task": state_bytes[0],
        "state_bytes_after_last_task": state_bytes[-1],
        "params_over_tasks": params,
        "state_bytes_over_tasks": state_bytes,
        "train_s_per_task": float(np.mean(seconds)),
        "adapter_train_s_per_task": float(np.mean(adapter_s)),
        "distill_s_per_task": float(np.mean(distill_s)),
        "eval_s_per_task": float(np.mean(eval_s)),
        "merges": merges,
        "merge_log": merge_log,
        "grows_with_tasks": learner.method.grows_with_tasks,
        "accuracy_matrix": matrix.tolist(),
    }


def sparse_forgetting(matrix: np.ndarray) -> float:
    """``metrics.forgetting`` over the cells evaluated (rows skipped by ``eval_every`` are NaN)."""
    T = matrix.shape[0]
    if T < 2:
        return 0.0
    return float(np.mean([np.nanmax(matrix[k : T - 1, k]) - matrix[T - 1, k] for k in range(T - 1)]))


def unknown_task_detection(
    learner: TaskLearner, suite: str, tasks: Sequence[TaskSpec], settings: TaskBenchmarkSettings
) -> dict[str, Any]:
    """Calibrate the unknown-task threshold on held-out in-task inputs, then flag CLINC150's out-of-scope
    test inputs among the suite's test inputs: precision, recall, F1 of the flag and the false-alarm rate."""
    from continual_transformer.tasks.data import TaskDataError, read_labeled_file

    try:
        oos_file = Path(settings.data_dir) / "clinc150" / "data_full.json"
        oos = [e.text for e in read_labeled_file(oos_file, split="oos_test")]
    except TaskDataError as exc:
        return {"skipped": f"no out-of-scope split ({exc})"}
    held_out = calibration_texts(suite, settings)
    if not held_out:
        return {"skipped": "no held-out training examples to calibrate on"}
    threshold = learner.calibrate_unknown(held_out, false_alarm_rate=settings.unknown_false_alarm_rate)
    in_scope = [e.text for t in tasks for e in t.test]
    known = learner.router.unknown_scores(learner.embedder(in_scope))
    unknown = learner.router.unknown_scores(learner.embedder(oos))
    flagged_oos = int((unknown < threshold).sum())  # as route_indices(..., allow_unknown=True) flags them
    flagged_in = int((known < threshold).sum())
    precision = flagged_oos / max(flagged_oos + flagged_in, 1)
    recall = flagged_oos / len(oos)
    return {
        "score": learner.config.router_unknown_score,
        "confidence": learner.config.router_unknown_confidence,
        "auroc": auroc(known, unknown),
        "threshold": threshold,
        "target_false_alarm_rate": settings.unknown_false_alarm_rate,
        "calibration_texts": len(held_out),
        "out_of_scope_texts": len(oos),
        "in_scope_texts": len(in_scope),
        "false_alarm_rate": flagged_in / max(len(in_scope), 1),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / max(precision + recall, 1e-12),
    }


def auroc(known: torch.Tensor, unknown: torch.Tensor) -> float:
    """Area under the ROC curve of telling ``unknown`` scores (B,) from ``known`` ones (A,), higher meaning
    known: P(a known text scores above an unknown one), ties counted half (the Mann-Whitney U statistic)."""
    both = torch.cat([known, unknown]).double()
    ranks = torch.empty_like(both)
    ranks[both.argsort()] = torch.arange(1, both.numel() + 1, dtype=torch.float64)
    values, inverse = both.unique(return_inverse=True)
    mean_rank = torch.zeros_like(values).index_add_(0, inverse, ranks)
    mean_rank /= torch.bincount(inverse, minlength=values.numel())  # tied scores share their mean rank
    ranks = mean_rank[inverse]
    n, m = known.numel(), unknown.numel()
    return float((ranks[:n].sum() - n * (n + 1) / 2) / (n * m))


def calibration_texts(suite: str, settings: TaskBenchmarkSettings, per_label: int = 5) -> list[str]:
    """Training examples of the suite's tasks that the run did not train on (past ``max_train_per_label``),
    at most ``per_label`` per label."""
    full = load_suite(
        suite,
        settings.data_dir,
        order=settings.order,
        num_tasks=settings.num_tasks,
        max_labels_per_task=settings.max_labels_per_task,
    )
    skip = settings.max_train_per_label or 0
    texts = []
    for task in full:
        seen: dict[str, int] = {}
        for e in task.train:
            seen[e.label] = seen.get(e.label, 0) + 1
            if skip < seen[e.label] <= skip + per_label:
                texts.append(e.text)
    return texts


def nan_matrix(summary: dict[str, Any]) -> dict[str, Any]:
    """JSON null cells back to NaN, as a method run in this process leaves them."""
    summary["accuracy_matrix"] = [
        [math.nan if v is None else v for v in row] for row in summary["accuracy_matrix"]
    ]
    return summary


def bench_tasks(
    *,
    suite: str,
    methods: str | Sequence[str] | None = None,
    quick: bool = False,
    out: str | Path | None = None,
    data_dir: str = DEFAULT_DATA_DIR,
    model: str | Backbone = "smollm2-135m-instruct",
    device: str = "auto",
    dtype: str = "auto",
    order: int | None = None,
    num_tasks: int | None = None,
    overrides: Sequence[str] = (),
    seed: int = 0,
    workers: int = 1,
    add: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Load the model, resolve settings (profile < ``order``/``num_tasks`` < ``overrides``), run, write
    results.

    The entry point of ``ctt bench tasks`` and ``python -m continual_transformer.tasks bench``. ``methods``
    may be a comma-separated string. ``overrides`` are ``key=value`` strings (``num_tasks=5``,
    ``learner.pool_size=4``). ``out`` defaults to ``benchmarks/results/tasks/<suite>[-quick]``. Every random
    draw is seeded from ``learner.seed`` (a non-zero ``seed`` overrides it); torch's global generator, which
    model loading and peft's initialisation draw from, is seeded with ``seed`` for the run and restored after.
    """
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    changes = command_line_changes(order=order, num_tasks=num_tasks, overrides=overrides, seed=seed)
    settings = resolve_settings(suite, quick, changes, data_dir)
    out = (
        Path(out)
        if out is not None
        else Path("benchmarks/results/tasks") / f"{suite}{'-quick' if quick else ''}"
    )
    with seeded(seed, model.device if isinstance(model, Backbone) else resolve_device(device)):
        backbone = (
            model
            if isinstance(model, Backbone)
            else Backbone.load(ModelConfig(name=model, device=device, dtype=dtype))
        )
        return run_task_benchmark(
            suite, methods, backbone, settings, out, quick, workers=workers, add=add, progress=progress
        )
