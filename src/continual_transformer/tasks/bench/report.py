"""What a task benchmark run writes besides ``results.json``: ``results.md`` (Markdown tables) and three plots
(accuracy matrices, accuracy vs number of tasks, state size vs number of tasks)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from continual_transformer.evaluation.report import write_json


def write_report_files(report: dict[str, Any], out_dir: Path) -> None:
    """``results.json``, ``results.md`` and the plots of ``report`` in ``out_dir``."""
    write_json(out_dir / "results.json", report)
    (out_dir / "results.md").write_text(render_markdown(report), encoding="utf-8")
    write_plots(report, out_dir)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _size(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


_COLUMNS = (
    "method",
    "avg acc",
    "BWT",
    "FWT",
    "forgetting",
    "routed acc",
    "router acc",
    "params first → last",
    "state bytes first → last",
    "s/task",
    "× plain adapter",
)


def render_markdown(report: dict[str, Any]) -> str:
    """``results.md``: the summary table of every method, then each method's accuracy matrix."""
    meta = report["meta"]
    quick = " (quick profile)" if meta["settings"].get("quick") else ""
    zero_shot = _fmt(float(np.mean(meta["zero_shot_accuracy"])))
    lines = [
        f"# Task-incremental benchmark: {report['suite']}",
        "",
        f"Model `{meta['model']}` on {meta['device']}, library {meta['version']}, {meta['date']}; "
        f"{len(meta['tasks'])} tasks, {sum(meta['train_examples'])} training / "
        f"{sum(meta['test_examples'])} test examples{quick}; {meta['wall_s']:.0f} s in all.",
        *(
            ["", f"Not finished in this run (no row): {', '.join(meta['unfinished'])}."]
            if meta.get("unfinished")
            else []
        ),
        "",
        "Accuracy with task id: avg = mean of the last row of R; BWT, FWT (vs the base model's zero-shot "
        f"accuracy {zero_shot}), forgetting from `evaluation.metrics`. Routed: without task id (the router "
        "picks the task). Params and state bytes after the first and the last task.",
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "|---" * len(_COLUMNS) + "|",
    ]
    for name, m in report["methods"].items():
        ratio = m.get("train_time_vs_plain_adapter")
        cells = [
            name,
            *(_fmt(m[key]) for key in ("avg_accuracy", "bwt", "fwt", "forgetting")),
            _fmt(m["routed_avg_accuracy"]),
            _fmt(m["router_accuracy"]),
            f"{_size(m['params_after_first_task'])} → {_size(m['params_after_last_task'])}",
            f"{_size(m['state_bytes_after_first_task'])} → {_size(m['state_bytes_after_last_task'])}",
            f"{m['train_s_per_task']:.1f}",
            _fmt(ratio, 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _reference_lines(report)
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


def _reference_lines(report: dict[str, Any]) -> list[str]:
    """Each method against the upper bounds (``joint`` uncapped, ``isolation``), and unknown-task
    detection."""
    methods = report["methods"]
    lines = []
    refs = [r for r in ("joint", "isolation") if r in methods]
    if refs:
        lines += ["", "Against the references (avg acc / reference's avg acc; routed / with-id):", ""]
        lines += ["| method | " + " | ".join(f"× {r}" for r in refs) + " | routed × with-id |"]
        lines += ["|---" * (len(refs) + 2) + "|"]
        for name, m in methods.items():
            ratios = [_fmt(m["avg_accuracy"] / methods[r]["avg_accuracy"], 3) for r in refs]
            routed = m["routed_avg_accuracy"] / m["avg_accuracy"] if m["avg_accuracy"] else None
            lines.append(f"| {name} | " + " | ".join(ratios) + f" | {_fmt(routed)} |")
    unknown = {n: m["unknown_tasks"] for n, m in methods.items() if m.get("unknown_tasks")}
    if unknown:
        lines += [
            "",
            "Unknown-task detection (CLINC150 out-of-scope test split against the suite's test inputs; "
            "threshold calibrated on held-out training inputs of the learned tasks):",
            "",
            "| method | score | target false alarms | false alarms | precision | recall | F1 | AUROC |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, u in unknown.items():
            if "skipped" in u:
                lines.append(f"| {name} | {u['skipped']} | | | | | | |")
                continue
            cells = (
                u["target_false_alarm_rate"],
                u["false_alarm_rate"],
                u["precision"],
                u["recall"],
                u["f1"],
                u.get("auroc"),
            )
            score = u.get("score", "cosine")  # results from before the setting: the centred cosine
            lines.append(f"| {name} | {score} | " + " | ".join(_fmt(v) for v in cells) + " |")
    return lines


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """accuracy_matrix.png, accuracy_vs_tasks.png, state_vs_tasks.png (matplotlib Agg, no global backend
    change)."""
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
        # Rows evaluated on every task seen (eval_every, joint_at_end skip the others).
        full = [t for t in range(matrix.shape[0]) if not np.isnan(matrix[t, : t + 1]).any()]
        seen = [float(matrix[t, : t + 1].mean()) for t in full]
        ax.plot([t + 1 for t in full], seen, marker="o" if len(full) < 40 else None, label=name)
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
