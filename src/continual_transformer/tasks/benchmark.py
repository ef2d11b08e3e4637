"""Task-incremental benchmark: every method on one suite, the accuracy matrix and what each method costs.

For each method a fresh :class:`TaskLearner` learns the suite's tasks in order; after task ``t`` it is tested
on task ``k`` (with the task id) to fill ``R[t, k]``. Metrics come from :mod:`continual_transformer.evaluation.metrics`:
average accuracy, backward transfer, forward transfer (against the untrained base model's zero-shot accuracy
``b[k]``) and forgetting. After the last task every test set is also classified without the task id (the router
picks the task): routed accuracy and router accuracy. Parameters, bytes of state and seconds are recorded after
every task.

Outputs under ``out_dir``: ``results.json`` (schema in :func:`run_task_benchmark`), ``results.md`` and three
plots (accuracy matrices, accuracy vs number of tasks, state size vs number of tasks).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from continual_transformer.backbone import Backbone
from continual_transformer.config import from_dict, to_dict
from continual_transformer.errors import ConfigError
from continual_transformer.evaluation.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
)
from continual_transformer.evaluation.report import write_json
from continual_transformer.tasks.config import TaskBenchmarkSettings, TaskConfig
from continual_transformer.tasks.learner import TaskLearner
from continual_transformer.tasks.methods import method_names
from continual_transformer.tasks.suites import SUITES, TaskSpec, load_suite
from continual_transformer.version import __version__

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ("adapter_distill", "sequential", "joint", "lora_per_task", "ewc", "lwf", "replay")
PLAIN_ADAPTER = "sequential"
"""The method whose training time is the 'plain adapter' reference (one adapter trained per task)."""


# ----------------------------------------------------------------------------------------------------------------
# Profiles


def profile_settings(suite: str, *, quick: bool, data_dir: str = "../shared/data") -> TaskBenchmarkSettings:
    """The ``quick`` profile (CPU, minutes: few tasks, few examples per label) or the full one (one GPU)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
    long_texts = suite == "long15"
    if quick:
        learner = TaskConfig(
            max_text_tokens=96 if long_texts else 32,
            eval_batch_size=8,
            batch_size=8,
            epochs=3,
            learning_rate=3e-3,
            pool_size=2,
            buffer_size=32,
            replay_batch_size=4,
            transfer_samples=16,
            distill_epochs=2,
            ewc_fisher_samples=8,
            router_samples=64,
            adapter_dim=8,
        )
        return TaskBenchmarkSettings(
            data_dir=data_dir,
            num_tasks=3,
            max_labels_per_task=5,
            max_train_per_label=6 if not long_texts else 8,
            max_test_per_label=2 if not long_texts else 6,
            learner=learner,
        )
    pool = {"clinc150-10": 4, "clinc150-50": 10, "banking77": 3, "long15": 5}[suite]
    # (train, test) examples per label, and the joint upper bound's per-step sample (None: every example so far,
    # a true multitask bound; the long suites cap it to stay within minutes). Sized so that all seven methods
    # finish in under 10 minutes per suite on one H100 (bf16, 7 workers).
    per_label = {"clinc150-10": (24, 15), "clinc150-50": (24, 5), "banking77": (24, 15), "long15": (32, 16)}[
        suite
    ]
    joint_cap = {"clinc150-10": None, "clinc150-50": 360, "banking77": None, "long15": 600}[suite]
    learner = TaskConfig(
        max_text_tokens=256 if long_texts else 64,
        eval_batch_size=64,
        batch_size=32,
        epochs=3,
        learning_rate=1e-3,
        pool_size=pool,
        buffer_size=500,
        replay_batch_size=16,
        transfer_samples=64,
        distill_epochs=2,
        ewc_fisher_samples=32,
        router_samples=256,
        adapter_dim=16,
        joint_max_examples=joint_cap,
        router="backbone"
        if long_texts
        else "minilm",  # the better router per suite (benchmarks/results/router)
    )
    return TaskBenchmarkSettings(
        data_dir=data_dir, max_train_per_label=per_label[0], max_test_per_label=per_label[1], learner=learner
    )


