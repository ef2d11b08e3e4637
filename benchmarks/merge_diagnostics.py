"""Where ``adapter_distill`` loses accuracy: the change of each task's accuracy across every merge, for the
tasks that share the merged slot and for the others, and what each merge distilled from.

    python benchmarks/merge_diagnostics.py benchmarks/results/tasks/clinc150-50 [more run folders]

Reads a run's ``results.json`` (its ``merge_log``, or for older runs the ``task N distilled into slot S
with tasks [...] (R replayed`` lines of ``logs/adapter_distill.log``). Needs the cells R[t-1, k] and R[t, k]
of every earlier task k, which every run has unless ``eval_every`` > 1.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

MERGE_LINE = re.compile(r"task (\d+) distilled into slot (\d+) with tasks \[([0-9, ]*)\] \((\d+) replayed")


def merges_of(run: Path, summary: dict) -> list[dict]:
    if summary.get("merge_log") is not None:
        return summary["merge_log"]
    log = run / "logs" / "adapter_distill.log"
    if not log.is_file():
        return []
    return [
        {
            "task": int(m[1]),
            "slot": int(m[2]),
            "merged_tasks": [int(x) for x in m[3].split(",") if x.strip()],
            "replayed_rows": int(m[4]),
        }
        for m in MERGE_LINE.finditer(log.read_text(encoding="utf-8"))
    ]


def diagnose(run: Path) -> str:
    report = json.loads((run / "results.json").read_text(encoding="utf-8"))
    summary = report["methods"]["adapter_distill"]
    matrix = np.array([[np.nan if v is None else v for v in row] for row in summary["accuracy_matrix"]])
    train = report["meta"]["train_examples"]
    shared, others, per_task, ratio, load = [], [], [], [], {}
    for merge in merges_of(run, summary):
        t, old = merge["task"], merge["merged_tasks"]
        shared += [matrix[t, k] - matrix[t - 1, k] for k in old if k < t]
        others += [matrix[t, k] - matrix[t - 1, k] for k in range(t) if k not in old]
        per_task.append(merge["replayed_rows"] / max(len(old), 1))
        ratio.append(train[t] / max(merge["replayed_rows"], 1))
        load[merge["slot"]] = len(old) + 1
    if not per_task:
        return f"{run.name}: no merges"
    return (
        f"{run.name}: {len(per_task)} merges; accuracy change per merge of the tasks sharing the slot "
        f"{np.nanmean(shared):+.3f} (n={len(shared)}), of the others {np.nanmean(others):+.3f}; "
        f"buffer rows per old task {np.mean(per_task):.1f}; "
        f"new task's rows / replayed rows {np.mean(ratio):.1f}; "
        f"tasks per slot at the end {dict(sorted(load.items()))}; BWT {summary['bwt']:+.3f}"
    )


def main() -> int:
    for folder in sys.argv[1:]:
        print(diagnose(Path(folder)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
