"""Merge knowledge-benchmark rows measured in separate runs of one profile into one results directory.

    python benchmarks/merge_knowledge.py benchmarks/results/knowledge/h100-novel_facts-50-wikitext run1 run2 ...

Each ``runN`` is a results directory (or ``results.json``) written by ``ctt bench knowledge --no-baselines`` on
a copy of the target's results; its strategies are added to the target (a strategy measured again replaces the
earlier row). Runs of another model or profile are refused, and the target is only rewritten once all are read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from continual_transformer.evaluation.report import write_knowledge_results


def read(path: Path) -> dict:
    path = path / "results.json" if path.is_dir() else path
    return json.loads(path.read_text(encoding="utf-8"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args()
    target = read(args.target)
    profile = (target["meta"]["model"], target["meta"]["settings"]["bench"])
    before = dict(target["strategies"])  # each run started from these rows: only what it changed is new
    for run in args.runs:
        results = read(run)
        if (results["meta"]["model"], results["meta"]["settings"]["bench"]) != profile:
            print(f"{run}: another model or profile than {args.target}; nothing written", file=sys.stderr)
            return 2
        added = {k: v for k, v in results["strategies"].items() if v != before.get(k)}
        target["strategies"].update(added)
        print(f"{run}: {', '.join(added) or 'no new rows'}")
    write_knowledge_results(target, args.target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