def resolve_settings(
    suite: str,
    quick: bool,
    settings: TaskBenchmarkSettings | Mapping[str, Any] | None,
    data_dir: str | None = None,
) -> TaskBenchmarkSettings:
    """A settings object as given, or the profile with a mapping of overrides applied (``{"learner": {...}}``)."""
    if isinstance(settings, TaskBenchmarkSettings):
        return settings if data_dir is None else dataclasses.replace(settings, data_dir=data_dir)
    base = to_dict(profile_settings(suite, quick=quick, data_dir=data_dir or "../shared/data"))
    for key, value in (settings or {}).items():
        if key == "learner" and isinstance(value, Mapping):
            base["learner"] = {**base["learner"], **value}
        else:
            base[key] = value
    return from_dict(TaskBenchmarkSettings, base, "bench")


# ----------------------------------------------------------------------------------------------------------------
# Running


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
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``methods`` (default: all) on ``suite`` and write ``results.json``, ``results.md`` and plots to ``out_dir``.

    ``settings`` is a :class:`TaskBenchmarkSettings`, or a mapping of overrides on the profile that ``quick``
    picks. ``progress(method, summary)`` is called after each method. ``workers > 1`` runs that many methods at
    once, each in its own process that loads the model again by name (``backbone.name`` must be loadable): a
    model this small leaves a GPU mostly idle, bound by kernel launches, so methods in parallel finish several
    times sooner (their seconds per task are then measured side by side, under contention).
    Returns the ``results.json`` content::

        {"meta": {model, device, settings, version, date, machine, ...}, "suite": NAME,
         "methods": {NAME: {"avg_accuracy", "bwt", "fwt", "forgetting", "routed_avg_accuracy",
                            "params_after_first_task", "params_after_last_task",
                            "state_bytes_after_first_task", "state_bytes_after_last_task",
                            "train_s_per_task", "accuracy_matrix": [[...]], ...}}}

    Cells of the accuracy matrix no metric reads (``k > t + 1``) are ``null`` unless ``settings.full_matrix``.
    ``add=True`` keeps the methods of an earlier ``results.json`` in ``out_dir`` (same suite, model and settings,
    else refused before any work) and adds or replaces this run's: a suite can be measured in several sittings.
    """
    methods = list(methods or DEFAULT_METHODS)
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {method_names()}")
    settings = resolve_settings(suite, quick, settings, data_dir)
    tasks = load_suite(
        suite,
        settings.data_dir,
        order=settings.order,
        num_tasks=settings.num_tasks,
        max_train_per_label=settings.max_train_per_label,
        max_test_per_label=settings.max_test_per_label,
        max_labels_per_task=settings.max_labels_per_task,
    )
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
        m: _nan_matrix(v) for m, v in earlier.get("methods", {}).items() if m not in methods
    }

    def write_report() -> dict[str, Any]:
        """results.json, results.md and plots of the methods finished so far (an interrupted run keeps them)."""
        results = {m: v for m, v in done.items() if m not in methods} | {
            m: done[m] for m in methods if m in done
        }
        plain = results.get(PLAIN_ADAPTER, {}).get("train_s_per_task")
        for summary in results.values():
            summary["train_time_vs_plain_adapter"] = summary["train_s_per_task"] / plain if plain else None
        report = {
            "meta": {
                "model": backbone.name,
                "device": f"{backbone.device} ({str(backbone.dtype).removeprefix('torch.')})",
                "settings": {**to_dict(settings), "quick": quick},
                "version": __version__,
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": machine_info(backbone.device),
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
        write_json(out_dir / "results.json", report)
        (out_dir / "results.md").write_text(render_markdown(report), encoding="utf-8")
        write_plots(report, out_dir)
        return report

    def finished(method: str, summary: dict[str, Any]) -> None:
        done[method] = _nan_matrix(summary)
        write_report()
        if progress is not None:
            progress(method, summary)

    if workers > 1:
        if backbone.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the scoring peak back to the workers sharing this GPU
        run_in_workers(backbone, suite, methods, settings, baseline, workers, out_dir / "logs", finished)
    else:
        for method in methods:
            finished(method, run_method(backbone, tasks, method, settings, baseline))
    report = write_report()
    logger.info("wrote %s", out_dir)
    return report


def earlier_results(path: Path, suite: str, model: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The results in ``path`` to add methods to (empty when there are none); refused when measured otherwise."""
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
) -> dict[str, Any]:
    """One method through the whole sequence; returns its summary (one entry of ``results.json["methods"]``)."""
    n = len(tasks)
    learner = TaskLearner(backbone, dataclasses.replace(settings.learner, method=method))
    matrix = np.full((n, n), np.nan)
    params, state_bytes, seconds, adapter_s, distill_s, eval_s = [], [], [], [], [], []
    merges = 0
    try:
        for t, task in enumerate(tqdm(tasks, desc=method, disable=None)):
            report = learner.learn_task(task.name, task.train, labels=task.labels)
            params.append(report.parameters)
            state_bytes.append(report.state_bytes)
            seconds.append(report.seconds)
            adapter_s.append(report.train_seconds)
            distill_s.append(report.distill_seconds)
            merges += int(report.merged)
            eval_start = time.perf_counter()
            cells = [k for k in range(n) if settings.full_matrix or k <= t + 1]
            accuracies = learner.evaluate_many(
                [(tasks[k].name, tasks[k].test, tasks[k].labels) for k in cells]
            )
            matrix[t, cells] = accuracies
            eval_s.append(time.perf_counter() - eval_start)
            logger.info("%s after %s: %s", method, task.name, np.round(matrix[t, : t + 1], 3).tolist())
        routed = [learner.evaluate_detailed(task.name, task.test, routed=True) for task in tasks]
    finally:
        learner.close()
    return {
        "avg_accuracy": average_accuracy(matrix),
        "bwt": backward_transfer(matrix),
        "fwt": forward_transfer(matrix, baseline),
        "forgetting": forgetting(matrix),
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
        "grows_with_tasks": learner.method.grows_with_tasks,
        "accuracy_matrix": matrix.tolist(),
    }


