"""``python -m continual_transformer.tasks bench --suite clinc150-10 [--quick] [--methods a,b] [--out DIR]``;
``python -m continual_transformer.tasks merge --out DIR RUN...`` (runs of one suite that each measured some
methods, side by side, into one result).

A thin command line over :func:`bench_tasks` (the same function ``ctt bench tasks`` calls): parses, calls,
logs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from continual_transformer.tasks.bench import bench_tasks, merge_runs
from continual_transformer.tasks.bench.profiles import DEFAULT_DATA_DIR
from continual_transformer.tasks.suites import SUITES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m continual_transformer.tasks")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run the task-incremental benchmark")
    bench.add_argument("--suite", required=True, choices=SUITES)
    bench.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    bench.add_argument("--quick", action="store_true", help="small CPU profile (minutes)")
    bench.add_argument(
        "--out", default=None, help="results directory (default benchmarks/results/tasks/SUITE[-quick])"
    )
    bench.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    bench.add_argument("--model", default="smollm2-135m-instruct")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--dtype", default="auto")
    bench.add_argument("--order", type=int, default=None, help="task order (long15: 0, 1, 2)")
    bench.add_argument("--num-tasks", type=int, default=None)
    bench.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="override a setting: key=value or learner.key=value (repeatable)",
    )
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--workers", type=int, default=1, help="methods run at once, one process each (GPU)")
    merge = sub.add_parser("merge", help="merge runs of one suite that each measured some methods")
    merge.add_argument("--out", required=True, help="folder of the merged results")
    merge.add_argument("runs", nargs="+", help="result folders (each with results.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "merge":
        merged = merge_runs(args.runs, args.out)
        print(f"merged {sorted(merged['methods'])} into {args.out}")
        return 0
    bench_tasks(
        suite=args.suite,
        methods=args.methods,
        quick=args.quick,
        out=args.out,
        data_dir=args.data_dir,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        order=args.order,
        num_tasks=args.num_tasks,
        overrides=args.overrides,
        seed=args.seed,
        workers=args.workers,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
