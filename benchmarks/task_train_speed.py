"""Task-training throughput (examples/s) of one adapter at several batch sizes: how far each is from the
host's launch limit.

    python benchmarks/task_train_speed.py --model /root/models --batch-sizes 32 128 512 --out DIR

The rows are a suite's training examples as ``learn_task`` builds them (prompt with the task's label list +
answer), trained with the learner's own loop (``tasks.training.fit``) on a fresh adapter of the profile's
shape. A step of a 135M model on a GPU costs its kernel launches more than its rows, so examples/s grows with
the batch size until the GPU's arithmetic catches up; the figure at the profile's batch size is what the task
benchmark runs at. Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from continual_transformer import Backbone
from continual_transformer.config import ModelConfig
from continual_transformer.evaluation.report import write_json
from continual_transformer.tasks.bench.profiles import profile_settings
from continual_transformer.tasks.bench.runner import suite_tasks
from continual_transformer.tasks.learner import TaskLearner
from continual_transformer.tasks.training import fit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--suite", default="clinc150-10")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 128, 512])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per batch size (after one warm-up)")
    parser.add_argument("--quick", action="store_true", help="the quick profile (CPU)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/task_train_speed"))
    args = parser.parse_args()

    backbone = Backbone.load(ModelConfig(name=args.model, device=args.device, dtype=args.dtype))
    settings = profile_settings(args.suite, quick=args.quick, data_dir=args.data_dir)
    config = dataclasses.replace(settings.learner, router="backbone")
    learner = TaskLearner(backbone, config)
    rows = []
    for task in suite_tasks(args.suite, settings):
        index = learner.table.put(task.name, task.labels)
        rows += learner._rows(learner._encode(task.train, index))
    pool = learner.method.pool
    results = []
    for batch_size in args.batch_sizes:
        need = batch_size * (args.steps + 1)
        chosen = (rows * (need // len(rows) + 1))[:need]
        pool.fresh_scratch(0)

        def loss(batch, chosen_rows):
            return learner.method._gold_loss(batch, chosen_rows)

        fit(
            backbone,
            pool.scratch_parameters(),
            chosen[:batch_size],
            loss,
            epochs=1,
            batch_size=batch_size,
            learning_rate=config.learning_rate,
        )  # warm-up: allocator, kernels
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fit(
            backbone,
            pool.scratch_parameters(),
            chosen[batch_size:],
            loss,
            epochs=1,
            batch_size=batch_size,
            learning_rate=config.learning_rate,
        )
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        tokens = sum(len(r.prompt) + len(r.answer) for r in chosen[batch_size:])
        results.append(
            {
                "batch_size": batch_size,
                "steps": args.steps,
                "seconds_per_step": seconds / args.steps,
                "examples_per_s": args.steps * batch_size / seconds,
                "tokens_per_s": tokens / seconds,
            }
        )
        print(json.dumps(results[-1]), flush=True)
    learner.close()
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": backbone.name,
        "device": f"{backbone.device} ({str(backbone.dtype).removeprefix('torch.')})",
        "suite": args.suite,
        "mean_row_tokens": sum(len(r.prompt) + len(r.answer) for r in rows) / len(rows),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(args.out / "results.json", {"meta": meta, "rows": results})
    lines = [
        "# Task-training throughput (one adapter, the learner's training loop)",
        "",
        f"`{meta['model']}` on {meta['device']}; {args.suite} rows ({meta['mean_row_tokens']:.0f} tokens on "
        "average). Target (issue 19): >= 2,000 examples/s.",
        "",
        "| batch size | s/step | examples/s | tokens/s |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['batch_size']} | {r['seconds_per_step']:.3f} | {r['examples_per_s']:.0f} "
        f"| {r['tokens_per_s']:.0f} |"
        for r in results
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
