"""Where the time of learning goes: one ``ttt`` document and one task (``learn_task``) under torch.profiler.

For each: wall seconds, kernel launches and host-device synchronisations (CUDA runtime calls), the time the
GPU spent in kernels against the wall time (a small share: the host is the bound), the phases the report
names (``phase_seconds``) and the operators that take the most host and device time. Each is run once first
(warm-up: kernels, the background text, compiling with ``--optim compile=true``), then profiled.

    python benchmarks/profile_learning.py --device cuda --out benchmarks/results/profile/h200
    python benchmarks/profile_learning.py --device cpu --quick --out /tmp/profile     # CPU, a minute

Writes ``results.json`` and ``results.md`` to ``--out`` (``--trace`` adds Chrome traces).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from continual_transformer.backbone import Backbone
from continual_transformer.config import load_config
from continual_transformer.evaluation.datasets import load_benchmark
from continual_transformer.evaluation.knowledge import spec_config
from continual_transformer.session import Session
from continual_transformer.strategies import registry

logger = logging.getLogger("profile_learning")

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def profiled(fn: Callable[[], Any], device: torch.device, trace: Path | None) -> tuple[dict[str, Any], Any]:
    """Figures of one profiled call of ``fn`` and its result."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    counts = {e.key: e.count for e in events}
    kernels_us = sum(getattr(e, "self_device_time_total", 0) for e in events if e.device_type.name == "CUDA")

    def top(attr: str) -> list[dict[str, Any]]:
        ranked = sorted(events, key=lambda e: getattr(e, attr, 0), reverse=True)[:20]
        return [{"op": e.key, "count": e.count, "ms": getattr(e, attr, 0) / 1000} for e in ranked]

    if trace is not None:
        prof.export_chrome_trace(str(trace))
    return {
        "wall_seconds": wall,
        "kernel_seconds": kernels_us / 1e6,
        "kernel_share": kernels_us / 1e6 / wall,
        "kernel_launches": sum(counts.get(k, 0) for k in LAUNCHES),
        "syncs": {k: counts[k] for k in counts if k.startswith(SYNCS)},
        "aten_ops": sum(c for k, c in counts.items() if k.startswith("aten::")),
        "top_host": top("self_cpu_time_total"),
        "top_device": top("self_device_time_total") if device.type == "cuda" else [],
    }, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quick", action="store_true", help="few steps and examples (the CPU)")
    parser.add_argument("--spec", default="ttt", help="document strategy spec (ttt-like)")
    parser.add_argument(
        "--optim", default="", help="speed options, e.g. pack_tokens=512:autocast=true:compile=true"
    )
    parser.add_argument("--task-examples", type=int, default=None)
    parser.add_argument("--task-batch", type=int, default=128)
    parser.add_argument("--trace", action="store_true", help="also write Chrome traces")
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile/local"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quick = args.quick
    extra = [f"strategies.{args.spec.split(':')[0]}.optim.epochs=2"] if quick else []
    config = load_config(
        set_items=[f"model.name={args.model}", f"model.device={args.device}", f"model.dtype={args.dtype}"]
        + extra
        + args.set
    )
    backbone = Backbone.load(config.model, config.generation)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"model": backbone.name, "device": str(backbone.device), "optim": args.optim}

    docs = load_benchmark("novel_facts", n_docs=8, seed=0).documents
    docs = sorted(docs, key=lambda d: abs(len(backbone.token_ids(d.text)) - 100))
    spec = f"{args.spec}:{args.optim}" if args.optim else args.spec
    name, section = spec_config(config, spec)
    strategy = registry.get(name)(backbone, section, settings=config)
    try:
        warm = time.perf_counter()
        strategy.learn(docs[1])
        results["document_first_call_seconds"] = time.perf_counter() - warm
        strategy.reset()
        trace = args.out / "trace_document.json" if args.trace else None
        figures, report = profiled(lambda: strategy.learn(docs[0]), backbone.device, trace)
        figures.update(steps=len(report.step_losses), phase_seconds=report.extra.get("phase_seconds"))
        results["document"] = figures
    finally:
        strategy.close()

    n = args.task_examples or (32 if quick else 1024)
    labels = ["weather", "music", "travel", "banking", "cooking", "sports", "health", "shopping"]
    rows = [{"text": f"request {i}: about {labels[i % 8]} for example {i * 7 % 13}", "label": labels[i % 8]}
            for i in range(n)]  # fmt: skip
    tasks = dataclasses.replace(config.tasks, batch_size=args.task_batch, router="backbone")
    session = Session(dataclasses.replace(config, strategy="none", tasks=tasks), backbone=backbone)
    try:
        session.learn_task("warmup", rows[:32], epochs=1)
        trace = args.out / "trace_task.json" if args.trace else None
        figures, report = profiled(lambda: session.learn_task("task", rows, epochs=1), backbone.device, trace)
        figures.update(
            examples=n, train_seconds=report.train_seconds, examples_per_s=n / figures["wall_seconds"]
        )
        results["task"] = figures
    finally:
        session.strategy.close()

    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# Learning under the profiler: `{results['model']}` on {results['device']}", ""]
    for part in ("document", "task"):
        r = results[part]
        lines += [
            f"## {part}",
            "",
            f"wall {r['wall_seconds']:.3f} s, kernels {r['kernel_seconds']:.3f} s "
            f"({r['kernel_share']:.1%} of the wall), {r['kernel_launches']} kernel launches, "
            f"{r['aten_ops']} aten ops, syncs {r['syncs']}",
            "",
            *(
                f"- {k}: {v}"
                for k, v in r.items()
                if k in ("steps", "phase_seconds", "train_seconds", "examples")
            ),
            "",
            "| top host ops | count | ms | | top device ops | count | ms |",
            "|---|---:|---:|---|---|---:|---:|",
        ]
        device_rows = r["top_device"] or [{"op": "", "count": "", "ms": ""}] * len(r["top_host"])
        for h, d in zip(r["top_host"], device_rows):
            ms = f"{d['ms']:.1f}" if d["ms"] != "" else ""
            lines.append(f"| {h['op']} | {h['count']} | {h['ms']:.1f} | | {d['op']} | {d['count']} | {ms} |")
        lines.append("")
    (args.out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
