"""Task-router accuracy per embedder and prototype kind, on the task suites' full profiles (no adapter
trained).

    python benchmarks/router_accuracy.py --suites clinc150-10 banking77 --out benchmarks/results/router

The router of ``ContinualTransformer`` is independent of the task method: it sees each task's training texts
(``router_samples`` of them, spread over the labels) and routes a test text to a task. This measures exactly
that component, the same way ``learn_task`` feeds it, for every combination of ``--embedders`` (``backbone``:
the model's mean hidden state at ``router_layer``; ``minilm``: the packaged MiniLM sentence embedder) and
``--prototypes`` (``label`` / ``task``). It writes ``results.json`` and ``results.md`` to ``--out``.
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
from continual_transformer.tasks.benchmark import machine_info, profile_settings
from continual_transformer.tasks.router import PrototypeRouter, make_embedder, spread_by_label
from continual_transformer.tasks.suites import load_suite


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suites", nargs="+", default=["clinc150-10", "clinc150-50", "banking77", "long15"])
    parser.add_argument("--embedders", nargs="+", default=["backbone", "minilm"])
    parser.add_argument("--prototypes", nargs="+", default=["label", "task"])
    parser.add_argument("--rules", nargs="+", default=["cosine", "lda"], help="tasks.router_rule values")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/router"))
    args = parser.parse_args()

    backbone = Backbone.load(ModelConfig(name=args.model, device=args.device, dtype=args.dtype))
    rows = []
    for suite in args.suites:
        settings = profile_settings(suite, quick=False, data_dir=args.data_dir)
        cfg = settings.learner
        tasks = load_suite(
            suite,
            settings.data_dir,
            order=settings.order,
            max_train_per_label=settings.max_train_per_label,
            max_test_per_label=settings.max_test_per_label,
            max_labels_per_task=settings.max_labels_per_task,
        )
        width = max(len(t.labels) for t in tasks)
        test_texts = [e.text for t in tasks for e in t.test]
        truth = torch.tensor([k for k, t in enumerate(tasks) for _ in t.test])
        for name in args.embedders:
            start = time.perf_counter()
            embed = make_embedder(backbone, dataclasses.replace(cfg, router=name))
            train = []
            for task in tasks:
                labels = [task.labels.index(e.label) for e in task.train]
                sample = spread_by_label(labels, cfg.router_samples)
                train.append(
                    (embed([task.train[i].text for i in sample]), torch.tensor([labels[i] for i in sample]))
                )
            queries = embed(test_texts)
            embed_s = time.perf_counter() - start
            for kind, rule in ((k, r) for k in args.prototypes for r in args.rules):
                router = PrototypeRouter(
                    len(tasks),
                    embed.dim,
                    width if kind == "label" else None,
                    rule=rule,
                    rule_shrinkage=cfg.router_rule_shrinkage,
                )
                for k, (vectors, labels) in enumerate(train):
                    router.update(k, vectors, labels if kind == "label" else None)
                routed = router.route(queries)
                per_task = [float((routed[truth == k] == k).float().mean()) for k in range(len(tasks))]
                rows.append(
                    {
                        "suite": suite,
                        "embedder": name,
                        "prototypes": kind,
                        "rule": rule,
                        "tasks": len(tasks),
                        "test_examples": len(test_texts),
                        "router_accuracy": float((routed == truth).float().mean()),
                        "worst_task_accuracy": min(per_task),
                        "embed_seconds": embed_s,
                    }
                )
                print(
                    f"{suite:12s} {name:8s} {kind:5s} {rule:6s} router accuracy "
                    f"{rows[-1]['router_accuracy']:.3f}",
                    flush=True,
                )
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": backbone.name,
        "device": str(backbone.device),
        "dtype": str(backbone.dtype).replace("torch.", ""),
        "router_samples": cfg.router_samples,
        "router_rule_shrinkage": cfg.router_rule_shrinkage,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(backbone.device),
        "command": "python benchmarks/router_accuracy.py --suites "
        + " ".join(args.suites)
        + f" --embedders {' '.join(args.embedders)} --prototypes {' '.join(args.prototypes)}"
        + f" --rules {' '.join(args.rules)}",
    }
    write_json(args.out / "results.json", {"meta": meta, "rows": rows})
    lines = [
        "# Task-router accuracy (full profiles, no adapter trained)",
        "",
        f"Model `{meta['model']}` on {meta['device']} ({meta['dtype']}); "
        f"{meta['router_samples']} training texts "
        "per task feed the prototypes; every test text of every task is routed.",
        "",
        "| suite | tasks | embedder | prototypes | rule | router accuracy | worst task |",
        "|---|---:|---|---|---|---:|---:|",
    ]
    lines += [
        f"| {r['suite']} | {r['tasks']} | {r['embedder']} | {r['prototypes']} | {r.get('rule', 'cosine')} "
        f"| {r['router_accuracy']:.3f} | "
        f"{r['worst_task_accuracy']:.3f} |"
        for r in rows
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(json.dumps({"wrote": str(args.out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
