"""One table of every task-incremental result under a results folder (long15 orders averaged), then the
issue's targets for each zero-growth candidate (``adapter_distill``, ``replay``) against the references of the
same run (``joint`` trained on every example, ``isolation``).

python benchmarks/summarize_tasks.py [benchmarks/results/tasks] [--quick]   # writes SUMMARY.md there
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

FIELDS = ("avg_accuracy", "bwt", "fwt", "forgetting", "routed_avg_accuracy", "router_accuracy")


def _size(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a is not None and b else "-"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


CANDIDATES = ("adapter_distill", "replay")
"""The zero-growth methods read against the targets: a fixed pool of adapters merged by distillation, and one
shared adapter with a fixed replay buffer."""


def targets(runs: list[tuple[str, dict]], method: str) -> list[str]:
    """Per run with ``method``: the distances to the issue's targets."""
    lines = [
        f"## Targets ({method})",
        "",
        "Targets: BWT >= -0.010; avg >= 0.97 × joint (trained on every example); routed >= 0.95 × with-id; "
        "0 bytes per task after the first; training time <= 1.5 × a plain adapter (`isolation`, same run); "
        "unknown tasks F1 >= 0.8 at <= 2 % false alarms.",
        "",
        "| run | tasks | avg | BWT | × joint | × isolation | routed × with-id | bytes first → last "
        "| × plain adapter | unknown F1 (false alarms) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for name, report in runs:
        methods = report["methods"]
        m = methods.get(method)
        if m is None:
            continue
        joint = methods.get("joint", {}).get("avg_accuracy")
        isolation = methods.get("isolation", {}).get("avg_accuracy")
        unknown = m.get("unknown_tasks") or {}
        ood = f"{unknown['f1']:.3f} ({unknown['false_alarm_rate']:.3f})" if "f1" in unknown else "-"
        growth = m["state_bytes_after_last_task"] - m["state_bytes_after_first_task"]
        lines.append(
            f"| `{name}` | {len(report['meta']['tasks'])} | {_num(m['avg_accuracy'])} | {_num(m['bwt'])} "
            f"| {_ratio(m['avg_accuracy'], joint)} | {_ratio(m['avg_accuracy'], isolation)} "
            f"| {_ratio(m['routed_avg_accuracy'], m['avg_accuracy'])} "
            f"| {_size(m['state_bytes_after_first_task'])}B → {_size(m['state_bytes_after_last_task'])}B"
            f"{' (+' + str(growth) + ')' if growth else ''} "
            f"| {_num(m.get('train_time_vs_plain_adapter'), 2)} | {ood} |"
        )
    for name, report in runs:
        m = report["methods"].get(method)
        if m is None or len(report["meta"]["tasks"]) < 100:
            continue
        rows = m["accuracy_matrix"]
        curve = [
            (t + 1, sum(row[: t + 1]) / (t + 1))
            for t, row in enumerate(rows)
            if all(v is not None for v in row[: t + 1])
        ]
        at_10 = next((a for n, a in curve if n >= 10), None)
        lines += [
            "",
            f"`{name}` ({len(rows)} tasks): mean accuracy on the tasks seen after "
            + ", ".join(f"{n}: {a:.3f}" for n, a in curve)
            + f". Last vs after 10 tasks: {m['avg_accuracy'] - at_10:+.3f} (target >= -0.030)"
            if at_10 is not None
            else "",
        ]
    return lines


def summarize(root: Path, quick: bool = False) -> str:
    groups: dict[tuple[str, str], list[tuple[str, dict]]] = defaultdict(list)
    every: list[tuple[str, dict]] = []
    for path in sorted(root.glob("*/results.json")):
        report = json.loads(path.read_text(encoding="utf-8"))
        if "settings" not in report.get("meta", {}) or "suite" not in report:
            continue  # not a suite's run (e.g. the training-speed figures beside them)
        if bool(report["meta"]["settings"].get("quick")) != quick:
            continue
        every.append((path.parent.name, report))
        router = report["meta"]["settings"]["learner"].get("router", "backbone")
        groups[(report["suite"], router)].append((path.parent.name, report))
    lines = [
        f"# Task-incremental results ({'quick' if quick else 'full'} profiles)",
        "",
        "Mean over the runs of a suite (long15: its task orders; ± is the spread, max - min, across orders). "
        "avg = mean accuracy on all tasks after the last one, with task id; routed = without task id. "
        "Parameters: after the first → after the last task.",
        "",
    ]
    for (suite, router), runs in sorted(groups.items()):
        folders = ", ".join(f"`{name}`" for name, _ in runs)
        device = runs[0][1]["meta"]["device"]
        lines += [
            f"## {suite} (router: {router})",
            "",
            f"{len(runs)} run(s): {folders}; {len(runs[0][1]['meta']['tasks'])} tasks; {device}",
            "",
            "| method | avg acc | BWT | FWT | forgetting | routed acc | router acc | params | s/task |",
            "|---|---:|---:|---:|---:|---:|---:|---|---:|",
        ]
        methods = list(dict.fromkeys(m for _, r in runs for m in r["methods"]))
        for method in methods:
            found = [r["methods"][method] for _, r in runs if method in r["methods"]]
            cells = []
            for field in FIELDS:
                values = [m[field] for m in found if m.get(field) is not None]
                if not values:
                    cells.append("-")
                    continue
                spread = f" ± {max(values) - min(values):.3f}" if len(values) > 1 else ""
                cells.append(f"{statistics.fmean(values):.3f}{spread}")
            params = (
                f"{_size(found[0]['params_after_first_task'])} → {_size(found[0]['params_after_last_task'])}"
            )
            seconds = statistics.fmean(m["train_s_per_task"] for m in found)
            missing = f" ({len(found)}/{len(runs)} runs)" if len(found) < len(runs) else ""
            lines.append(f"| {method}{missing} | " + " | ".join(cells) + f" | {params} | {seconds:.1f} |")
        lines.append("")
    for method in CANDIDATES:
        lines += ["", *targets(every, method)]
    return "\n".join(lines) + "\n"


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--quick"]
    root = Path(args[0] if args else "benchmarks/results/tasks")
    text = summarize(root, quick="--quick" in sys.argv[1:])
    (root / "SUMMARY.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
