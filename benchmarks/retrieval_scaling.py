"""Retrieval latency and memory at 1k / 10k / 100k stored items, for the ``retrieval`` and ``knowledge_store``
indexes.

* ``retrieval``: the lexical index (:class:`continual_transformer.modules.LexicalIndex`, BM25 and TF-IDF) over
  synthetic chunks of ``--chunk-words`` words drawn from a Zipf-distributed vocabulary (like real text, a few
  words are everywhere and most are rare). Measured: time to add the chunks, time to (re)build the weights
  (the first search after a change), and search latency (median and 95th percentile over 32 queries: a query
  with a word that is in most chunks costs more than one with rare words).
* ``knowledge_store``: the key store (:class:`continual_transformer.modules.VectorStore`) with random keys of
  the backbone's hidden size (576 for SmolLM2-135M). Measured: insert time, search latency (k neighbours) for
  one query (one generation step) and for a block of 512 queries (scoring a 512-token window), and the time of
  the whole kNN mixture step (search + p_kNN over the vocabulary + log-space mix) for one position.

Memory: bytes of the index's arrays (lexical: term-id/count arrays and the two sparse matrices, not Python
list overhead) or the store's allocated buffers, plus the process RSS growth while building (noisy, but real).

    python benchmarks/retrieval_scaling.py --out benchmarks/results/retrieval_scaling/
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from continual_transformer.modules.lexical_index import LexicalIndex
from continual_transformer.modules.logits import knn_distribution, mix_log_probs
from continual_transformer.modules.vector_store import VectorStore

logger = logging.getLogger("retrieval_scaling")


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def timed(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def ms(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 3)


def synthetic_chunks(n: int, words: int, vocab: int, rng: np.random.Generator) -> list[str]:
    lexicon = np.array(
        [f"w{i:x}q" for i in range(vocab)]
    )  # letters around the number: no stemming collisions
    ranks = np.minimum(rng.zipf(1.2, size=n * words), vocab) - 1
    tokens = lexicon[ranks].reshape(n, words)
    return [" ".join(row) for row in tokens]


def bench_lexical(sizes: list[int], args: argparse.Namespace) -> list[dict]:
    rng = np.random.default_rng(0)
    corpus = synthetic_chunks(max(sizes), args.chunk_words, args.vocab, rng)
    queries = [" ".join(c.split()[: args.query_words]) for c in rng.choice(corpus, 32)]
    rows = []
    for scoring in ("bm25", "tfidf"):
        for n in sizes:
            gc.collect()
            rss0 = rss_bytes()
            index = LexicalIndex(scoring)
            add = timed(lambda: index.add(corpus[:n]), 1)
            build = timed(lambda: index.search(queries[:1], k=args.k), 1)  # first search builds the weights
            per_query = [
                t
                for q in queries
                for t in timed(lambda q=q: index.search([q], k=args.k), max(1, args.repeat // 4))
            ]
            arrays = sum(t.nbytes for t in index._terms) + sum(c.nbytes for c in index._counts)
            matrices = sum(
                m.data.nbytes + m.indices.nbytes + m.indptr.nbytes for m in (index._weights, index._presence)
            )
            rows.append(
                {
                    "index": f"lexical-{scoring}",
                    "items": n,
                    "add_s": round(add[0], 3),
                    "build_s": round(build[0], 3),
                    "search_ms_median": ms(per_query),
                    "search_ms_p95": round(1000 * float(np.percentile(per_query, 95)), 3),
                    "index_bytes": int(arrays + matrices),
                    "terms": len(index.vocab),
                    "rss_growth_bytes": max(0, rss_bytes() - rss0),
                }
            )
            logger.info("%s", rows[-1])
            index = None  # released before the next size is measured
    return rows


def bench_vectors(sizes: list[int], args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for metric in ("cosine", "l2"):
        for n in sizes:
            gc.collect()
            rss0 = rss_bytes()
            store = VectorStore(args.hidden, metric=metric, initial_capacity=4096)
            keys = torch.randn(n, args.hidden)
            values = torch.randint(0, args.vocab_lm, (n,))
            insert = timed(
                lambda: [store.add(keys[i : i + 512], values[i : i + 512]) for i in range(0, n, 512)], 1
            )
            one = torch.randn(1, args.hidden)
            block = torch.randn(512, args.hidden)
            single = timed(lambda: store.search(one, args.k, mark_used=False), args.repeat)
            window = timed(lambda: store.search(block, args.k, mark_used=False), max(1, args.repeat // 4))
            logits = torch.randn(1, args.vocab_lm)

            def mixture_step() -> None:
                dist, idx = store.search(one, args.k, mark_used=False)
                p_knn = knn_distribution(dist, store.values[idx], args.vocab_lm, 0.05)
                mix_log_probs(logits, p_knn, 0.25)

            mix = timed(mixture_step, args.repeat)
            rows.append(
                {
                    "index": f"vectors-{metric}",
                    "items": n,
                    "hidden": args.hidden,
                    "insert_s": round(insert[0], 3),
                    "search_1_ms": ms(single),
                    "search_512_ms_per_query": round(ms(window) / 512, 4),
                    "mixture_step_ms": ms(mix),
                    "allocated_bytes": store.nbytes(),
                    "key_bytes_used": n * args.hidden * 4,
                    "rss_growth_bytes": max(0, rss_bytes() - rss0),
                }
            )
            logger.info("%s", rows[-1])
            store = keys = None  # released before the next size is measured
    return rows


def write_markdown(path: Path, meta: dict, lexical: list[dict], vectors: list[dict]) -> None:
    def mib(b: int) -> str:
        return f"{b / 2**20:.1f}"

    lines = [
        "# Retrieval scaling",
        "",
        f"Run {meta['date']} on {meta['machine']} ({meta['cpu_count']} CPUs, torch {meta['torch']}, "
        f"{meta['torch_threads']} threads), "
        f"load average before/after {meta['load_before']} / {meta['load_after']}.",
        f"Settings: k={meta['settings']['k']}, "
        f"chunks of {meta['settings']['chunk_words']} words from a Zipf vocabulary "
        f"of {meta['settings']['vocab']} words, queries of {meta['settings']['query_words']} words; "
        f"keys of hidden size {meta['settings']['hidden']}, LM vocabulary {meta['settings']['vocab_lm']}.",
        "",
        "## retrieval: lexical index",
        "",
        "| index | chunks | add s | build s | search ms (median) | search ms (p95) "
        "| index MiB | RSS growth MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in lexical:
        lines.append(
            f"| {r['index']} | {r['items']:,} | {r['add_s']} | {r['build_s']} | {r['search_ms_median']} | "
            f"{r['search_ms_p95']} | {mib(r['index_bytes'])} | {mib(r['rss_growth_bytes'])} |"
        )
    lines += [
        "",
        "## knowledge_store: vector store",
        "",
        "| metric | keys | hidden | insert s | search 1 query ms | ms/query in block of 512 "
        "| kNN mixture step ms | allocated MiB | RSS growth MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in vectors:
        lines.append(
            f"| {r['index']} | {r['items']:,} | {r['hidden']} | {r['insert_s']} | {r['search_1_ms']} | "
            f"{r['search_512_ms_per_query']} | {r['mixture_step_ms']} | {mib(r['allocated_bytes'])} | "
            f"{mib(r['rss_growth_bytes'])} |"
        )
    lines += [
        "",
        "Latencies are medians. "
        "Memory of the store is what is allocated (geometric growth: up to 2x the keys used).",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        default="benchmarks/results/retrieval_scaling/",
        help="directory for results.json and results.md",
    )
    parser.add_argument(
        "--sizes", default="1000,10000,100000", help="comma-separated numbers of stored items"
    )
    parser.add_argument("--k", type=int, default=16, help="neighbours / chunks retrieved")
    parser.add_argument("--chunk-words", type=int, default=64, help="words per synthetic chunk")
    parser.add_argument("--query-words", type=int, default=8, help="words per query")
    parser.add_argument("--vocab", type=int, default=50000, help="synthetic word vocabulary")
    parser.add_argument("--hidden", type=int, default=576, help="key size (SmolLM2-135M's hidden size)")
    parser.add_argument(
        "--vocab-lm", type=int, default=49152, help="LM vocabulary for the mixture step (SmolLM2's)"
    )
    parser.add_argument("--repeat", type=int, default=20, help="timed repetitions of a search")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    lexical = bench_lexical(sizes, args)
    vectors = bench_vectors(sizes, args)
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or platform.platform()}",
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "seconds": round(time.perf_counter() - start, 1),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "retrieval": lexical, "knowledge_store": vectors}, indent=2)
    )
    write_markdown(out / "results.md", meta, lexical, vectors)
    logger.info("wrote %s (%.0f s)", out, meta["seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
