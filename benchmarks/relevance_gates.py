"""How well the relevance gates separate questions about learned documents from unrelated text.

    python benchmarks/relevance_gates.py --docs 50 --out benchmarks/results/relevance_gates

For novel facts and BoolQ (``--docs`` documents each), after the documents are learned:

* ``retrieval`` (BM25 and dense): the best chunk's relevance for the benchmark's probes, for general questions
  (the known-fact probes) and whether the best chunk comes from the probe's own document;
* ``memory_bank`` keys (MiniLM and the backbone's pooled states): the best cosine similarity between a query
  and the documents' sentences, for the probes, the general questions and 512-token WikiText windows.

A gate works when the probes sit above it and the unrelated queries below it. Writes ``results.json`` and
``results.md`` (percentiles 10 / 25 / 50 / 75 / 90 and the maximum).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from continual_transformer import Backbone, load_config
from continual_transformer.evaluation.datasets import KNOWN_FACTS, load_benchmark
from continual_transformer.evaluation.general import general_text
from continual_transformer.evaluation.report import write_json
from continual_transformer.strategies import registry
from continual_transformer.strategies.memory_bank import MemoryBankConfig
from continual_transformer.strategies.retrieval import RetrievalConfig
from continual_transformer.tasks.benchmark import machine_info

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def summary(values: torch.Tensor) -> dict:
    values = values.float().cpu()
    return {
        **{f"p{int(q * 100)}": float(torch.quantile(values, q)) for q in QUANTILES},
        "max": float(values.max()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=50)
    parser.add_argument("--windows", type=int, default=16, help="512-token WikiText windows queried")
    parser.add_argument(
        "--set", action="append", default=[], help="config override key.path=value (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/relevance_gates"))
    args = parser.parse_args()

    config = load_config(set_items=args.set)
    backbone = Backbone.load(config.model, config.generation)
    text, _ = general_text(config.data_dir)
    ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = [backbone.tokenizer.decode(ids[i : i + 512]) for i in range(0, 512 * args.windows, 512)]
    general = [p.prompt for p in KNOWN_FACTS]
    rows = []
    for name in ("novel_facts", "boolq"):
        bench = load_benchmark(name, n_docs=args.docs, seed=0, data_dir=config.data_dir)
        probes = [p.prompt for p in bench.probes]
        for retriever in ("bm25", "dense"):
            strategy = registry.get("retrieval")(
                backbone, RetrievalConfig(retriever=retriever), settings=config
            )
            try:
                for doc in bench.documents:
                    strategy.learn(doc)
                hits = strategy.search(probes, 1)
                own = [
                    bool(h) and strategy.doc_ids[strategy.chunk_doc[h[0].index]] == p.doc_id
                    for h, p in zip(hits, bench.probes)
                ]
                for label, queries, found in (("probes", probes, hits), ("general questions", general, None)):
                    found = found if found is not None else strategy.search(queries, 1)
                    rows.append(
                        {
                            "benchmark": name,
                            "gate": f"retrieval {retriever}",
                            "queries": label,
                            "top1_own_document": sum(own) / len(own) if label == "probes" else None,
                            **summary(torch.tensor([h[0].relevance if h else 0.0 for h in found])),
                        }
                    )
            finally:
                strategy.close()
        for encoder in ("minilm-l6", "backbone"):
            strategy = registry.get("memory_bank")(
                backbone, MemoryBankConfig(key_encoder=encoder), settings=config
            )
            try:
                sentences = [s for doc in bench.documents for s in strategy.examples(doc.text)]
                keys = strategy.keys(sentences)
                for label, queries in (
                    ("probes", probes),
                    ("general questions", general),
                    ("WikiText windows", windows),
                ):
                    best = (strategy.keys(queries) @ keys.T).max(dim=1).values
                    rows.append(
                        {
                            "benchmark": name,
                            "gate": f"memory_bank keys {encoder}",
                            "queries": label,
                            "top1_own_document": None,
                            **summary(best),
                        }
                    )
            finally:
                strategy.close()
        print(f"{name}: done", flush=True)

    meta = {
        "model": backbone.name,
        "device": str(backbone.device),
        "docs": args.docs,
        "windows": len(windows),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(backbone.device),
        "defaults": {
            "retrieval.min_relevance": RetrievalConfig().min_relevance,
            "retrieval.min_similarity": RetrievalConfig().min_similarity,
            "memory_bank.min_similarity": "0.6 (sentence embedder) / 0.65 (backbone)",
        },
    }
    write_json(args.out / "results.json", {"meta": meta, "rows": rows})
    lines = [
        "# Relevance gates: probes vs unrelated queries",
        "",
        f"Model `{meta['model']}` on {meta['device']}, {args.docs} documents per benchmark, {meta['date']}. "
        f"Gates by default: retrieval BM25 relevance {meta['defaults']['retrieval.min_relevance']}, dense "
        f"similarity {meta['defaults']['retrieval.min_similarity']}; memory_bank "
        f"{meta['defaults']['memory_bank.min_similarity']}.",
        "",
        "| benchmark | gate | queries | p10 | p25 | p50 | p75 | p90 | max | top-1 own doc |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        own = "-" if r["top1_own_document"] is None else f"{r['top1_own_document']:.2f}"
        lines.append(
            f"| {r['benchmark']} | {r['gate']} | {r['queries']} | {r['p10']:.2f} | {r['p25']:.2f} | "
            f"{r['p50']:.2f} | {r['p75']:.2f} | {r['p90']:.2f} | {r['max']:.2f} | {own} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
