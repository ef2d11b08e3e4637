"""One table of every task-incremental result under a results folder (long15 orders averaged).

python benchmarks/summarize_tasks.py [benchmarks/results/tasks]   # writes SUMMARY.md there
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


def summarize(root: Path) -> str:
    groups: dict[tuple[str, str], list[tuple[str, dict]]] = defaultdict(list)
    for path in sorted(root.glob("*/results.json")):
        report = json.loads(path.read_text(encoding="utf-8"))
        if report["meta"]["settings"].get("quick"):
            continue
        router = report["meta"]["settings"]["learner"].get("router", "backbone")
        groups[(report["suite"], router)].append((path.parent.name, report))
    lines = [
        "# Task-incremental results (full profiles)",
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
    return "\n".join(lines)


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/tasks")
    text = summarize(root)
    (root / "SUMMARY.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