# -- methods in parallel processes (specs and results travel as JSON files: nothing is pickled) ----------------


def run_in_workers(
    backbone: Backbone,
    suite: str,
    methods: Sequence[str],
    settings: TaskBenchmarkSettings,
    baseline: Sequence[float],
    workers: int,
    log_dir: Path,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run each method in a ``python -m continual_transformer.tasks worker`` process, ``workers`` at a time."""
    import subprocess
    import sys
    import tempfile

    import continual_transformer

    log_dir.mkdir(parents=True, exist_ok=True)
    model = {
        "name": backbone.name,
        "device": str(backbone.device),
        "dtype": str(backbone.dtype).removeprefix("torch."),
    }
    package_root = str(Path(continual_transformer.__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    }
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # several processes share one GPU
    # Each worker's host side is one thread: N workers x all-cores thread pools thrash the CPUs.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, str(max(1, (os.cpu_count() or 1) // workers)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ctt-tasks-") as tmp:
        pending, running = list(methods), {}
        with tqdm(total=len(methods), desc=f"{suite} ({workers} workers)", disable=None) as bar:
            while pending or running:
                while pending and len(running) < workers:
                    method = pending.pop(0)
                    spec, result = Path(tmp) / f"{method}.spec.json", Path(tmp) / f"{method}.result.json"
                    spec.write_text(
                        json.dumps(
                            {
                                "model": model,
                                "suite": suite,
                                "settings": to_dict(settings),
                                "method": method,
                                "baseline": list(baseline),
                            }
                        ),
                        encoding="utf-8",
                    )
                    log = open(log_dir / f"{method}.log", "w", encoding="utf-8")  # noqa: SIM115 (closed below)
                    process = subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "continual_transformer.tasks",
                            "worker",
                            str(spec),
                            str(result),
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                    running[method] = (process, log, result)
                    logger.info("started %s in process %d", method, process.pid)
                for method, (process, log, result) in list(running.items()):
                    if process.poll() is None:
                        continue
                    log.close()
                    del running[method]
                    if process.returncode != 0 or not result.exists():
                        for other, (proc, other_log, _) in running.items():
                            proc.terminate()
                            other_log.close()
                        tail = (log_dir / f"{method}.log").read_text(encoding="utf-8")[-3000:]
                        raise RuntimeError(
                            f"method {method} failed (exit {process.returncode}); log tail:\n{tail}"
                        )
                    results[method] = json.loads(result.read_text(encoding="utf-8"))
                    bar.update(1)
                    if progress is not None:
                        progress(method, results[method])
                time.sleep(0.5)
    return {method: _nan_matrix(results[method]) for method in methods}


def _nan_matrix(summary: dict[str, Any]) -> dict[str, Any]:
    """JSON null cells back to NaN, as a method run in this process leaves them."""
    summary["accuracy_matrix"] = [
        [math.nan if v is None else v for v in row] for row in summary["accuracy_matrix"]
    ]
    return summary


def run_worker(spec_path: str | Path, result_path: str | Path) -> None:
    """One method of a benchmark, as specified by a JSON file written by :func:`run_in_workers`."""
    from continual_transformer.config import ModelConfig

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    settings = from_dict(TaskBenchmarkSettings, spec["settings"], "bench")
    torch.manual_seed(settings.learner.seed)
    backbone = Backbone.load(ModelConfig(**spec["model"]))
    tasks = load_suite(
        spec["suite"],
        settings.data_dir,
        order=settings.order,
        num_tasks=settings.num_tasks,
        max_train_per_label=settings.max_train_per_label,
        max_test_per_label=settings.max_test_per_label,
        max_labels_per_task=settings.max_labels_per_task,
    )
    summary = run_method(backbone, tasks, spec["method"], settings, spec["baseline"])
    write_json(Path(result_path), summary)


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ----------------------------------------------------------------------------------------------------------------
# Reports


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _size(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def render_markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        f"# Task-incremental benchmark: {report['suite']}",
        "",
        f"Model `{meta['model']}` on {meta['device']}, library {meta['version']}, {meta['date']}; "
        f"{len(meta['tasks'])} tasks, {sum(meta['train_examples'])} training / {sum(meta['test_examples'])} test "
        f"examples{' (quick profile)' if meta['settings'].get('quick') else ''}; {meta['wall_s']:.0f} s in all.",
        *(
            ["", f"Not finished in this run (no row): {', '.join(meta['unfinished'])}."]
            if meta.get("unfinished")
            else []
        ),
        "",
        "Accuracy with task id: avg = mean of the last row of R; BWT, FWT (vs the base model's zero-shot accuracy "
        f"{_fmt(float(np.mean(meta['zero_shot_accuracy'])))}), forgetting from `evaluation.metrics`. Routed: without "
        "task id (the router picks the task). Params and state bytes after the first and the last task.",
        "",
        "| method | avg acc | BWT | FWT | forgetting | routed acc | router acc | params first → last | state bytes first → last | s/task | × plain adapter |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["methods"].items():
        ratio = m.get("train_time_vs_plain_adapter")
        lines.append(
            f"| {name} | {_fmt(m['avg_accuracy'])} | {_fmt(m['bwt'])} | {_fmt(m['fwt'])} | {_fmt(m['forgetting'])} | "
            f"{_fmt(m['routed_avg_accuracy'])} | {_fmt(m['router_accuracy'])} | "
            f"{_size(m['params_after_first_task'])} → {_size(m['params_after_last_task'])} | "
            f"{_size(m['state_bytes_after_first_task'])} → {_size(m['state_bytes_after_last_task'])} | "
            f"{m['train_s_per_task']:.1f} | {_fmt(ratio, 2)} |"
        )
    lines += ["", "## Accuracy matrices R[t, k] (row: after task t; column: task k)", ""]
    names = meta["tasks"]
    for name, m in report["methods"].items():
        lines += [
            f"### {name}",
            "",
            "| after \\ on | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        for t, row in enumerate(m["accuracy_matrix"]):
            lines.append(f"| {names[t]} | " + " | ".join(_fmt(v, 2) for v in row) + " |")
        lines.append("")
    return "\n".join(lines)


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """accuracy_matrix.png, accuracy_vs_tasks.png, state_vs_tasks.png (matplotlib Agg, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = report["methods"]
    names = list(methods)
    paths = []

    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig = Figure(figsize=(3.6 * cols, 3.2 * rows), layout="constrained")
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        matrix = _float_matrix(methods[name]["accuracy_matrix"])
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        ticks = range(0, matrix.shape[0], max(1, matrix.shape[0] // 10))
        ax.set_xticks(list(ticks))
        ax.set_yticks(list(ticks))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("task k", fontsize=8)
        ax.set_ylabel("after task t", fontsize=8)
    fig.colorbar(image, ax=fig.axes, shrink=0.8, label="accuracy")
    paths.append(_save(fig, FigureCanvasAgg, out_dir / "accuracy_matrix.png"))

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for name in names:
        matrix = _float_matrix(methods[name]["accuracy_matrix"])
        seen = [float(np.nanmean(matrix[t, : t + 1])) for t in range(matrix.shape[0])]
        ax.plot(range(1, len(seen) + 1), seen, marker="o", label=name)
    ax.set_xlabel("tasks learned")
    ax.set_xticks(range(1, len(report["meta"]["tasks"]) + 1, max(1, len(report["meta"]["tasks"]) // 10)))
    ax.set_ylabel("mean accuracy on tasks seen")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    paths.append(_save(fig, FigureCanvasAgg, out_dir / "accuracy_vs_tasks.png"))

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for name in names:
        values = methods[name]["state_bytes_over_tasks"]
        ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("bytes of state")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    paths.append(_save(fig, FigureCanvasAgg, out_dir / "state_vs_tasks.png"))
    return paths


def _float_matrix(rows) -> np.ndarray:
    """An accuracy matrix as floats, JSON nulls (cells not evaluated) as NaN."""
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def _save(fig, canvas_cls, path: Path) -> Path:
    canvas_cls(fig)
    fig.savefig(path, dpi=110)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Entry point for command lines (``ctt bench tasks`` and ``python -m continual_transformer.tasks bench``)


def bench_tasks(
    *,
    suite: str,
    methods: str | Sequence[str] | None = None,
    quick: bool = False,
    out: str | Path | None = None,
    data_dir: str = "../shared/data",
    model: str | Backbone = "smollm2-135m-instruct",
    device: str = "auto",
    dtype: str = "auto",
    order: int | None = None,
    num_tasks: int | None = None,
    overrides: Sequence[str] = (),
    seed: int = 0,
    workers: int = 1,
    add: bool = False,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Load the model, resolve settings (profile < ``order``/``num_tasks`` < ``overrides``), run, write results.

    ``methods`` may be a comma-separated string. ``overrides`` are ``key=value`` strings (``num_tasks=5``,
    ``learner.pool_size=4``). ``out`` defaults to ``benchmarks/results/tasks/<suite>[-quick]``.
    """
    from continual_transformer.config import ModelConfig, parse_override

    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    changes: dict[str, Any] = {}
    if order is not None:
        changes["order"] = order
    if num_tasks is not None:
        changes["num_tasks"] = num_tasks
    for item in overrides:
        changes = _merge(changes, parse_override(item))
    if seed:
        changes = _merge(changes, {"learner": {"seed": seed}})
    settings = resolve_settings(suite, quick, changes, data_dir)
    torch.manual_seed(seed)
    backbone = (
        model
        if isinstance(model, Backbone)
        else Backbone.load(ModelConfig(name=model, device=device, dtype=dtype))
    )
    out = (
        Path(out)
        if out is not None
        else Path("benchmarks/results/tasks") / f"{suite}{'-quick' if quick else ''}"
    )
    return run_task_benchmark(
        suite, methods, backbone, settings, out, quick, workers=workers, add=add, progress=progress
    )


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged
