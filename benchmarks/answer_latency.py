"""Answer latency of the memory strategies after many learned documents, against plain generation.

Every strategy learns the same ``--docs`` generated novel-fact documents (default 1,000), then answers the
same probes one at a time (``measure_latency`` of the knowledge benchmark: median seconds per answer, greedy,
``--max-new-tokens``). The ratio to ``none`` (the backbone alone, no learning) is what a user pays for the
memory. Accuracy on the probes of the learned documents is recorded beside it, so a fast but useless setting
shows.

    python benchmarks/answer_latency.py --device cuda --docs 1000 --strategies retrieval,knowledge_store
    python benchmarks/answer_latency.py --device cpu --docs 100 --probes 8          # a few minutes on 2 cores

Writes ``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from continual_transformer.backbone import Backbone
from continual_transformer.config import load_config
from continual_transformer.evaluation import system
from continual_transformer.evaluation.datasets import load_benchmark
from continual_transformer.evaluation.knowledge import answer_probes, measure_latency, score, spec_config
from continual_transformer.strategies import registry

logger = logging.getLogger("answer_latency")


def run(args: argparse.Namespace) -> dict:
    items = [
        f"model.name={args.model}",
        f"model.device={args.device}",
        f"model.dtype={args.dtype}",
        *args.set,
    ]
    config = load_config(set_items=items)
    backbone = Backbone.load(config.model, config.generation)
    bench = load_benchmark("novel_facts", n_docs=args.docs, seed=args.seed)
    # Probes spread over the whole stream (first, middle and last documents alike).
    step = max(1, len(bench.probes) // args.probes)
    probes = list(bench.probes[::step][: args.probes])
    results = {
        "meta": system.meta(
            backbone.name,
            backbone.device,
            {
                "docs": args.docs,
                "probes": len(probes),
                "max_new_tokens": args.max_new_tokens,
                "seed": args.seed,
                "batch_size": config.generation.batch_size,
                "dtype": str(backbone.dtype).removeprefix("torch."),
                "overrides": list(args.set),
            },
        ),
        "strategies": {},
    }
    for spec in ["none", *[s for s in args.strategies.split(",") if s and s != "none"]]:
        name, section = spec_config(config, spec)
        strategy = registry.get(name)(backbone, section, settings=config)
        try:
            start = time.perf_counter()
            docs = bench.documents if name != "none" else []
            for doc in tqdm(docs, desc=f"{spec}: learn", leave=False, disable=None):
                strategy.learn(doc)
            learn_s = time.perf_counter() - start
            measure_latency(strategy, probes[:2], args.max_new_tokens)  # warm-up
            latency = measure_latency(strategy, probes, args.max_new_tokens)
            accuracy = score(probes, answer_probes(strategy, probes, args.max_new_tokens).predictions)[
                "contains"
            ]
            stats = strategy.stats()
            results["strategies"][spec] = {
                "documents": len(docs),
                "learn_seconds": learn_s,
                "learn_s_per_doc": learn_s / max(len(docs), 1),
                **latency,
                "accuracy": accuracy,
                "state_bytes": stats.state_bytes,
                "strategy_config": dataclasses.asdict(section),
                "peak_memory_mb": system.peak_memory_mb(backbone.device),
            }
        finally:
            strategy.close()
        base = results["strategies"]["none"]["answer_latency_s"]
        row = results["strategies"][spec]
        row["latency_vs_none"] = row["answer_latency_s"] / base
        logger.info(
            "%s: %.3fs per answer (%.2fx none), accuracy %.3f, learn %.3fs/doc",
            spec,
            row["answer_latency_s"],
            row["latency_vs_none"],
            row["accuracy"],
            row["learn_s_per_doc"],
        )
        write(results, args.out)  # an interrupted run keeps the finished strategies
    return results


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    meta = results["meta"]
    s = meta["settings"]
    lines = [
        "# Answer latency after many learned documents",
        "",
        f"Model `{meta['model']}` on {meta['device']} ({s['dtype']}), "
        f"{s['docs']} novel-fact documents learned, "
        f"{s['probes']} probes answered one at a time, {s['max_new_tokens']} new tokens, "
        f"library {meta['version']}, "
        f"{meta['date']}." + (f" Settings: `{' '.join(s['overrides'])}`." if s.get("overrides") else ""),
        "",
        "| strategy | docs | answer latency s (median) | × none | tokens/s | accuracy "
        "| learn s/doc | state MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["strategies"].items():
        lines.append(
            f"| `{name}` | {r['documents']:,} | {r['answer_latency_s']:.3f} | {r['latency_vs_none']:.2f} | "
            f"{r['answer_tokens_per_s']:.1f} | {r['accuracy']:.3f} | {r['learn_s_per_doc']:.4f} | "
            f"{r['state_bytes'] / 2**20:.1f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="packaged name, HF id or local directory"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--probes", type=int, default=16, help="probes answered one at a time")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument(
        "--strategies",
        default="retrieval,knowledge_store",
        help="comma-separated strategy specs (none always runs first)",
    )
    parser.add_argument(
        "--set", action="append", default=[], help="config override key.path=value (repeatable)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/answer_latency"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(args)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
