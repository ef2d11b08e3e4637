"""Merge knowledge-benchmark rows measured in separate runs of one profile into one results directory.

    python benchmarks/merge_knowledge.py benchmarks/results/knowledge/h100-novel_facts-50-wikitext run1 ...

Each ``runN`` is a results directory (or ``results.json``) written by ``ctt bench knowledge --no-baselines``
on a copy of the target's results; its strategies are added to the target (a strategy measured again replaces
the earlier row). Runs of another model or profile are refused, and the target is only rewritten once all are
read. The merged ``results.md`` has the "× oracle" column (acquisition over the ``oracle`` row's); to add the
oracle to results measured before it existed, merge a run of ``ctt bench knowledge --no-baselines --strategies
oracle``. ``--only oracle`` takes just the oracle row of another run of the same documents (it learns nothing,
so how that run learned, e.g. ``--learn-together``, does not matter). The merged rows are printed with their
acquisition and × oracle.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from continual_transformer.errors import ContinualTransformerError
from continual_transformer.evaluation.report import (
    LEARNING_SETTINGS,
    fmt,
    fmt_oracle_ratio,
    read_knowledge_results,
    write_knowledge_results,
)

LEARNS_NOTHING = frozenset({"oracle", "none"})


def results_file(path: Path) -> Path:
    return path / "results.json" if path.is_dir() else path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument(
        "--only", default="", help="comma-separated rows to take from the runs (default: every new row)"
    )
    args = parser.parse_args()
    only = {s for s in args.only.split(",") if s}
    target = json.loads(results_file(args.target).read_text(encoding="utf-8"))
    model, bench = target["meta"]["model"], target["meta"]["settings"]["bench"]
    before = dict(target["strategies"])  # each run started from these rows: only what it changed is new
    # rows of strategies that learn nothing do not depend on how the others learned
    ignore = LEARNING_SETTINGS if only and only <= LEARNS_NOTHING else ()
    for run in args.runs:
        try:
            results = read_knowledge_results(results_file(run), model, bench, ignore=ignore)
        except ContinualTransformerError as exc:
            print(f"{exc}; nothing written", file=sys.stderr)
            return 2
        added = {
            k: v for k, v in results["strategies"].items() if v != before.get(k) and (not only or k in only)
        }
        target["strategies"].update(added)
        print(f"{run}: {', '.join(added) or 'no new rows'}")
    write_knowledge_results(target, results_file(args.target).parent)
    for name, row in target["strategies"].items():
        acquisition = fmt(row.get("acquisition_contains"))
        print(f"  {name}: acquisition {acquisition}, × oracle {fmt_oracle_ratio(target, name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
