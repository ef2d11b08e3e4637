"""How well retrieval's similarity gate separates questions about learned documents from general questions.

For each benchmark and chunk size: the share of probes whose own document's best chunk ranks first (hit@1),
the own-document similarity's 10th percentile and median, and at several gate thresholds the share of probes
whose own document passes the gate beside the share of general known-fact questions (which must stay with the
base model) that pass it. Embeddings only (MiniLM, as the ``dense`` retriever), no answers generated: seconds
on a CPU.

    PYTHONPATH=src python benchmarks/gate_separation.py --out benchmarks/results/knowledge/gate-separation
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

THRESHOLDS = (0.30, 0.35, 0.40, 0.45)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--benchmarks", default="novel_facts,news")
    parser.add_argument("--docs", type=int, default=50)
    parser.add_argument("--chunks", default="512:64,128:32", help="chunk tokens:overlap, comma-separated")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer cuts the chunks")
    parser.add_argument("--embedder", default="minilm-l6")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/knowledge/gate-separation"))
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from continual_transformer import zoo
    from continual_transformer.documents import chunk_spans
    from continual_transformer.evaluation.datasets import KNOWN_FACTS, load_benchmark
    from continual_transformer.modules.embedder import SentenceEmbedder

    tokenizer = AutoTokenizer.from_pretrained(zoo.resolve(args.model))
    embedder = SentenceEmbedder.load(args.embedder)
    general = embedder.encode([p.prompt for p in KNOWN_FACTS])
    rows = []
    for name in args.benchmarks.split(","):
        bench = load_benchmark(name, n_docs=args.docs, seed=0, data_dir=args.data_dir)
        probes = embedder.encode([p.prompt for p in bench.probes])
        for spec in args.chunks.split(","):
            size, overlap = (int(x) for x in spec.split(":"))
            texts, owner = [], []
            for doc in bench.documents:
                ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
                for a, b in chunk_spans(len(ids), size, overlap):
                    texts.append(tokenizer.decode(ids[a:b]))
                    owner.append(doc.id)
            chunks = embedder.encode(texts)
            sims = probes @ chunks.T
            own = torch.tensor([[o == p.doc_id for o in owner] for p in bench.probes])
            own_best = sims.masked_fill(~own, -2.0).max(dim=1).values.cpu().numpy()
            hit1 = own[torch.arange(len(bench.probes)), sims.argmax(dim=1)].float().mean().item()
            general_best = (general @ chunks.T).max(dim=1).values.cpu().numpy()
            rows.append(
                {
                    "benchmark": name,
                    "chunk_tokens": size,
                    "chunk_overlap": overlap,
                    "chunks": len(texts),
                    "probes": len(bench.probes),
                    "hit_at_1": hit1,
                    "own_similarity_p10": float(np.percentile(own_best, 10)),
                    "own_similarity_median": float(np.median(own_best)),
                    "pass": {
                        f"{t:.2f}": {
                            "probes": float(np.mean(own_best >= t)),
                            "general_questions": float(np.mean(general_best >= t)),
                        }
                        for t in THRESHOLDS
                    },
                }
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"embedder": args.embedder, "rows": rows}, indent=2))
    head = " | ".join(f"pass @{t:.2f}: probes / general" for t in THRESHOLDS)
    lines = [
        f"# Retrieval gate: questions about learned documents against {len(KNOWN_FACTS)} general questions",
        "",
        f"Embedder `{args.embedder}`; chunks cut with `{args.model}`'s tokenizer; {args.docs} documents, "
        "seed 0.",
        "",
        f"| benchmark | chunk tokens | chunks | hit@1 | own sim p10 / median | {head} |",
        "|---|---:|---:|---:|---|" + "---|" * len(THRESHOLDS),
    ]
    for r in rows:
        cells = " | ".join(
            f"{r['pass'][f'{t:.2f}']['probes']:.2f} / {r['pass'][f'{t:.2f}']['general_questions']:.2f}"
            for t in THRESHOLDS
        )
        lines.append(
            f"| {r['benchmark']} | {r['chunk_tokens']} | {r['chunks']} | {r['hit_at_1']:.3f} "
            f"| {r['own_similarity_p10']:.2f} / {r['own_similarity_median']:.2f} | {cells} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
